"""One typed record per visualised layer, built once when the run is prepared and passed along.

A :class:`LayerSpec` says everything the phases need about a layer: its step name in the traced
model (what the deconvnet and the top-k search index by), the label shown to people (``conv1``),
its channel counts, the size of its map, and its receptive-field geometry at the run's input size
(:meth:`deconvis.mirror.deconvnet.DeconvNet.receptive_fields`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from deconvis.errors import DeconvisError

Pair = Tuple[int, int]


@dataclass(frozen=True)
class LayerSpec:
    """A layer of the run. ``map_size``: [h, w] units of its output ((1, 1) for a vector);
    ``channels``: how many of its ``channels_total`` are visualised; ``rf_size``: the (h, w) of its
    receptive field in input pixels, None when the model has no RF table."""

    name: str
    label: str
    channels_total: int
    channels: int
    map_size: Pair
    input_size: Pair
    rf_size: Optional[Pair] = None
    _table: object = None  # the RFTable the geometry comes from (None: no table for this graph)

    def crop_box(self, y: int, x: int) -> Tuple[Tuple[int, int, int, int], Tuple[int, int, int, int]]:
        """The image patch shown beside unit (y, x)'s projection: (box clipped to the image,
        pad (top, bottom, left, right)), half-open, input pixels. The whole image without a table."""
        if self._table is None:
            h, w = self.input_size
            return (0, h, 0, w), (0, 0, 0, 0)
        return self._table.crop_box(self.name, y, x)  # type: ignore[attr-defined]


def layer_specs(dn, names: Sequence[str], acts, input_size: Pair, channels: Optional[int]) -> List[LayerSpec]:
    """The specs of ``names`` (step names) from one forward's activations ``acts`` (``{name:
    [N, C, h, w] or [N, C]}``); DeconvisError for a layer whose output is not a map or a vector."""
    try:
        table = dn.receptive_fields(tuple(input_size))
    except DeconvisError:  # no RF table for this graph: projections take the full path
        table = None
    specs = []
    for name in names:
        a = acts[name]
        if a.dim() not in (2, 4):
            raise DeconvisError(f"layer {name!r} has output shape {list(a.shape)}; choose layers with [N, C, h, w] maps")
        total = int(a.shape[1])
        rf = tuple(int(v) for v in table[name].rf) if table is not None else None
        specs.append(LayerSpec(name=name, label=dn.display_name(name), channels_total=total,
                               channels=min(total, channels) if channels else total,
                               map_size=(int(a.shape[2]), int(a.shape[3])) if a.dim() == 4 else (1, 1),
                               input_size=(int(input_size[0]), int(input_size[1])), rf_size=rf, _table=table))
    return specs
