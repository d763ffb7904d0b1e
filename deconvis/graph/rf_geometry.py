"""Receptive-field geometry as pure records: the per-axis recurrences (:class:`AxisRF`), one layer's
row (:class:`LayerRF`), the table of rows (:class:`RFTable`), output-size formulas and box clipping.

The rows are filled by :mod:`deconvis.graph.rf_walk` from shapes recorded by
:mod:`deconvis.graph.rf_shapes`; :func:`deconvis.graph.rf.receptive_fields` ties them together.
Arithmetic is exact (ints and :class:`fractions.Fraction`); boxes are half-open (y0, y1, x0, x1).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from deconvis.errors import DeconvisError, close_matches
from deconvis.graph.ops import Pair
from deconvis.graph.trace import TracedGraph

Box = Tuple[int, int, int, int]

def conv_out_size(n: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    """Output length of a convolution over ``n`` positions (PyTorch's formula; may be < 1)."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def pool_out_size(n: int, k: int, s: int, p: int = 0, d: int = 1, ceil_mode: bool = False) -> int:
    """Output length of a PyTorch max/avg pool over ``n`` positions (ceil_mode: the last window
    must start inside the input or its left padding). May be < 1."""
    out = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


@dataclass(frozen=True)
class AxisRF:
    """One axis of a layer's geometry: size ``r`` and jump ``j`` in input pixels, centre of unit 0."""

    r: int
    j: int
    start: Fraction

    def step(self, k: int, s: int, p: int, d: int = 1) -> "AxisRF":
        """The geometry after a conv/pool with kernel k, stride s, top/left padding p, dilation d."""
        return AxisRF(self.r + (k - 1) * d * self.j, self.j * s,
                      self.start + (Fraction((k - 1) * d, 2) - p) * self.j)

    def shift(self, pad: int) -> "AxisRF":
        """The geometry after padding ``pad`` positions in front (negative: cropping)."""
        return AxisRF(self.r, self.j, self.start - pad * self.j)

    def span(self, n: int, size: int) -> Tuple[int, int]:
        """Half-open input-pixel range covered by units 0..n-1, clipped to [0, size)."""
        lo = self.start - Fraction(self.r - 1, 2)
        hi = self.start + (n - 1) * self.j + Fraction(self.r - 1, 2) + 1
        lo_i, hi_i = min(max(int(lo), 0), size), min(int(hi), size)
        return lo_i, max(hi_i, lo_i)

    @staticmethod
    def region(lo: int, hi: int) -> "AxisRF":
        """The geometry of a unit that sees exactly pixels [lo, hi)."""
        r = hi - lo
        return AxisRF(r, max(r, 1), Fraction(lo + hi - 1, 2))


@dataclass(frozen=True)
class LayerRF:
    """Receptive-field geometry of one layer (row): all pairs are (height, width).

    ``out``: output spatial size (units), (1, 1) for vectors; ``rf``: receptive-field size in input
    pixels; ``jump``: input pixels between neighbouring units; ``start``: centre of unit (0, 0) in
    input pixel-centre coordinates (may be negative or half-integer). ``whole``: every unit sees the
    same region (flatten/linear/global pooling): ``box`` is then that region for all units.
    ``local``: for a whole row that sees the whole image only through a gate (squeeze-excitation:
    a product with a globally pooled branch), the geometry of the conv path with the gate
    detached: the patch that drives the unit locally (None otherwise).
    """

    name: str
    kind: str
    out: Pair
    rf: Pair
    jump: Pair
    start: Tuple[float, float]
    whole: bool = False
    local: Optional["LayerRF"] = None

    def _check_unit(self, y: int, x: int) -> None:
        if not (0 <= y < self.out[0] and 0 <= x < self.out[1]):
            raise DeconvisError(f"unit ({y}, {x}) is outside layer {self.name!r}, whose output is "
                                f"{self.out[0]}x{self.out[1]}; use 0 <= y < {self.out[0]}, 0 <= x < {self.out[1]}")

    def centre(self, y: int, x: int) -> Tuple[float, float]:
        """Centre of unit (y, x) in input pixel-centre coordinates (h, w)."""
        self._check_unit(y, x)
        if self.whole:
            return (self.start[0], self.start[1])
        return (self.start[0] + y * self.jump[0], self.start[1] + x * self.jump[1])

    def box(self, y: int, x: int) -> Box:
        """Half-open, unclipped input-pixel box (y0, y1, x0, x1) that unit (y, x) sees."""
        cy, cx = self.centre(y, x)
        y0 = int(round(cy - (self.rf[0] - 1) / 2))
        x0 = int(round(cx - (self.rf[1] - 1) / 2))
        return (y0, y0 + self.rf[0], x0, x0 + self.rf[1])

    def crop_box(self, y: int, x: int) -> Box:
        """Half-open, unclipped box to crop for unit (y, x): :meth:`box`, or the local field's box
        when the row sees the whole image only through a gate."""
        return self.local.box(y, x) if self.local is not None else self.box(y, x)

    def to_record(self) -> Dict[str, Any]:
        """JSON-ready row. ``whole``: every unit sees the same region ``[start - (rf-1)/2,
        start + (rf+1)/2)`` and ``start + y*jump`` does not apply; ``local``: the gate-detached
        field ({rf, jump, start}) when there is one."""
        rec: Dict[str, Any] = {"name": self.name, "kind": self.kind, "out": list(self.out), "rf": list(self.rf),
                               "jump": list(self.jump), "start": [as_number(self.start[0]), as_number(self.start[1])],
                               "whole": self.whole}
        if self.local is not None:
            rec["local"] = {"rf": list(self.local.rf), "jump": list(self.local.jump),
                            "start": [as_number(self.local.start[0]), as_number(self.local.start[1])]}
        return rec


def as_number(v: float) -> Union[int, float]:
    """``v`` as an int when it is whole, else a float (for JSON and tables)."""
    return int(v) if float(v).is_integer() else float(v)


def clip_box(box: Box, size: Pair) -> Tuple[Box, Tuple[int, int, int, int]]:
    """Clip a half-open box (y0, y1, x0, x1) to an image of ``size`` (h, w).

    Returns (clipped box, pad (top, bottom, left, right)): padding the clipped crop by ``pad``
    restores the box's full size. A box wholly outside the image clips to an empty box."""
    out, pad = [], []
    for lo, hi, n in ((box[0], box[1], size[0]), (box[2], box[3], size[1])):
        c0 = min(max(lo, 0), n)
        c1 = max(min(hi, n), c0)
        before = min(max(c0 - lo, 0), hi - lo)  # never negative, even for a box wholly outside
        out += [c0, c1]
        pad += [before, (hi - lo) - (c1 - c0) - before]
    return (out[0], out[1], out[2], out[3]), (pad[0], pad[1], pad[2], pad[3])


class RFTable:
    """The receptive-field rows of a network, in execution order, starting with ``input``.

    ``table[name]`` accepts a row name (module name from ``named_modules()``, ``name#2`` for a
    module's second call, fx node name for functions such as ``add``/``flatten``) or the name of a
    container module (``layer1``, ``features``), which stands for its last row.
    """

    def __init__(self, input_size: Pair, layers: List[LayerRF], containers: Optional[Dict[str, str]] = None,
                 model_name: str = "model", graph: Optional[TracedGraph] = None):
        self.input_size: Pair = (int(input_size[0]), int(input_size[1]))
        self.layers: List[LayerRF] = list(layers)
        self.by_name: Dict[str, LayerRF] = {l.name: l for l in self.layers}
        self.containers: Dict[str, str] = {k: v for k, v in (containers or {}).items() if k not in self.by_name}
        self.model_name = model_name
        self.graph = graph

    def resolve(self, name: str) -> str:
        """Row name, container name or alias (``conv5``, ``pool2``, ``layer3``) -> row name, by the
        traced graph's resolver; DeconvisError naming close matches when unknown."""
        if name in self.by_name:
            return name
        if name in self.containers:
            return self.containers[name]
        if self.graph is not None:
            row = self.graph.resolve(name)
            if row in self.by_name:
                return row
            raise DeconvisError(f"layer {name!r} ({row}) of {self.model_name} has no receptive-field row "
                                "(it does not depend on the image)")
        raise DeconvisError(f"unknown layer {name!r} in {self.model_name}"
                            + close_matches(name, list(self.by_name) + list(self.containers)))

    def __getitem__(self, name: str) -> LayerRF:
        return self.by_name[self.resolve(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.by_name or name in self.containers)

    def __iter__(self) -> Iterator[LayerRF]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def _row(self, layer: Union[str, LayerRF]) -> LayerRF:
        return layer if isinstance(layer, LayerRF) else self[layer]

    def box(self, layer: Union[str, LayerRF], y: int, x: int) -> Box:
        """Unclipped half-open box (y0, y1, x0, x1) in input pixels of unit (y, x) of ``layer``."""
        return self._row(layer).box(y, x)

    def clipped_box(self, layer: Union[str, LayerRF], y: int, x: int) -> Tuple[Box, Tuple[int, int, int, int]]:
        """(box clipped to the image, pad (top, bottom, left, right)) of unit (y, x) of ``layer``."""
        return clip_box(self.box(layer, y, x), self.input_size)

    def crop_box(self, layer: Union[str, LayerRF], y: int, x: int) -> Tuple[Box, Tuple[int, int, int, int]]:
        """The image patch to show beside a projection of unit (y, x) of ``layer``: (box clipped to
        the image, pad (top, bottom, left, right)). This is the unit's receptive field; for rows
        that see the whole image only through a squeeze-excitation gate it is the local field of
        the conv path (see :attr:`LayerRF.local`)."""
        row = self._row(layer)
        return clip_box(row.crop_box(y, x), self.input_size)

    def to_records(self) -> List[Dict[str, Any]]:
        """JSON-ready rows: name, kind, out, rf, jump, start (each [h, w]), whole, and local where set."""
        return [l.to_record() for l in self.layers]

    def format(self, layers: Optional[Sequence[LayerRF]] = None) -> str:
        """A human-readable aligned table (all pairs as height x width, in input pixels)."""
        rows = [("layer", "kind", "out", "rf", "jump", "start")]

        def hw(p: Sequence[Any]) -> str:
            a, b = (as_number(v) for v in p)
            return f"{a}x{b}"

        for l in (self.layers if layers is None else layers):
            rf = hw(l.rf) + (" (all)" if l.whole else "")
            rows.append((l.name, l.kind, hw(l.out), rf, hw(l.jump), ", ".join(str(as_number(v)) for v in l.start)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(f"input {self.input_size[0]}x{self.input_size[1]} px; rf, jump, start in input pixels "
                     "(height x width); start = centre (y, x) of unit (0, 0)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RFTable({self.model_name}, input_size={self.input_size}, {len(self.layers)} rows)"
