"""The torch.fx walk that fills the receptive-field rows: one geometry (:class:`_Geo`) per node,
from its inputs' geometry and the op (window, padding, reshape, merge, whole-image op, ...), in
execution order. Shapes come from :func:`deconvis.graph.rf_shapes.propagate`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from deconvis.errors import DeconvisError
from deconvis.graph.ops import (CAT_FUNCS, MERGE_FUNCS, MERGE_METHODS, NON_TENSOR_METHODS, PASS_FUNCS,
                                PASS_METHODS, PASS_MODULES, RESHAPE_FUNCS, RESHAPE_METHODS, SPLIT_FUNCS,
                                SPLIT_METHODS, WHOLE_FUNCS, WHOLE_MODULES, Pair, node_arg, kind_name,
                                window_params)
from deconvis.graph.rf_geometry import AxisRF, as_number
from deconvis.graph.trace import TracedGraph

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


class Walker:
    """One walk over a traced graph that computes each node's receptive-field geometry (used by
    :func:`deconvis.graph.rf.table_from_traced`)."""

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

        if is_meth and t in NON_TENSOR_METHODS:
            return first
        # anything computed from inputs that already see their whole region sees it too
        if all(g.whole for _, g in ins):
            res = _whole([g for _, g in ins], self.size, out)
            if ((is_meth and t == "permute") or (is_fn and t is torch.permute)) and _dims(node) == [0, 2, 3, 1] \
                    and isinstance(shape, tuple) and len(shape) == 4:  # a whole map to channels-last [N, H, W, C]
                res = replace(res, cl=True, out=(int(shape[1]), int(shape[2])))
            return res
        if (is_fn and t in MERGE_FUNCS) or (is_meth and t in MERGE_METHODS):
            return self.merge(node, ins, shape, out)
        if len(ins) > 1:  # several input-dependent tensors into one op that is not a known merge
            if any(g.whole for _, g in ins) or (is_fn and t in WHOLE_FUNCS) or isinstance(module, WHOLE_MODULES):
                return _whole([g for _, g in ins], self.size, out)
            raise self.unknown(node)

        win = window_params(node, self.gm, self.shapes)
        if win is not None:
            return self.window(node, first, win, out)
        if module is not None:
            if isinstance(module, PASS_MODULES):
                return self.passthrough(node, first, shape, out)
            if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
                left, _right, top, _bottom = module.padding
                return self.pad(node, first, top, left, out)
            if isinstance(module, (nn.Flatten, nn.Unflatten)):
                return self.reshape(first, shape, out)
            if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                return self.adaptive(node, first, shape, out)
            if isinstance(module, WHOLE_MODULES):
                return _whole([g for _, g in ins], self.size, out)
            raise self.unknown(node)
        if is_fn:
            if t in PASS_FUNCS:
                return self.passthrough(node, first, shape, out)
            if t in RESHAPE_FUNCS:
                return self.reshape(first, shape, out)
            if t in WHOLE_FUNCS:
                return _whole([g for _, g in ins], self.size, out)
            if t in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d) or \
                    getattr(t, "__name__", "") in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
                return self.adaptive(node, first, shape, out)
            if t is F.pad:
                pad = list(node_arg(node, 1, "pad"))
                mode = node_arg(node, 2, "mode", "constant")
                if mode != "constant" or len(pad) not in (2, 4):
                    raise self.fail(node, f"F.pad with mode {mode!r} and pad {pad} is not supported "
                                          "(only constant padding of the last two dims)")
                top = pad[2] if len(pad) == 4 else 0
                return self.pad(node, first, top, pad[0], out)
            if t is operator.getitem:
                return self.getitem(node, first, shape)
            if t in SPLIT_FUNCS:
                return self.split(node, first, node_arg(node, 2, "dim", 0))
        if is_meth:
            if t in PASS_METHODS:
                return self.passthrough(node, first, shape, out)
            if t in RESHAPE_METHODS:
                return self.reshape(first, shape, out)
            if t in SPLIT_METHODS:
                return self.split(node, first, node_arg(node, 2, "dim", 0))
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
            isinstance(module, PASS_MODULES + (nn.Linear,))
            or (isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1)
            or (is_fn and (t in PASS_FUNCS or t is F.linear or (t is F.layer_norm and len(node_arg(node, 1, "normalized_shape")) == 1)))
            or (is_meth and t in PASS_METHODS))
        if per_position and len(ins) == 1 and same:
            return g
        if ((is_fn and t in MERGE_FUNCS) or (is_meth and t in MERGE_METHODS)) and same \
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
        if t in CAT_FUNCS:
            dim = node_arg(node, 1, "dim", 0)
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
                    raise self.fail(node, f"branches {self.name(a_node)} (jump {x.j}, start {as_number(float(x.start))}) "
                                          f"and {self.name(b_node)} (jump {y.j}, start {as_number(float(y.start))}) "
                                          f"disagree along the {axis}; their units are not aligned")
        h = max((g.h for _, g in ins), key=lambda ax: ax.r)
        w = max((g.w for _, g in ins), key=lambda ax: ax.r)
        if _spatial(shape) is not None and _spatial(shape) != a.out:
            raise self.fail(node, f"merged map has size {_spatial(shape)}, not {a.out}")
        return _Geo(h, w, a.out)
