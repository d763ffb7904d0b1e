"""The local backward rules of the mirror that are more than one line: the ReLU-family rule of
:class:`~deconvis.mirror.rules.Rule`, PReLU slopes, sums over broadcast dims, and the bookkeeping
of per-node signals (accumulating branches, pairing outputs with their signals).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from deconvis.graph import ops
from deconvis.mirror.classify import Node, Op
from deconvis.mirror.rules import Rule

def bn_scale(bn: nn.Module) -> Tensor:
    """An eval BatchNorm's per-channel scale ``weight / sqrt(running_var + eps)`` [C] (its mirror)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return scale * bn.weight if bn.weight is not None else scale


def reduce_to(g: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum ``g`` over the dims that broadcasting expanded, so it has ``shape`` (batch dim kept)."""
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    while g.dim() > len(shape):
        g = g.sum(0)
    dims = [i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1]
    return g.sum(dims, keepdim=True) if dims else g


def relu_rule(unit: ops.ReluUnit, g: Tensor, x: Optional[Tensor], rule: Rule, slope: Optional[Tensor],
              inplace: bool = False) -> Tensor:
    """The ReLU-family backward of :mod:`deconvis.mirror.rules` for signal ``g`` at forward input ``x``;
    ``inplace``: ``g`` belongs to the caller alone and may be overwritten (ReLU and ReLU6)."""
    if unit.kind in ("relu", "relu6"):
        if rule is Rule.DECONVNET:
            return g.clamp_(min=0) if inplace else g.clamp(min=0)
        on = (x > 0) if unit.kind == "relu" else ((x > 0) & (x < 6))
        if inplace:
            return (g.clamp_(min=0) if rule is Rule.GUIDED else g).mul_(on)
        return (g.clamp(min=0) if rule is Rule.GUIDED else g) * on
    a = slope if slope is not None else unit.slope
    if rule is Rule.DECONVNET:
        return torch.where(g > 0, g, a * g)
    s = torch.where(x > 0, torch.ones_like(x), a * torch.ones_like(x))
    return (g.clamp(min=0) if rule is Rule.GUIDED else g) * s


def prelu_slope(op: Op, node: Node, env: Dict[Node, Any], ndim: int) -> Optional[Tensor]:
    """The PReLU slope of ``op`` shaped to broadcast over an ``ndim``-dim input; None for other units."""
    if op.unit is None or op.unit.kind != "prelu":
        return None
    w = op.module.weight if op.module is not None else env[op.unit.weight] if isinstance(op.unit.weight, Node) \
        else op.unit.weight
    if w.numel() == 1:
        return w.reshape(())
    return w.reshape((1, -1) + (1,) * (ndim - 2))


def grad_pairs(out: Any, g: Any) -> Tuple[List[Tensor], List[Tensor]]:
    """(outputs, gradients) of a node output (tensor or tuple) that require grad, for ``torch.autograd.grad``."""
    if isinstance(out, Tensor):
        return ([out], [g]) if out.requires_grad else ([], [])
    outs, gs = [], []
    for o, gi in zip(out, g):
        if gi is not None and isinstance(o, Tensor) and o.requires_grad:
            outs.append(o)
            gs.append(gi)
    return outs, gs


def accumulate_grad(grads: Dict[Node, Any], node: Node, g: Any, owned: Optional[Dict[Node, bool]] = None,
                    fresh: bool = False) -> None:
    """Add gradient ``g`` (tensor or tuple, None entries skipped) into ``grads[node]`` (branches
    that meet sum). With ``owned`` (node -> the signal belongs to the backward alone, so it may be
    written in place), ``fresh`` says whether ``g`` does; the sum is then formed in place where one
    side is owned."""
    if node not in grads:
        grads[node] = g
        if owned is not None:
            owned[node] = fresh and isinstance(g, Tensor)
        return
    cur = grads[node]
    if isinstance(cur, tuple) or isinstance(g, tuple):
        grads[node] = tuple(a if b is None else (b if a is None else a + b) for a, b in zip(cur, g))
        if owned is not None:
            owned[node] = False
        return
    if owned is not None and cur.shape == g.shape and cur.dtype == g.dtype:
        if owned.get(node, False):
            grads[node] = cur.add_(g)
            return
        if fresh:
            grads[node] = g.add_(cur)
            owned[node] = True
            return
    grads[node] = cur + g
    if owned is not None:
        owned[node] = True
