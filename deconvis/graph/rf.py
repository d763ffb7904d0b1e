"""Theoretical receptive-field geometry of a CNN (docs/method.md section 3), from its torch.fx graph.

The public entry points; the records live in :mod:`deconvis.graph.rf_geometry`, the shape pass in
:mod:`deconvis.graph.rf_shapes` and the graph walk in :mod:`deconvis.graph.rf_walk`.

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

from typing import Any, Mapping, Optional, Sequence, Union

import torch.fx
from torch import nn

from deconvis.errors import DeconvisError
from deconvis.graph.ops import Pair, kind_name
from deconvis.graph.rf_geometry import (AxisRF, Box, LayerRF, RFTable, clip_box, conv_out_size,
                                        pool_out_size)
from deconvis.graph.rf_shapes import propagate, shape_of
from deconvis.graph.rf_walk import Walker
from deconvis.graph.trace import TracedGraph, trace_graph


def size_pair(input_size: Union[int, Sequence[int]]) -> Pair:
    """An input size (int or (height, width), pixels) as a validated (h, w) pair; DeconvisError otherwise."""
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


def table_from_traced(tg: TracedGraph, input_size: Union[int, Sequence[int]], in_channels: int = 3,
                      values: Optional[Mapping[torch.fx.Node, Any]] = None) -> RFTable:
    """:func:`receptive_fields` for an already traced model. ``values``: every node's value from
    a forward of one [1, in_channels, H, W] image that the caller already ran (eval semantics),
    to read the shapes from instead of running the shape pass."""
    size = size_pair(input_size)
    shapes = {n: shape_of(v) for n, v in values.items()} if values is not None else propagate(tg, size, in_channels)
    rows = Walker(tg, shapes, size).walk()
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


__all__ = ["AxisRF", "Box", "LayerRF", "RFTable", "TracedGraph", "clip_box", "conv_out_size", "pool_out_size",
           "receptive_fields", "resolve_layer", "table_from_traced", "trace_graph"]
