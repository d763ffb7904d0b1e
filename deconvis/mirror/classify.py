"""How the mirror treats each signal node of a traced graph: :func:`classify` gives its :class:`Op`
(input, ReLU-family unit, conv, max/avg pool, BatchNorm, skipped op, Linear, reshape, add, sub, mul,
cat, or generic: the exact local derivative by autograd), which :class:`deconvis.mirror.engine.Mirror`
uses for both its forward and its backward.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from deconvis.errors import DeconvisError
from deconvis.graph import ops
from deconvis.graph.trace import TracedGraph

Node = torch.fx.Node

_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_CAT = ops.CAT_FUNCS
_SKIP_FUNCS = {F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout,
               F.local_response_norm}
_SKIP_METHODS = {"contiguous", "clone", "detach"}
RESHAPE_METHODS = {"view", "reshape", "flatten"}
RESHAPE_FUNCS = {torch.flatten, torch.reshape}
_LRN = (nn.LocalResponseNorm, nn.CrossMapLRN2d)
#: dropout modules: identity at eval, so the mirror passes the signal through
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass(frozen=True)
class Op:
    """How the mirror treats one signal node: ``kind`` is one of input, relu, conv, maxpool,
    avgpool, bn, skip, linear, reshape, add, sub, mul, cat, generic; ``unit`` the ReLU-family
    unit; ``win`` kernel/stride/padding/dilation pairs of conv and pools."""

    kind: str
    unit: Optional[ops.ReluUnit] = None
    win: Optional[Dict[str, Any]] = None
    module: Optional[nn.Module] = None


def classify(node: Node, tg: TracedGraph) -> Op:
    """The :class:`Op` of a signal node."""
    gm = tg.graph_module
    if node.op == "placeholder":
        return Op("input")
    unit = ops.relu_unit(node, gm)
    if unit is not None:
        return Op("relu", unit=unit, module=tg.module(node))
    t = node.target
    m = tg.module(node)
    if m is not None:
        if isinstance(m, nn.Conv2d):
            win = ops.window_params(node, gm, {})
            same_even = m.padding == "same" and any(k % 2 == 0 for k in win["k"])
            if m.padding_mode == "zeros" and not same_even:
                return Op("conv", win=win, module=m)
            return Op("generic", module=m)
        if isinstance(m, nn.MaxPool2d) and not m.return_indices:
            return Op("maxpool", win=ops.window_params(node, gm, {}), module=m)
        if isinstance(m, nn.AvgPool2d):
            return Op("avgpool", win=ops.window_params(node, gm, {}), module=m)
        if isinstance(m, nn.BatchNorm2d):
            if not m.track_running_stats or m.running_var is None:
                raise DeconvisError(f"{tg.row_names[node]!r} (BatchNorm2d) keeps no running statistics, so it "
                                    "has no eval-mode form to mirror; build it with track_running_stats=True")
            return Op("bn", module=m)
        if isinstance(m, DROPOUT + _LRN + (nn.Identity,)):
            return Op("skip", module=m)
        if isinstance(m, nn.Linear):
            return Op("linear", module=m)
        if isinstance(m, (nn.Flatten,)):
            return Op("reshape", module=m)
        return Op("generic", module=m)
    if node.op == "call_function":
        if t in _SKIP_FUNCS:
            return Op("skip")
        name = getattr(t, "__name__", "")
        if (t in (F.max_pool2d, torch.max_pool2d) or name == "max_pool2d") and not ops.node_arg(
                node, 6, "return_indices", False):
            return Op("maxpool", win=ops.window_params(node, gm, {}))
        if t in RESHAPE_FUNCS:
            return Op("reshape")
        if t in _CAT:
            return Op("cat")
    key = t if node.op == "call_function" else (t if node.op == "call_method" else None)
    if node.op == "call_method" and t in _SKIP_METHODS:
        return Op("skip")
    if node.op == "call_method" and t in RESHAPE_METHODS:
        return Op("reshape")
    if key in _ADD and not node.kwargs:
        return Op("add")
    if key in _SUB and not node.kwargs:
        return Op("sub")
    if key in _MUL and not node.kwargs:
        return Op("mul")
    return Op("generic")
