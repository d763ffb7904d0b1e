"""Theoretical receptive-field geometry of a CNN (METHOD.md section 3), from its torch.fx graph.

For every tensor op of the traced network (one row per op, in execution order, after an
``input`` row) :func:`receptive_fields` gives, per axis (height and width independently):

* ``rf``    r: how many input pixels one unit sees (padding included),
* ``jump``  j: input pixels between neighbouring units,
* ``start``: the centre of unit (0, 0) in input pixel-centre coordinates (first pixel = 0),

by the recurrences ``r = r' + (k-1)*d*j'``, ``j = j'*s``, ``start = start' + ((k-1)*d/2 - p)*j'``
(primes: the row feeding the op). Unit (y, x) is centred at ``start + (y, x)*jump`` and sees the
inclusive range ``centre +- (r-1)/2``: the half-open, *unclipped* box of :meth:`LayerRF.box`.
Arithmetic is exact (ints and :class:`fractions.Fraction`; starts are half-integers).

Ops that see everything their input saw (flatten to a vector, Linear, global and uneven
adaptive pools, spatial means) are *whole* rows: every unit sees the union of the input units'
boxes, clipped to the image (normally the whole image), and ``rf`` is that region's size.

The model is traced in eval mode. Shapes come from one forward pass of a zero image under
``torch.no_grad`` and eval mode, with fake tensors (shapes only; instant even for VGG at 224 px,
and for models on the meta device) or, when fake tensors fail, a real zero image on the model's
device. The model's modes are restored; its parameters and buffers are not changed.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from deconvis.errors import DeconvisError, close_matches
from deconvis.graph.ops import (_CAT_FUNCS, _MERGE_FUNCS, _MERGE_METHODS, _NON_TENSOR_METHODS, _PASS_FUNCS,
                                _PASS_METHODS, _PASS_MODULES, _RESHAPE_FUNCS, _RESHAPE_METHODS, _SPLIT_FUNCS,
                                _SPLIT_METHODS, _WHOLE_FUNCS, _WHOLE_MODULES, Pair, _arg, kind_name,
                                window_params)
from deconvis.graph.trace import TracedGraph, trace_graph
from deconvis.utils.device import model_dtype_device

Box = Tuple[int, int, int, int]

# ------------------------------------------------------------------------------ pure geometry
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
                               "jump": list(self.jump), "start": [_num(self.start[0]), _num(self.start[1])],
                               "whole": self.whole}
        if self.local is not None:
            rec["local"] = {"rf": list(self.local.rf), "jump": list(self.local.jump),
                            "start": [_num(self.local.start[0]), _num(self.local.start[1])]}
        return rec


def _num(v: float) -> Union[int, float]:
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
        self._by_name: Dict[str, LayerRF] = {l.name: l for l in self.layers}
        self.containers: Dict[str, str] = {k: v for k, v in (containers or {}).items() if k not in self._by_name}
        self.model_name = model_name
        self.graph = graph

    def resolve(self, name: str) -> str:
        """Row name, container name or alias (``conv5``, ``pool2``, ``layer3``) -> row name, by the
        traced graph's resolver; DeconvisError naming close matches when unknown."""
        if name in self._by_name:
            return name
        if name in self.containers:
            return self.containers[name]
        if self.graph is not None:
            row = self.graph.resolve(name)
            if row in self._by_name:
                return row
            raise DeconvisError(f"layer {name!r} ({row}) of {self.model_name} has no receptive-field row "
                                "(it does not depend on the image)")
        raise DeconvisError(f"unknown layer {name!r} in {self.model_name}"
                            + close_matches(name, list(self._by_name) + list(self.containers)))

    def __getitem__(self, name: str) -> LayerRF:
        return self._by_name[self.resolve(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._by_name or name in self.containers)

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
            a, b = (_num(v) for v in p)
            return f"{a}x{b}"

        for l in (self.layers if layers is None else layers):
            rf = hw(l.rf) + (" (all)" if l.whole else "")
            rows.append((l.name, l.kind, hw(l.out), rf, hw(l.jump), ", ".join(str(_num(v)) for v in l.start)))
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


# --------------------------------------------------------------------------- shape propagation
class _NodeFailed(Exception):
    def __init__(self, node: torch.fx.Node, exc: BaseException):
        super().__init__(str(exc))
        self.node, self.exc = node, exc


class _TooSmall(Exception):
    def __init__(self, node: torch.fx.Node, in_hw: Pair, out_hw: Pair):
        super().__init__(f"{out_hw}")
        self.node, self.in_hw, self.out_hw = node, in_hw, out_hw


def _shape_of(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return [tuple(t.shape) for t in v]
    return None


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once, recording every node's output shape; stops early on a too-small map."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.shapes: Dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op in ("call_module", "call_function"):
            win = window_params(n, self.module, self.shapes)
            x = n.args[0] if n.args else None
            xs = self.shapes.get(x) if isinstance(x, torch.fx.Node) else None
            if win is not None and isinstance(xs, tuple) and len(xs) >= 3 and not win["same"]:
                in_hw = (int(xs[-2]), int(xs[-1]))
                fn = conv_out_size if win["conv"] else \
                    (lambda n_, k, s, p, d, c=win["ceil"]: pool_out_size(n_, k, s, p, d, c))
                out = tuple(fn(in_hw[a], win["k"][a], win["s"][a], win["p"][a], win["d"][a]) for a in (0, 1))
                if min(out) < 1:
                    raise _TooSmall(n, in_hw, (max(out[0], 0), max(out[1], 0)))
        try:
            val = super().run_node(n)
        except (DeconvisError, _TooSmall):
            raise
        except Exception as exc:
            failed = _NodeFailed(n, exc)
            failed.shapes = self.shapes  # type: ignore[attr-defined]
            raise failed from exc
        self.shapes[n] = _shape_of(val)
        return val


def _run_recorder(gm: torch.fx.GraphModule, x: torch.Tensor, fake: bool) -> "_Recorder":
    rec = _Recorder(gm)
    if not fake:
        with torch.no_grad():
            rec.run(x)
        return rec
    import logging

    from torch._subclasses.fake_tensor import FakeTensorMode

    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)  # a failing op is retried for real below; keep its log quiet
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            rec.run(mode.from_tensor(x))
    finally:
        log.setLevel(level)
    return rec


def _propagate(tg: TracedGraph, size: Pair, in_channels: int) -> Dict[torch.fx.Node, Any]:
    """Output shape of every node for one [1, in_channels, H, W] zero image (eval mode, no_grad).

    Shapes come from fake tensors (no arithmetic: instant even for VGG at 224 px); if that fails
    for any reason other than a too-small map, a real zero image is run instead."""
    model = tg.model
    dtype, device = model_dtype_device(model)
    modes = {m: m.training for m in model.modules()}
    hw = f"{size[0]}x{size[1]}"
    x = torch.zeros(1, in_channels, size[0], size[1], dtype=dtype, device=device)
    msg = None
    rec: Optional[_Recorder] = None
    try:
        model.eval()
        try:
            rec = _run_recorder(tg.graph_module, x, fake=True)
        except _TooSmall:
            raise
        except Exception:  # fake tensors unsupported here, or the forward fails: run it for real
            rec = _run_recorder(tg.graph_module, x, fake=False)
    except _TooSmall as e:
        name, kind = tg.row_names.get(e.node, e.node.name), kind_name(e.node, tg.graph_module)
        msg = (f"input {hw} is too small for {tg.model_name}: layer {name} ({kind}) would have size "
               f"{e.out_hw[0]}x{e.out_hw[1]} (its input is {e.in_hw[0]}x{e.in_hw[1]}); use a larger input size")
    except _NodeFailed as e:
        name, kind = tg.row_names.get(e.node, e.node.name), kind_name(e.node, tg.graph_module)
        first = (str(e.exc).strip().splitlines() or [""])[0]
        shapes = e.shapes if hasattr(e, "shapes") else {}
        xin = e.node.args[0] if e.node.args else None
        xs = shapes.get(xin) if isinstance(xin, torch.fx.Node) else None
        windowed = window_params(e.node, tg.graph_module, shapes) is not None
        small = "too small" in first.lower() or (windowed and "size" in first.lower())
        if small:
            seen = f"its input is {xs[-2]}x{xs[-1]}: " if isinstance(xs, tuple) and len(xs) >= 3 else ""
            msg = (f"input {hw} is too small for {tg.model_name}: layer {name} ({kind}) would have size < 1 "
                   f"({seen}{type(e.exc).__name__}: {first}); use a larger input size")
        else:
            msg = (f"input {hw} with {in_channels} channels does not fit {tg.model_name}: layer {name} ({kind}) "
                   f"failed ({type(e.exc).__name__}: {first}); use the input size and channels the model was built for")
    finally:
        for m, training in modes.items():
            m.training = training
    if msg is not None:
        raise DeconvisError(msg)
    assert rec is not None
    return rec.shapes


# --------------------------------------------------------------------------------- graph walk
@dataclass(frozen=True)
class _Geo:
    """Geometry of one node: per-axis RF, map size, whole-image flag, channels-last layout
    (``cl``: the map is [N, H, W, C], as inside ConvNeXt's LayerNorm), and the gate-detached
    ``local`` geometry of a whole node reached through a gate."""

    h: AxisRF
    w: AxisRF
    out: Pair
    whole: bool = False
    cl: bool = False
    local: Optional["_Geo"] = None

    def region(self, size: Pair) -> Tuple[Pair, Pair]:
        """Half-open input ranges ((y0, y1), (x0, x1)) seen by all units together, clipped."""
        if self.whole:
            return ((int(self.h.start - Fraction(self.h.r - 1, 2)), int(self.h.start + Fraction(self.h.r + 1, 2))),
                    (int(self.w.start - Fraction(self.w.r - 1, 2)), int(self.w.start + Fraction(self.w.r + 1, 2))))
        return self.h.span(self.out[0], size[0]), self.w.span(self.out[1], size[1])


def _whole(geos: Sequence[_Geo], size: Pair, out: Pair) -> _Geo:
    regions = [g.region(size) for g in geos]
    ys = [r[0] for r in regions if r[0][1] > r[0][0] and r[1][1] > r[1][0]] or [regions[0][0]]
    xs = [r[1] for r in regions if r[0][1] > r[0][0] and r[1][1] > r[1][0]] or [regions[0][1]]
    return _Geo(AxisRF.region(min(a for a, _ in ys), max(b for _, b in ys)),
                AxisRF.region(min(a for a, _ in xs), max(b for _, b in xs)), out, True)


def _dims(node: torch.fx.Node) -> List[int]:
    """The dims of a permute node as a list of ints ([] when not constant)."""
    rest = list(node.args[1:]) or list(node.kwargs.get("dims", []))
    dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else []


def _spatial(shape: Any) -> Optional[Pair]:
    if isinstance(shape, tuple) and len(shape) >= 3:
        return (int(shape[-2]), int(shape[-1]))
    return None


def _out_pair(shape: Any) -> Pair:
    if isinstance(shape, tuple) and len(shape) == 4:
        return (int(shape[-2]), int(shape[-1]))
    return (1, 1)


class _Walker:
    def __init__(self, tg: TracedGraph, shapes: Dict[torch.fx.Node, Any], size: Pair):
        self.tg, self.gm, self.shapes, self.size = tg, tg.graph_module, shapes, size
        self.geo: Dict[torch.fx.Node, _Geo] = {}

    def name(self, n: torch.fx.Node) -> str:
        return self.tg.row_names.get(n, n.name)

    def fail(self, node: torch.fx.Node, why: str) -> DeconvisError:
        return DeconvisError(f"cannot compute receptive fields through {self.name(node)} "
                             f"({kind_name(node, self.gm)}) of {self.tg.model_name}: {why}")

    def unknown(self, node: torch.fx.Node) -> DeconvisError:
        what = "module" if node.op == "call_module" else ("method" if node.op == "call_method" else "function")
        return self.fail(node, f"unknown {what} kind {kind_name(node, self.gm)!r}; deconvis knows Conv2d, max/avg/"
                               "adaptive pools, elementwise activations, BatchNorm, dropout, LRN, padding, "
                               "add/mul/cat merges, flatten/view and Linear")

    def walk(self) -> List[Tuple[torch.fx.Node, _Geo]]:
        rows: List[Tuple[torch.fx.Node, _Geo]] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                g = _Geo(AxisRF(1, 1, Fraction(0)), AxisRF(1, 1, Fraction(0)), self.size)
            elif node.op in ("output", "get_attr"):
                continue
            else:
                shape = self.shapes.get(node)
                inputs: List[torch.fx.Node] = []
                torch.fx.node.map_arg((node.args, node.kwargs),
                                      lambda a: inputs.append(a) if a in self.geo and a not in inputs else None)
                if shape is None or not inputs:
                    continue  # shape query, constant, or a tensor that does not depend on the input
                g = self.step(node, [(a, self.geo[a]) for a in inputs], shape)
            self.geo[node] = g
            if not (isinstance(self.shapes.get(node), list)):  # tuples get rows via their getitem
                rows.append((node, g))
        return rows

    # one op ------------------------------------------------------------------------------
    def step(self, node: torch.fx.Node, ins: List[Tuple[torch.fx.Node, _Geo]], shape: Any) -> _Geo:
        res = self._step(node, ins, shape)
        if res.whole and any(not g.whole or g.local is not None for _, g in ins):
            kept = [(n, g.local if g.whole else g) for n, g in ins if not g.whole or g.local is not None]
            try:
                local = self._step(node, kept, shape)
            except DeconvisError:
                local = None
            if local is not None and not local.whole:
                res = replace(res, local=local)
        return res

    def _step(self, node: torch.fx.Node, ins: List[Tuple[torch.fx.Node, _Geo]], shape: Any) -> _Geo:
        if any(g.cl for _, g in ins):
            return self.channels_last(node, ins, shape)
        out = _out_pair(shape[0] if isinstance(shape, list) else shape)
        first = ins[0][1]
        t = node.target
        module = self.gm.get_submodule(t) if node.op == "call_module" else None
        is_fn, is_meth = node.op == "call_function", node.op == "call_method"

        if is_meth and t in _NON_TENSOR_METHODS:
            return first
        # anything computed from inputs that already see their whole region sees it too
        if all(g.whole for _, g in ins):
            return _whole([g for _, g in ins], self.size, out)
        if (is_fn and t in _MERGE_FUNCS) or (is_meth and t in _MERGE_METHODS):
            return self.merge(node, ins, shape, out)
        if len(ins) > 1:  # several input-dependent tensors into one op that is not a known merge
            if any(g.whole for _, g in ins) or (is_fn and t in _WHOLE_FUNCS) or isinstance(module, _WHOLE_MODULES):
                return _whole([g for _, g in ins], self.size, out)
            raise self.unknown(node)

        win = window_params(node, self.gm, self.shapes)
        if win is not None:
            return self.window(node, first, win, out)
        if module is not None:
            if isinstance(module, _PASS_MODULES):
                return self.passthrough(node, first, shape, out)
            if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
                left, _right, top, _bottom = module.padding
                return self.pad(node, first, top, left, out)
            if isinstance(module, (nn.Flatten, nn.Unflatten)):
                return self.reshape(first, shape, out)
            if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                return self.adaptive(node, first, shape, out)
            if isinstance(module, _WHOLE_MODULES):
                return _whole([g for _, g in ins], self.size, out)
            raise self.unknown(node)
        if is_fn:
            if t in _PASS_FUNCS:
                return self.passthrough(node, first, shape, out)
            if t in _RESHAPE_FUNCS:
                return self.reshape(first, shape, out)
            if t in _WHOLE_FUNCS:
                return _whole([g for _, g in ins], self.size, out)
            if t in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d) or \
                    getattr(t, "__name__", "") in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
                return self.adaptive(node, first, shape, out)
            if t is F.pad:
                pad = list(_arg(node, 1, "pad"))
                mode = _arg(node, 2, "mode", "constant")
                if mode != "constant" or len(pad) not in (2, 4):
                    raise self.fail(node, f"F.pad with mode {mode!r} and pad {pad} is not supported "
                                          "(only constant padding of the last two dims)")
                top = pad[2] if len(pad) == 4 else 0
                return self.pad(node, first, top, pad[0], out)
            if t is operator.getitem:
                return self.getitem(node, first, shape)
            if t in _SPLIT_FUNCS:
                return self.split(node, first, _arg(node, 2, "dim", 0))
        if is_meth:
            if t in _PASS_METHODS:
                return self.passthrough(node, first, shape, out)
            if t in _RESHAPE_METHODS:
                return self.reshape(first, shape, out)
            if t in _SPLIT_METHODS:
                return self.split(node, first, _arg(node, 2, "dim", 0))
        if (is_meth and t in ("transpose", "permute")) or (is_fn and t in (torch.transpose, torch.permute)):
            return self.permute(node, first, shape)
        raise self.unknown(node)

    def permute(self, node: torch.fx.Node, g: _Geo, shape: Any) -> _Geo:
        """transpose/permute that keep height and width as the last two dims (channel shuffles)."""
        in_shape = self.shapes.get(node.args[0])
        nd = len(in_shape) if isinstance(in_shape, tuple) else 0
        rest = [a for a in node.args[1:]]
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if node.target in ("transpose", torch.transpose):
            moved = [int(d) % nd for d in dims] if nd and all(isinstance(d, int) for d in dims) else [nd - 1]
        else:
            ok = nd and len(dims) == nd and all(isinstance(d, int) for d in dims)
            moved = [i for i, d in enumerate(dims) if int(d) % nd != i] if ok else [nd - 1]
        if nd >= 3 and all(d < nd - 2 for d in moved) and _spatial(shape) == g.out:
            return g
        if nd == 4 and _dims(node) == [0, 2, 3, 1] and not g.whole:  # to channels-last [N, H, W, C]
            return replace(g, cl=True)
        raise self.fail(node, "moving the height or width dimension is not supported")

    def channels_last(self, node: torch.fx.Node, ins: List[Tuple[torch.fx.Node, _Geo]], shape: Any) -> _Geo:
        """Ops on a channels-last map [N, H, W, C] that act on channels at each position
        (LayerNorm over C, Linear on C, elementwise, merges of aligned maps), and the permute back."""
        g = ins[0][1]
        t = node.target
        is_fn, is_meth = node.op == "call_function", node.op == "call_method"
        module = self.gm.get_submodule(t) if node.op == "call_module" else None
        if not (isinstance(shape, tuple) and len(shape) == 4):
            raise self.fail(node, "a channels-last map must stay 4-dimensional")
        if ((is_meth and t == "permute") or (is_fn and t is torch.permute)) and _dims(node) == [0, 3, 1, 2]:
            return replace(g, cl=False, out=(int(shape[2]), int(shape[3])))
        same = (int(shape[1]), int(shape[2])) == g.out
        per_position = (
            isinstance(module, _PASS_MODULES + (nn.Linear,))
            or (isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1)
            or (is_fn and (t in _PASS_FUNCS or t is F.linear or (t is F.layer_norm and len(_arg(node, 1, "normalized_shape")) == 1)))
            or (is_meth and t in _PASS_METHODS))
        if per_position and len(ins) == 1 and same:
            return g
        if ((is_fn and t in _MERGE_FUNCS) or (is_meth and t in _MERGE_METHODS)) and same \
                and all(b.cl and b.h == g.h and b.w == g.w and b.out == g.out for _, b in ins):
            return g
        raise self.fail(node, "only per-position ops (LayerNorm or Linear over channels, elementwise ops) "
                              "are supported on a channels-last map")

    def passthrough(self, node: torch.fx.Node, g: _Geo, shape: Any, out: Pair) -> _Geo:
        if _spatial(shape) is not None and not g.whole and _spatial(shape) != g.out:
            raise self.fail(node, f"an elementwise op changed the map size from {g.out} to {_spatial(shape)}")
        return g

    def window(self, node: torch.fx.Node, g: _Geo, win: Dict[str, Any], out: Pair) -> _Geo:
        k, s, p, d = win["k"], win["s"], win["p"], win["d"]
        return _Geo(g.h.step(k[0], s[0], p[0], d[0]), g.w.step(k[1], s[1], p[1], d[1]), out)

    def pad(self, node: torch.fx.Node, g: _Geo, top: int, left: int, out: Pair) -> _Geo:
        return _Geo(g.h.shift(int(top)), g.w.shift(int(left)), out)

    def reshape(self, g: _Geo, shape: Any, out: Pair) -> _Geo:
        sp = _spatial(shape)
        if sp is not None and sp == g.out and not g.whole:
            return _Geo(g.h, g.w, sp)
        return _whole([g], self.size, out)

    def adaptive(self, node: torch.fx.Node, g: _Geo, shape: Any, out: Pair) -> _Geo:
        sp = _spatial(shape)
        n_in = g.out
        if sp == n_in:
            return g  # identity
        if sp is None or sp == (1, 1) or any(n_in[a] % sp[a] for a in (0, 1)):
            return _whole([g], self.size, out)  # global or uneven windows: whole region
        k = (n_in[0] // sp[0], n_in[1] // sp[1])
        return _Geo(g.h.step(k[0], k[0], 0), g.w.step(k[1], k[1], 0), sp)

    def getitem(self, node: torch.fx.Node, g: _Geo, shape: Any) -> _Geo:
        src = node.args[0]
        if isinstance(self.shapes.get(src), list):  # element of a tuple (chunk/split/pool indices)
            sp = _spatial(shape)
            if g.whole:
                return _whole([g], self.size, _out_pair(shape))
            if sp != g.out:
                raise self.fail(node, f"tuple element has map size {sp}, not {g.out}")
            return g
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        in_shape = self.shapes.get(src)
        nd = len(in_shape) if isinstance(in_shape, tuple) else 0
        # find which index entries hit the last two (spatial) dims
        if Ellipsis in idx:
            pos = idx.index(Ellipsis)
            tail = idx[pos + 1:]
            spatial_idx = tail[-2:] if len(tail) >= 2 else tail
        else:
            spatial_idx = idx[2:4] if nd >= 4 else ()
        full = all(isinstance(i, slice) and i == slice(None, None, None) for i in spatial_idx)
        if full and _spatial(shape) == g.out:
            return g
        raise self.fail(node, "indexing/slicing along height or width is not supported")

    def split(self, node: torch.fx.Node, g: _Geo, dim: Any) -> _Geo:
        in_shape = self.shapes.get(node.args[0])
        nd = len(in_shape) if isinstance(in_shape, tuple) else 0
        if isinstance(dim, int) and nd >= 3 and (dim % nd) < nd - 2:
            return g
        raise self.fail(node, f"splitting along dim {dim} (height or width) is not supported")

    def merge(self, node: torch.fx.Node, ins: List[Tuple[torch.fx.Node, _Geo]], shape: Any, out: Pair) -> _Geo:
        t = node.target
        if t in _CAT_FUNCS:
            dim = _arg(node, 1, "dim", 0)
            first_shape = self.shapes.get(ins[0][0])
            nd = len(first_shape) if isinstance(first_shape, tuple) else 0
            if nd >= 3 and isinstance(dim, int) and (dim % nd) >= nd - 2:
                raise self.fail(node, f"concatenating along dim {dim} (height or width) is not supported")
        if len(ins) == 1:
            return self.passthrough(node, ins[0][1], shape, out)
        if any(g.whole for _, g in ins):
            return _whole([g for _, g in ins], self.size, out)
        a_node, a = ins[0]
        for b_node, b in ins[1:]:
            if a.out != b.out:
                raise self.fail(node, f"branches {self.name(a_node)} ({a.out[0]}x{a.out[1]}) and "
                                      f"{self.name(b_node)} ({b.out[0]}x{b.out[1]}) have different map sizes")
            for axis, (x, y) in (("height", (a.h, b.h)), ("width", (a.w, b.w))):
                if x.j != y.j or x.start != y.start:
                    raise self.fail(node, f"branches {self.name(a_node)} (jump {x.j}, start {_num(float(x.start))}) "
                                          f"and {self.name(b_node)} (jump {y.j}, start {_num(float(y.start))}) "
                                          f"disagree along the {axis}; their units are not aligned")
        h = max((g.h for _, g in ins), key=lambda ax: ax.r)
        w = max((g.w for _, g in ins), key=lambda ax: ax.r)
        if _spatial(shape) is not None and _spatial(shape) != a.out:
            raise self.fail(node, f"merged map has size {_spatial(shape)}, not {a.out}")
        return _Geo(h, w, a.out)


def _size_pair(input_size: Union[int, Sequence[int]]) -> Pair:
    if isinstance(input_size, bool):
        raise DeconvisError(f"input size must be an int or (height, width), got {input_size!r}")
    if isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        try:
            vals = [int(v) for v in input_size]
        except (TypeError, ValueError):
            raise DeconvisError(f"input size must be an int or (height, width), got {input_size!r}") from None
        if len(vals) == 1:
            vals = vals * 2
        if len(vals) != 2:
            raise DeconvisError(f"input size must be an int or (height, width), got {input_size!r}")
        size = (vals[0], vals[1])
    if min(size) < 1:
        raise DeconvisError(f"input size {size[0]}x{size[1]} must be at least 1x1 pixel")
    return size


def table_from_traced(tg: TracedGraph, input_size: Union[int, Sequence[int]], in_channels: int = 3) -> RFTable:
    """:func:`receptive_fields` for an already traced model."""
    size = _size_pair(input_size)
    shapes = _propagate(tg, size, in_channels)
    rows = _Walker(tg, shapes, size).walk()
    layers = []
    for node, g in rows:
        kind = kind_name(node, tg.graph_module)
        local = None
        if g.local is not None:
            lg = g.local
            local = LayerRF(name=tg.row_names[node], kind=kind, out=g.out, rf=(lg.h.r, lg.w.r),
                            jump=(lg.h.j, lg.w.j), start=(float(lg.h.start), float(lg.w.start)))
        layers.append(LayerRF(name=tg.row_names[node], kind=kind, out=g.out, rf=(g.h.r, g.w.r),
                              jump=(g.h.j, g.w.j), start=(float(g.h.start), float(g.w.start)),
                              whole=g.whole, local=local))
    have = {l.name for l in layers}
    containers = {qual: tg.row_names[n] for qual, n in tg.container_last.items()
                  if n in tg.row_names and tg.row_names[n] in have}
    return RFTable(size, layers, containers, tg.model_name, tg)


def receptive_fields(model: nn.Module, input_size: Union[int, Sequence[int]], in_channels: int = 3) -> RFTable:
    """The receptive-field table of ``model`` for images of ``input_size`` (h, w) pixels.

    Traces the model with torch.fx and runs one zero image [1, in_channels, H, W] through it (eval
    mode, no_grad; modes restored). Raises DeconvisError for untraceable models, unknown ops,
    misaligned branches and inputs too small for the network.
    """
    return table_from_traced(trace_graph(model), input_size, in_channels)


def resolve_layer(model: nn.Module, table: RFTable, name: str) -> str:
    """Row name of ``table`` for ``name`` (row, container or alias); ``model`` is unused and kept
    for callers of the earlier signature."""
    return table.resolve(name)


__all__ = ["AxisRF", "LayerRF", "RFTable", "TracedGraph", "clip_box", "conv_out_size", "pool_out_size",
           "receptive_fields", "resolve_layer", "table_from_traced", "trace_graph"]
