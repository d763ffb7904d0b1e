"""Exact incremental occlusion (docs/method.md section 7): recompute only what an occluder changes.

A square covering input rows ``[a, b)`` changes only the units of a layer whose receptive field
meets it: rows ``y`` with ``start + y*j + (r-1)/2 >= a`` and ``start + y*j - (r-1)/2 <= b-1``
(columns alike), read off the receptive-field table of the same trace
(:class:`deconvis.graph.rf.RFTable`). Every other activation equals the unoccluded one, exactly.

:class:`IncrementalOcclusion` runs the clean image once, keeping every node's value, then for a
batch of B square positions interprets the graph with each 4-D node held as a *window*: a
``[B, C, h, w]`` block of the map at a per-square origin (rows ``[oy, oy+h)``, columns
``[ox, ox+w)``) that contains the changed units; outside it the map is the clean one. A node's
window is computed from its inputs' values over the region its window needs: a conv or pool
reads the clean map (padded as the op pads: zeros, or -inf for max-pools), with the input's
window pasted over it, and runs with no padding; per-position ops (ReLU, eval BatchNorm, LRN,
dropout) and aligned merges (residual add, product with a per-channel constant, concat along
channels) run on the window itself. A node whose window is its whole map (deep layers, where
every unit's receptive field meets the square) runs the op itself on the whole maps, with no
gathers. The receptive-field rows take their shapes from the clean pass.

Nodes whose units see the whole image (global pooling, flatten, Linear) are computed in full
for the batch, on the small maps near the top. So is every node downstream of one (its
:attr:`IncrementalOcclusion.spread`): a squeeze-excitation gate ``x * sigmoid(fc(mean(x)))``
broadcasts a global reduction back onto a map, so after it every unit of every later map
differs from the clean one and there is no window to recompute. Ops that cannot be windowed
(the same set as the windowed deconvnet, :func:`deconvis.mirror.window.windowable`: pads, permutes, adaptive pools
that are not global, unaligned branches) are also computed in full for the batch, from the
materialised maps of their inputs: :attr:`IncrementalOcclusion.fallback` names them.

The result equals the naive forward of every occluded copy up to float round-off (the same ops
on the same numbers, summed in a different order by the conv kernels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from deconvis.errors import DeconvisError
from deconvis.graph.rf import LayerRF, RFTable, table_from_traced
from deconvis.graph.trace import TracedGraph, trace_graph
from deconvis.mirror.engine import Mirror, depends_on_signal
from deconvis.mirror.window import windowable

Node = torch.fx.Node
Pair = Tuple[int, int]


#: op kinds whose result does not depend on the memory layout of their input
_ANY_LAYOUT = frozenset({"conv", "maxpool", "avgpool", "relu", "bn"})


@dataclass
class _Win:
    """A 4-D node's value for B squares: ``value`` [B, C, h, w] holds map rows ``[oy, oy+h)`` and
    columns ``[ox, ox+w)`` (``oy``, ``ox`` LongTensor [B]); elsewhere the map is clean."""

    value: Tensor
    oy: Tensor
    ox: Tensor


@dataclass
class OcclusionBatch:
    """What one batch of squares gives: ``logits`` [B, K] of the model output and, per requested
    layer, the total activation of every channel ``sums[layer]`` [B, C] (summed over space)."""

    logits: Tensor
    sums: Dict[str, Tensor]


def changed_range(row: LayerRF, axis: int, lo_px: Tensor, hi_px: Tensor) -> Tuple[Tensor, Tensor]:
    """Half-open unit range [lo, hi) of ``row`` along ``axis`` (0 = height) whose receptive field
    meets the input pixels [lo_px, hi_px) (LongTensors [B]), clipped to the map. Exact integer
    arithmetic on doubled coordinates (starts are half-integers)."""
    r, j, n = row.rf[axis], row.jump[axis], row.out[axis]
    s2 = int(round(2 * row.start[axis]))
    # y >= (2a - (r-1) - 2 start) / 2j  and  y <= (2(b-1) + (r-1) - 2 start) / 2j
    num_lo = 2 * lo_px - (r - 1) - s2
    lo = torch.div(num_lo + (2 * j - 1), 2 * j, rounding_mode="floor")
    hi = torch.div(2 * (hi_px - 1) + (r - 1) - s2, 2 * j, rounding_mode="floor") + 1
    return lo.clamp(0, n), hi.clamp(0, n)


def conv_macs(node_out: Tensor, module: nn.Module) -> int:
    """Multiply-adds of a Conv2d or Linear producing ``node_out`` (all of its batch)."""
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return int(node_out.numel()) * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return int(node_out.numel()) * module.in_features
    return 0


class IncrementalOcclusion:
    """Occlude one image [1, C, H, W] with a square of ``size`` (h, w) pixels at many positions.

    ``layers``: layers (row, container or alias names) whose per-channel total activation
    :meth:`run` returns beside the logits. The model is traced once (or pass ``graph`` and
    ``table`` of an existing trace, e.g. a :class:`~deconvis.mirror.deconvnet.DeconvNet`'s);
    dtype and device follow ``image``. The model is not changed; its forward has eval semantics.
    """

    def __init__(self, model: nn.Module, image: Tensor, size: Pair, layers: Sequence[str] = (),
                 graph: Optional[TracedGraph] = None, table: Optional[RFTable] = None,
                 mirror: Optional[Mirror] = None):
        if image.dim() != 4 or image.shape[0] != 1:
            raise DeconvisError(f"the image must have shape [1, C, H, W], got {list(image.shape)}")
        self.tg = graph if graph is not None else trace_graph(model)
        self.mirror = mirror if mirror is not None else Mirror(self.tg)
        self.H, self.W = int(image.shape[-2]), int(image.shape[-1])
        self.size = (int(size[0]), int(size[1]))
        self.layers = [self.tg.resolve(l) for l in layers]
        out_node = next(n for n in self.tg.graph_module.graph.nodes if n.op == "output")
        out = out_node.args[0]
        if not (isinstance(out, Node) and out in self.tg.signal):
            raise DeconvisError(f"{self.tg.model_name} must return one tensor of class scores [N, K] "
                                "to be occluded; wrap it so forward returns the logits")
        self.output = out
        with torch.no_grad():
            self.clean, _ = self.mirror.run(image, None, record=False,
                                            keep=[n for n in self.tg.graph_module.graph.nodes])
        try:  # shapes from the clean pass: no separate shape pass
            self.table: Optional[RFTable] = table if table is not None else \
                table_from_traced(self.tg, (self.H, self.W), int(image.shape[1]), values=self.clean)
        except DeconvisError:  # no geometry for this graph: every node runs in full
            self.table = None
        targets = [self.output] + [self.tg.node(l) for l in self.layers]
        needed: Set[Node] = set()
        for t in targets:
            needed.update(self.mirror.ancestors(t))
        self.order: List[Node] = [n for n in self.mirror.order if n in needed]
        self.windowed: Dict[Node, LayerRF] = {}
        self.whole: List[str] = []
        self.fallback: List[str] = []
        self.identity: Set[Node] = set()
        self.spread: Set[Node] = set()
        for n in self.order:
            if n.op == "placeholder":
                continue
            row = self._row(n)
            # A node that reads a global reduction (global pool, mean over space, Linear) changes
            # everywhere when any input pixel changes; so does every node that reads such a node:
            # after a gate (x * sigmoid(fc(mean(x)))) the whole map differs from the clean one.
            # Taken from the RF table's whole flag and, independently, from the inputs' spread.
            if (row is not None and row.whole) or any(a in self.spread for a in self.mirror.node_inputs.get(n, [])):
                self.spread.add(n)
            if row is not None and self._identity_pool(n):
                self.identity.add(n)
            if row is not None and n not in self.spread \
                    and (n in self.identity or windowable(self.mirror, n, self.clean)) \
                    and tuple(row.out) == tuple(self.clean[n].shape[-2:]):
                self.windowed[n] = row
            elif n in self.spread:
                self.whole.append(self.tg.row_names[n])
            else:
                self.fallback.append(self.tg.row_names[n])
        self._padded: Dict[Tuple[Node, Tuple[int, int, int, int], float], Tensor] = {}
        self.macs_naive_per_image = sum(conv_macs(self.clean[n], self.tg.module(n)) for n in self.order
                                        if self.tg.module(n) is not None)
        self.macs_done = 0
        self.squares_done = 0

    # ------------------------------------------------------------------------ geometry
    def _row(self, n: Node) -> Optional[LayerRF]:
        if self.table is None:
            return None
        name = self.tg.row_names.get(n)
        return self.table.by_name.get(name) if name is not None else None

    def _identity_pool(self, n: Node) -> bool:
        """An adaptive pool whose output size is its input size (AlexNet's and VGG's at 224 px)."""
        m = self.tg.module(n)
        ins = self.mirror.node_inputs.get(n, [])
        if not isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or len(ins) != 1:
            return False
        a, b = self.clean.get(ins[0]), self.clean.get(n)
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() == 4 and a.shape == b.shape

    def check_positions(self, tops: Tensor) -> None:
        """DeconvisError unless every square (top-left ``tops`` [B, 2]) lies inside the image."""
        h, w = self.size
        if h < 1 or w < 1 or h > self.H or w > self.W:
            raise DeconvisError(f"square {h}x{w} px does not fit the {self.H}x{self.W} image; use a side "
                                f"between 1 and {min(self.H, self.W)}")
        bad = (tops[:, 0] < 0) | (tops[:, 1] < 0) | (tops[:, 0] + h > self.H) | (tops[:, 1] + w > self.W)
        if bool(bad.any()):
            raise DeconvisError(f"square at {tops[bad][0].tolist()} runs past the {self.H}x{self.W} image")

    # ----------------------------------------------------------------------- regions
    def _padded_clean(self, n: Node, pad: Tuple[int, int, int, int], value: float) -> Tensor:
        """Clean map of ``n`` padded with ``value``, channels last: [H+top+bottom, W+left+right, C]."""
        key = (n, pad, value)
        if key not in self._padded:
            top, bottom, left, right = pad
            padded = F.pad(self.clean[n][0], (left, right, top, bottom), value=value)
            self._padded[key] = padded.permute(1, 2, 0).contiguous()
        return self._padded[key]

    def _region(self, win: _Win, n: Node, r0: Tensor, c0: Tensor, h: int, w: int,
                pad: Tuple[int, int, int, int] = (0, 0, 0, 0), value: float = 0.0) -> Tensor:
        """Map of ``n`` over rows [r0, r0+h), columns [c0, c0+w) per square (may reach ``pad``
        into the op's padding, filled with ``value``): [B, C, h, w]."""
        v = win.value
        if pad == (0, 0, 0, 0) and v.shape[-2:] == (h, w) and torch.equal(win.oy, r0) and torch.equal(win.ox, c0):
            return v
        base = self._padded_clean(n, pad, value)
        # one gather of B blocks [C, h, w] from the view of every h x w window of the channels-last
        # map: [B, C, h, w] in channels-last layout, far cheaper on CPU than B slice copies or
        # per-element indexing
        blocks = base.unfold(0, h, 1).unfold(1, w, 1)  # [Hp-h+1, Wp-w+1, C, h, w], a view
        crop = blocks[r0 + pad[0], c0 + pad[2]]
        dy, dx = win.oy - r0, win.ox - c0
        hs, ws = v.shape[-2:]
        if bool((dy == dy[0]).all()) and bool((dx == dx[0]).all()):  # the usual case: one slice copy
            pairs = [(int(dy[0]), int(dx[0]))]
            rows = [slice(None)]
        else:  # windows clamped at the map's border: square by square
            pairs = list(zip(dy.tolist(), dx.tolist()))
            rows = list(range(len(pairs)))
        for b, (oy, ox) in zip(rows, pairs):
            y0, y1, x0, x1 = max(oy, 0), min(oy + hs, h), max(ox, 0), min(ox + ws, w)
            if y1 > y0 and x1 > x0:
                crop[b, :, y0:y1, x0:x1] = v[b, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        return crop

    def _full(self, win: _Win, n: Node) -> Tensor:
        """The whole map of ``n`` for every square: [B, C, H, W]."""
        B = win.value.shape[0]
        zeros = torch.zeros(B, dtype=torch.long, device=win.oy.device)
        H, W = self.clean[n].shape[-2:]
        return self._region(win, n, zeros, zeros, H, W)

    # ---------------------------------------------------------------------- one batch
    @torch.no_grad()
    def run(self, tops: Tensor, fill: Tensor) -> OcclusionBatch:
        """Occlude squares with top-left corners ``tops`` [B, 2] (y, x pixels) by ``fill`` [C]
        (one value per input channel, in the model's input space)."""
        tops = tops.to(device=self.clean[self.tg.input_node].device, dtype=torch.long)
        self.check_positions(tops)
        B = tops.shape[0]
        x = self.clean[self.tg.input_node]
        state: Dict[Node, Any] = {}
        h, w = self.size
        state[self.tg.input_node] = _Win(fill.to(x)[None, :, None, None].expand(B, -1, h, w),
                                         tops[:, 0].clone(), tops[:, 1].clone())
        lo_y, hi_y = tops[:, 0], tops[:, 0] + h
        lo_x, hi_x = tops[:, 1], tops[:, 1] + w
        memo: Dict[Node, Any] = {}
        for n in self.order:
            if n.op == "placeholder":
                continue
            if n in self.windowed:
                state[n] = self._windowed(n, state, (lo_y, hi_y, lo_x, hi_x))
            else:
                state[n] = self._in_full(n, state, B, memo)
        out = state[self.output]
        logits = self._full(out, self.output) if isinstance(out, _Win) else out
        sums = {}
        for name in self.layers:
            n = self.tg.node(name)
            s = state[n]
            if isinstance(s, _Win):
                c = self.clean[n]
                hh, ww = s.value.shape[-2:]
                empty = _Win(s.value[:, :, :0, :0], s.oy, s.ox)  # nothing pasted: the clean block
                clean_win = self._region(empty, n, s.oy, s.ox, hh, ww)
                sums[name] = c.sum((2, 3)) - clean_win.sum((2, 3)) + s.value.sum((2, 3))
            else:
                sums[name] = s.reshape(s.shape[0], s.shape[1], -1).sum(-1)
        self.squares_done += B
        return OcclusionBatch(logits=logits.reshape(B, -1), sums=sums)

    def _args(self, n: Node, value_of: Any, B: int, memo: Dict[Node, Any]) -> Tuple[tuple, dict]:
        def arg(a: Node) -> Any:
            if a in self.tg.signal:
                return value_of(a)
            if a.op in ("call_function", "call_method") and depends_on_signal(a, self.tg):
                return self.mirror.aux_value(a, self.clean, B, memo)  # shape queries see the batch of B
            return self.clean[a]
        return torch.fx.node.map_arg(n.args, arg), torch.fx.node.map_arg(n.kwargs, arg)

    def _in_full(self, n: Node, state: Dict[Node, Any], B: int, memo: Dict[Node, Any]) -> Any:
        """Node ``n`` computed on the whole maps of the batch (whole-image units and fallbacks)."""
        op = self.mirror.ops.get(n)
        any_layout = op is not None and op.kind in _ANY_LAYOUT

        def whole(a: Node) -> Any:
            if not isinstance(state[a], _Win):
                return state[a]
            v = self._full(state[a], a)
            # windows are gathered channels-last; a view or reshape needs the layout the plain forward has
            return v if any_layout else v.contiguous()

        args, kwargs = self._args(n, whole, B, memo)
        val = self.mirror.forward_node(n, args, kwargs, record=False, switches={})
        self._count(n, val, None)
        if isinstance(val, Tensor) and val.dim() == 4:
            zeros = torch.zeros(B, dtype=torch.long, device=val.device)
            return _Win(val, zeros, zeros)
        return val

    def _windowed(self, n: Node, state: Dict[Node, Any], square: Tuple[Tensor, ...]) -> _Win:
        row = self.windowed[n]
        lo_y, hi_y, lo_x, hi_x = square
        Hn, Wn = self.clean[n].shape[-2:]
        ly, hy = changed_range(row, 0, lo_y, hi_y)
        lx, hx = changed_range(row, 1, lo_x, hi_x)
        h = max(int((hy - ly).max()), 1)
        w = max(int((hx - lx).max()), 1)
        if h >= Hn and w >= Wn:  # the window is the whole map: the op itself, on whole maps, no gathers
            return self._in_full(n, state, int(lo_y.shape[0]), {})
        oy = ly.clamp(max=Hn - h)
        ox = lx.clamp(max=Wn - w)
        op = self.mirror.ops[n]
        ins = self.mirror.node_inputs[n]
        if op.kind in ("conv", "maxpool", "avgpool"):
            win = op.win
            k, s, p, d = win["k"], win["s"], win["p"], win["d"]
            rh, rw = (h - 1) * s[0] + (k[0] - 1) * d[0] + 1, (w - 1) * s[1] + (k[1] - 1) * d[1] + 1
            pad = (p[0], p[0] + s[0], p[1], p[1] + s[1])
            value = float("-inf") if op.kind == "maxpool" else 0.0
            xin = self._region(state[ins[0]], ins[0], oy * s[0] - p[0], ox * s[1] - p[1], rh, rw, pad, value)
            if op.kind == "conv":
                m = op.module
                val = F.conv2d(xin, m.weight, m.bias, s, 0, d, m.groups)
            elif op.kind == "maxpool":
                val = F.max_pool2d(xin, k, s, 0, d)
            else:
                val = F.avg_pool2d(xin, k, s, 0, divisor_override=op.module.divisor_override)
        elif n in self.identity:
            val = self._region(state[ins[0]], ins[0], oy, ox, h, w)
        else:
            args, kwargs = self._args(n, lambda a: self._region(state[a], a, oy, ox, h, w), oy.shape[0], {})
            val = self.mirror.forward_node(n, args, kwargs, record=False, switches={})
        self._count(n, val, None)
        return _Win(val, oy, ox)

    def _count(self, n: Node, val: Any, _unused: Any) -> None:
        m = self.tg.module(n)
        if m is not None and isinstance(val, Tensor):
            self.macs_done += conv_macs(val, m)

    @property
    def bound(self) -> float:
        """Arithmetic bound: multiply-adds of the naive forwards of the squares run so far over
        those performed (convs and Linears)."""
        return self.macs_naive_per_image * self.squares_done / max(self.macs_done, 1)


__all__ = ["IncrementalOcclusion", "OcclusionBatch", "changed_range", "conv_macs"]
