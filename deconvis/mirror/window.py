"""The windowed mirror: each unit carries only its receptive-field cone down the graph.

A unit ``u = (y, x)`` of the target layer can only reach the positions of node ``n``'s map that
lie in its *cone*: per axis the range ``[u*J - P, u*J - P + R)`` of ``n``'s units. Cones are
propagated down from the target (``J = 1, P = 0, R = 1``): a conv or pool of kernel ``k``, stride
``s``, padding ``p``, dilation ``d`` reads ``[u*J*s - (P*s + p), ... + (R-1)*s + (k-1)*d + 1)`` of
its input, and a node read by several consumers (both branches of a residual add, a concat) gets
the hull of their footprints; they must agree on the jump. On a chain this is the RF recurrence
of :mod:`deconvis.graph.rf`: ``J = j_L / j_n``, ``R = (r_L - r_n) / j_n + 1``. Where a cone is at least
as large as the map, the window is the whole map along that axis (origin 0), so deep layers of
big networks cost no more than the full path.

The windowed backward gives, inside each unit's window, exactly the numbers of the full
backward (:meth:`deconvis.mirror.engine.Mirror.backward`); outside it the full backward is zero.
Graphs with ops outside the windowed set (gates whose field is the whole image, reshapes,
permutes, pads) are left to the full path: :func:`plan_window` returns None for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from deconvis.graph import ops
from deconvis.graph.rf import RFTable
from deconvis.mirror.engine import Mirror, relu_rule, prelu_slope, reduce_to, bn_scale
from deconvis.mirror.rules import Rule
from deconvis.mirror.tconv import conv_transpose, cpu_channels_last

Node = torch.fx.Node
Affine = Tuple[int, int]  # origin = a * u + b (u: the target unit's index along the axis)

_ELEMENTWISE = {"generic"}
#: ops whose windowed backward can write outside the map (a transposed conv reaches into the
#: padding; an autograd derivative is taken at clamped positions): their inputs take the map mask
_SPREADING = {"conv", "avgpool", "generic"}
#: on the CPU, zero the off-map parts of windows block by block (one slice per strip of a unit
#: that reaches past the map) rather than by a product with a mask over every window
ZERO_BY_BLOCKS = True
#: zero the off-map blocks of equal extent across units with one ``index_fill_`` each (a few dozen
#: ops per node) rather than one slice assignment per block (about a thousand on AlexNet's conv5)
GROUP_STRIPS = True
#: on the CPU, the unpools write into buffers kept on the mirror from call to call (their zeroed
#: outputs and switch indices, :meth:`Mirror.scratch`) instead of fresh ones: fresh buffers of
#: tens of MB are mapped anew by the allocator and page-fault in on every call (AlexNet conv3's
#: windowed projection: 1.17x faster on one thread). A result that would share a buffer is copied
REUSE_BUFFERS = True
#: on the CPU, carry float32/16 windows channels-last ([M, h, w, C] in memory) through the
#: transposed convs and unpools: oneDNN runs small-window, many-channel convs faster so, and the
#: switch gather already yields that layout (:data:`deconvis.mirror.tconv.CHANNELS_LAST_DTYPES`)
CHANNELS_LAST = True


@dataclass(frozen=True)
class AxisWindow:
    """One axis of a node's window: origin ``a*u + b`` (``a`` = 0 for a whole-map axis), ``size``
    positions; ``J``, ``P``, ``R`` the cone (see the module docstring)."""

    a: int
    b: int
    size: int
    J: int
    P: int
    R: int

    @property
    def full(self) -> bool:
        return self.a == 0


@dataclass
class WindowPlan:
    """Windows of every node on the target's path, from the input up to the target."""

    target: Node
    nodes: List[Node]
    axes: Dict[Node, Tuple[AxisWindow, AxisWindow]]
    hw: Dict[Node, Tuple[int, int]]
    #: channel-weighted window area over full-map area, summed over the path's nodes: the share of
    #: the full backward's work the windowed one does (near 1: every cone covers its whole map)
    work: float = 1.0

    def box(self, units_yx: Tensor) -> Tensor:
        """Unclipped half-open RF boxes (y0, y1, x0, x1) [M, 4] of units (y, x) [M, 2]."""
        ay, ax = self.axes[self.nodes[0]]
        y0 = units_yx[:, 0] * ay.J - ay.P
        x0 = units_yx[:, 1] * ax.J - ax.P
        return torch.stack([y0, y0 + ay.R, x0, x0 + ax.R], 1)


def _varies_over_map(v: Any) -> bool:
    """Whether ``v``, broadcast against a map [N, C, H, W], differs along H or W: a tensor whose
    last two sizes (its last one, if 1-D) are not all 1."""
    return isinstance(v, Tensor) and any(s != 1 for s in v.shape[-2:])


def windowable(mirror: Mirror, node: Node, env: Dict[Node, Any]) -> bool:
    """Whether ``node``'s output [N, C, H, W] can be computed on a window of its input (a local
    op whose receptive field the RF table knows); other nodes are computed in full."""
    op = mirror.ops[node]
    k = op.kind
    val = env.get(node)
    if not (isinstance(val, Tensor) and val.dim() == 4):
        return False
    sig = mirror.tg.signal
    if k in ("input", "relu", "conv", "maxpool", "bn", "skip"):
        return True
    if k == "avgpool":
        m, w = op.module, op.win
        if w["p"] != (0, 0) and not m.count_include_pad:
            return False
        x = env[mirror.node_inputs[node][0]]
        floor = tuple((x.shape[-2 + a] + 2 * w["p"][a] - w["k"][a]) // w["s"][a] + 1 for a in (0, 1))
        return tuple(val.shape[-2:]) == floor
    if k in ("add", "sub", "mul") and len(node.args) == 2 and not node.kwargs:
        n_sig = 0
        for a in node.args:
            if isinstance(a, Node) and a in sig:
                n_sig += 1
                if tuple(env[a].shape) != tuple(val.shape):
                    return False
            elif isinstance(a, Node) and _varies_over_map(env.get(a)):
                return False
        return n_sig == 1 or (k != "mul" and n_sig == 2)
    if k == "cat":
        dim = ops.node_arg(node, 1, "dim", 0)
        return dim in (1, -3)
    if k == "generic":
        ins = mirror.node_inputs[node]
        if len(ins) != 1 or not isinstance(env[ins[0]], Tensor) or tuple(env[ins[0]].shape) != tuple(val.shape):
            return False  # (an item of a chunk/split reads a tuple: the full path)
        t = node.target
        m = mirror.tg.module(node)
        if m is not None:
            return isinstance(m, ops.PASS_MODULES)
        # a tensor operand other than the signal (positional or keyword: ``clamp(y, min=p)``) that
        # varies over the map, which a window of it would not see: the full path
        if any(isinstance(a, Node) and a not in sig and _varies_over_map(env.get(a))
               for a in (*node.args[1:], *node.kwargs.values())):
            return False
        if node.op == "call_function":
            return t in ops.PASS_FUNCS
        return node.op == "call_method" and t in ops.PASS_METHODS
    return False


def _footprint(mirror: Mirror, c: Node, wc: AxisWindow, axis: int) -> Tuple[int, int, int]:
    """(J, lo, size) of what consumer ``c``'s window reads from its input along ``axis``: the
    positions ``[u*J - lo, u*J - lo + size)`` of the input's map."""
    op = mirror.ops[c]
    if op.kind in ("conv", "maxpool", "avgpool"):
        k, s, p, d = (op.win[key][axis] for key in ("k", "s", "p", "d"))
        return wc.J * s, wc.P * s + p, (wc.R - 1) * s + (k - 1) * d + 1
    return wc.J, wc.P, wc.R


def plan_window(mirror: Mirror, table: RFTable, target: Node, env: Dict[Node, Any]) -> Optional[WindowPlan]:
    """The windows of ``target``'s path, or None when the windowed path does not apply.

    Cones are propagated from the target down: each node's cone is the hull of what its
    consumers' cones read from it (a residual add's short branch gets the same cone as the long
    one's input). ``table`` (the RF table of the same trace) marks the rows that see the whole
    image through a gate: those take the full path."""
    names = mirror.tg.row_names
    rows = table.by_name
    t_row = rows.get(names[target])
    if t_row is None or t_row.whole:
        return None
    nodes = mirror.ancestors(target)
    in_plan = set(nodes)
    consumers: Dict[Node, List[Node]] = {n: [] for n in nodes}
    for c in nodes:
        for n in mirror.node_inputs[c]:
            if n in in_plan:
                consumers[n].append(c)
    axes: Dict[Node, Tuple[AxisWindow, AxisWindow]] = {}
    hw: Dict[Node, Tuple[int, int]] = {}
    for n in reversed(nodes):
        row = rows.get(names[n])
        if row is None or row.whole or not windowable(mirror, n, env):
            return None
        shape = env[n].shape
        hw[n] = (int(shape[-2]), int(shape[-1]))
        pair = []
        for axis in (0, 1):
            if n is target:
                J, P, R = 1, 0, 1
            else:
                feet = [_footprint(mirror, c, axes[c][axis], axis) for c in consumers[n]]
                if not feet or len({f[0] for f in feet}) != 1:
                    return None  # branches disagree on the jump: no single cone
                J = feet[0][0]
                P = max(f[1] for f in feet)
                R = P + max(f[2] - f[1] for f in feet)
            H = hw[n][axis]
            pair.append(AxisWindow(0, 0, H, J, P, R) if R >= H else AxisWindow(J, -P, R, J, P, R))
        axes[n] = (pair[0], pair[1])
    area = sum(env[n].shape[1] * min(axes[n][0].size, hw[n][0]) * min(axes[n][1].size, hw[n][1]) for n in nodes)
    full = sum(env[n].shape[1] * hw[n][0] * hw[n][1] for n in nodes)
    return WindowPlan(target, nodes, axes, hw, work=area / max(full, 1))


# ------------------------------------------------------------------------------ tensor helpers
def _origin(w: Tuple[AxisWindow, AxisWindow], u: Tensor) -> Tensor:
    """[M, 2] window origins of units u [M, 2]."""
    return torch.stack([u[:, 0] * w[0].a + w[0].b, u[:, 1] * w[1].a + w[1].b], 1)


def _gather(full: Tensor, n_idx: Tensor, w: Tuple[AxisWindow, AxisWindow], u: Tensor) -> Tensor:
    """Windows [M, C, h, w] of ``full`` [N, C, H, W] (positions outside the map clamped)."""
    if w[0].full and w[1].full:
        return full[n_idx]
    return _gather_hwc(full, n_idx, w, u).permute(0, 3, 1, 2)


def _gather_hwc(full: Tensor, n_idx: Tensor, w: Tuple[AxisWindow, AxisWindow], u: Tensor,
                out: Optional[Tensor] = None) -> Tensor:
    """Windows of ``full`` [N, C, H, W] as a contiguous [M, h, w, C] (positions outside the map
    clamped): one advanced-indexing gather, or with ``out`` (a contiguous buffer of at least
    M*h*w*C elements of ``full``'s dtype) one ``index_select`` of map positions into it."""
    if w[0].full and w[1].full and out is None:
        return full[n_idx].permute(0, 2, 3, 1).contiguous()
    N, C, H, W = full.shape
    dev = full.device
    o = _origin(w, u)
    rows = (o[:, 0, None] + torch.arange(w[0].size, device=dev)).clamp(0, H - 1)
    cols = (o[:, 1, None] + torch.arange(w[1].size, device=dev)).clamp(0, W - 1)
    if out is None:
        return full[n_idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    pos = (n_idx[:, None, None] * H + rows[:, :, None]) * W + cols[:, None, :]  # [M, h, w] map positions
    dst = out[:pos.numel() * C].view(-1, C)
    torch.index_select(full.permute(0, 2, 3, 1).reshape(-1, C), 0, pos.reshape(-1), out=dst)
    return dst.view(tuple(pos.shape) + (C,))


def _buffer(scratch: Optional[Dict[Any, Tensor]], key: Any, numel: int, like: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """A flat buffer of at least ``numel`` elements of ``dtype`` on ``like``'s device from
    ``scratch`` (grown when too small), or None without a pool."""
    if scratch is None:
        return None
    buf = scratch.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != like.device:
        buf = scratch[key] = torch.empty(numel, dtype=dtype, device=like.device)
    return buf[:numel]


def unpool_index(switches: Tensor, W: int, n_idx: Tensor, w: Tuple[AxisWindow, AxisWindow],
                 wi: Tuple[AxisWindow, AxisWindow], u: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Where each pooled value of the window ``w`` lands in the pool's input window ``wi``: flat
    indices [M, h, w, C] (contiguous) into ``wi``'s ``hs*ws`` positions, from the recorded
    ``switches`` [N, C, h_map, w_map] (flat indices into the input map of width ``W``).

    A switch (row q, col c) = (q, idx - q*W) of the map is ``(q - oy)*ws + (c - ox)`` of the
    window: ``idx + q*(ws - W) - (oy*ws + ox)``. The origin-free part ``idx + q*(ws - W)`` is
    computed on the whole switch map when that is smaller than the units' windows (one integer
    division per map position instead of per window position). Positions of the window outside
    the map read a clamped neighbour's switch and carry a zero signal: the clamp only keeps their
    indices in range. ``out``: a buffer for the indices (see :func:`_gather_hwc`)."""
    hs, ws = wi[0].size, wi[1].size
    N, _, h_map, w_map = switches.shape
    if N * h_map * w_map <= len(n_idx) * w[0].size * w[1].size:
        base = switches.div(W, rounding_mode="floor").mul_(ws - W).add_(switches)
        local = _gather_hwc(base, n_idx, w, u, out)
    else:
        idx = _gather_hwc(switches, n_idx, w, u)
        local = idx.div(W, rounding_mode="floor").mul_(ws - W).add_(idx)
    oi = _origin(wi, u)
    return local.sub_((oi[:, 0] * ws + oi[:, 1])[:, None, None, None]).clamp_(0, hs * ws - 1)


def _valid(w: Tuple[AxisWindow, AxisWindow], u: Tensor, hw: Tuple[int, int],
           u_range: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None) -> Optional[Tensor]:
    """[M, 1, h, w] bool of the window positions inside the map (None: all are). ``u_range``:
    per axis the (min, max) of ``u`` as Python ints, to skip the mask without a device sync."""
    if w[0].full and w[1].full:
        return None
    if u_range is not None and all(
            min(w[a].a * u_range[a][0], w[a].a * u_range[a][1]) + w[a].b >= 0
            and max(w[a].a * u_range[a][0], w[a].a * u_range[a][1]) + w[a].b + w[a].size <= hw[a]
            for a in (0, 1)):
        return None
    o = _origin(w, u)
    dev = u.device
    rows = o[:, 0, None] + torch.arange(w[0].size, device=dev)
    cols = o[:, 1, None] + torch.arange(w[1].size, device=dev)
    ok = ((rows >= 0) & (rows < hw[0]))[:, :, None] & ((cols >= 0) & (cols < hw[1]))[:, None, :]
    return ok[:, None]


def _off_map_strips(w: Tuple[AxisWindow, AxisWindow], u_host: List[List[int]], hw: Tuple[int, int]
                    ) -> List[Tuple[int, int, int, int, int]]:
    """(unit, y0, y1, x0, x1) half-open blocks of the units' windows that lie outside the map
    (rows above and below it over the whole width, columns left and right of it), from the units
    ``u_host`` [[y, x], ...] as Python ints."""
    out = []
    h, wd = w[0].size, w[1].size
    for m, (uy, ux) in enumerate(u_host):
        oy, ox = w[0].a * uy + w[0].b, w[1].a * ux + w[1].b
        y0, y1 = min(max(0, -oy), h), max(min(h, hw[0] - oy), 0)
        x0, x1 = min(max(0, -ox), wd), max(min(wd, hw[1] - ox), 0)
        if y0 > 0:
            out.append((m, 0, y0, 0, wd))
        if y1 < h:
            out.append((m, y1, h, 0, wd))
        if x0 > 0:
            out.append((m, y0, y1, 0, x0))
        if x1 < wd:
            out.append((m, y0, y1, x1, wd))
    return out


def _zero_strips(g: Tensor, strips: List[Tuple[int, int, int, int, int]]) -> None:
    """Zero the blocks ``strips`` [(unit, y0, y1, x0, x1), ...] of ``g`` [M, C, h, w] in place:
    blocks of one extent together (one ``index_fill_`` over their units, see :data:`GROUP_STRIPS`)."""
    if not GROUP_STRIPS:
        for m, y0, y1, x0, x1 in strips:
            g[m, :, y0:y1, x0:x1] = 0
        return
    groups: Dict[Tuple[int, int, int, int], List[int]] = {}
    for m, *ext in strips:
        groups.setdefault(tuple(ext), []).append(m)
    for (y0, y1, x0, x1), ms in groups.items():
        g[:, :, y0:y1, x0:x1].index_fill_(0, torch.tensor(ms, device=g.device), 0)


def paste(dst: Tensor, dst_org: Tuple[Affine, Affine], src: Tensor, src_org: Tuple[Affine, Affine], u: Tensor) -> None:
    """Add ``src`` [M, C, h, w] (origin ``src_org``) into ``dst`` [M, C, H, W] (origin ``dst_org``),
    dropping what falls outside ``dst``. Origins are affine in the unit index ``u`` [M, 2]."""
    if all(src_org[a][0] == dst_org[a][0] for a in (0, 1)):
        sl_d, sl_s = [], []
        for a in (0, 1):
            off = src_org[a][1] - dst_org[a][1]
            lo, hi = max(off, 0), min(off + src.shape[-2 + a], dst.shape[-2 + a])
            if hi <= lo:
                return
            sl_d.append(slice(lo, hi))
            sl_s.append(slice(lo - off, hi - off))
        dst[:, :, sl_d[0], sl_d[1]] += src[:, :, sl_s[0], sl_s[1]]
        return
    dev = src.device
    M, C, h, w = src.shape
    off = [u[:, a] * (src_org[a][0] - dst_org[a][0]) + (src_org[a][1] - dst_org[a][1]) for a in (0, 1)]
    if dev.type == "cpu":  # one slice add per unit: far faster than index_put_(accumulate=True) on CPU
        H, W = dst.shape[-2:]
        for i, (oy, ox) in enumerate(zip(off[0].tolist(), off[1].tolist())):
            y0, y1, x0, x1 = max(oy, 0), min(oy + h, H), max(ox, 0), min(ox + w, W)
            if y1 > y0 and x1 > x0:
                dst[i, :, y0:y1, x0:x1] += src[i, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        return
    rows = off[0][:, None] + torch.arange(h, device=dev)  # [M, h]
    cols = off[1][:, None] + torch.arange(w, device=dev)  # [M, w]
    ok = ((rows >= 0) & (rows < dst.shape[-2]))[:, :, None] & ((cols >= 0) & (cols < dst.shape[-1]))[:, None, :]
    vals = (src * ok[:, None]).permute(0, 2, 3, 1)  # [M, h, w, C]
    m = torch.arange(M, device=dev)[:, None, None].expand(M, h, w)
    r = rows.clamp(0, dst.shape[-2] - 1)[:, :, None].expand(M, h, w)
    c = cols.clamp(0, dst.shape[-1] - 1)[:, None, :].expand(M, h, w)
    view = dst.permute(0, 2, 3, 1)
    view.index_put_((m, r, c), vals, accumulate=True)


def _channels_last(g: Tensor) -> bool:
    """Whether the windowed backward carries ``g`` [M, C, h, w] channels-last (see
    :data:`CHANNELS_LAST`)."""
    return CHANNELS_LAST and cpu_channels_last(g)


def _affine(w: Tuple[AxisWindow, AxisWindow]) -> Tuple[Affine, Affine]:
    return ((w[0].a, w[0].b), (w[1].a, w[1].b))


# ------------------------------------------------------------------------------------ backward
def backward_window(mirror: Mirror, plan: WindowPlan, env: Dict[Node, Any], switches: Dict[Node, Tensor],
                    seed: Tensor, n_idx: Tensor, u: Tensor, rule: Rule) -> Tensor:
    """Carry ``seed`` [M, C, 1, 1] (each unit's own value at its position, unit ``u`` [M, 2] of
    image ``n_idx`` [M]) down ``plan``; returns the input window [M, C_in, h, w] whose origin is
    ``_origin(plan.axes[input], u)``."""
    target = plan.target
    tw = plan.axes[target]
    g0 = seed
    if tw[0].full or tw[1].full:  # a 1x1 window inside a whole-map axis: place it
        g0 = seed.new_zeros(seed.shape[:2] + (tw[0].size, tw[1].size))
        paste(g0, _affine(tw), seed, ((1, 0), (1, 0)), u)
    grads: Dict[Node, Tensor] = {target: g0}
    owned: Dict[Node, bool] = {target: g0 is not seed}  # may the node's window be written in place?
    # may the node's window hold values outside the map? Only a transposed conv (or an op's
    # autograd derivative) writes there; ReLUs, BatchNorm, unpools, adds and concatenations keep
    # the zeros of a masked signal, so only the inputs of those ops take the map mask
    dirty: Dict[Node, bool] = {}
    M = len(n_idx)
    scratch = mirror.scratch() if REUSE_BUFFERS and seed.device.type == "cpu" else None
    # on the CPU the off-map parts are zeroed block by block (only units whose window reaches past
    # the map have any), elsewhere by one mask product
    u_host = u.tolist() if u.device.type == "cpu" and ZERO_BY_BLOCKS else None
    if u_host is not None:
        u_range = None
    else:
        lo, hi = u.min(0).values.tolist(), u.max(0).values.tolist()
        u_range = ((lo[0], hi[0]), (lo[1], hi[1]))
    for node in reversed(plan.nodes):
        g = grads.pop(node, None)
        if g is None:
            continue
        mine = owned.pop(node, False)
        w = plan.axes[node]
        if dirty.pop(node, False) and not (w[0].full and w[1].full):
            if u_host is not None:  # CPU: zero the off-map strips of the units that reach past the map
                strips = _off_map_strips(w, u_host, plan.hw[node])
                if strips and not mine:
                    g, mine = g.clone(), True
                _zero_strips(g, strips)
            else:
                ok = _valid(w, u, plan.hw[node], u_range)
                if ok is not None:
                    g = g.mul_(ok) if mine else g * ok
                    mine = True
        if node.op == "placeholder":
            if scratch and any(_shares(g, b) for b in scratch.values()):
                g = g.clone()  # (an unpool's output reached the input: the next call reuses its buffer)
            return g
        spreads = mirror.ops[node].kind in _SPREADING
        for inp, raw, org, fresh in _window_vjp(mirror, plan, node, g, mine, env, switches, n_idx, u, rule, scratch):
            dirty[inp] = dirty.get(inp, False) or spreads
            wi = plan.axes[inp]
            if inp not in grads:
                if org == _affine(wi) and tuple(raw.shape[-2:]) == (wi[0].size, wi[1].size):
                    grads[inp], owned[inp] = raw, fresh  # lies exactly on the window: no zeros, no paste
                    continue
                grads[inp], owned[inp] = g.new_zeros((M, raw.shape[1], wi[0].size, wi[1].size)), True
            elif not owned[inp]:
                grads[inp], owned[inp] = grads[inp].clone(), True
            paste(grads[inp], _affine(wi), raw, org, u)
    x = env[mirror.tg.input_node]
    wi = plan.axes[plan.nodes[0]]
    return seed.new_zeros((M, x.shape[1], wi[0].size, wi[1].size))


def _shares(a: Tensor, b: Tensor) -> bool:
    """Whether tensors ``a`` and ``b`` lie in the same storage."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _window_vjp(mirror: Mirror, plan: WindowPlan, node: Node, g: Tensor, mine: bool, env: Dict[Node, Any],
                switches: Dict[Node, Tensor], n_idx: Tensor, u: Tensor, rule: Rule,
                scratch: Optional[Dict[Any, Tensor]] = None) -> List[Tuple[Node, Tensor, Tuple[Affine, Affine], bool]]:
    """[(input node, signal window, its origin, fresh)] that ``node``'s backward sends down;
    ``fresh``: the window is the backward's own (``mine`` says the same of ``g``). ``scratch``:
    the pool the unpools take their buffers from (None: fresh ones)."""
    op = mirror.ops[node]
    k = op.kind
    ins = mirror.node_inputs[node]
    w = plan.axes[node]
    here = _affine(w)
    if k == "relu":
        x = None
        if rule is not Rule.DECONVNET or op.unit.kind in ("leaky", "prelu"):
            x = _gather(env[ins[0]], n_idx, w, u)
        return [(ins[0], relu_rule(op.unit, g, x, rule, prelu_slope(op, node, env, 4), inplace=mine), here, True)]
    if k in ("conv", "avgpool"):
        p, s, d = op.win["p"], op.win["s"], op.win["d"]
        if k == "conv":
            cl = _channels_last(g)
            weight, groups = mirror.conv_weight(node, g.dtype, node is not plan.target, channels_last=cl), op.module.groups
            if cl:
                g = g.contiguous(memory_format=torch.channels_last)
        else:
            c = g.shape[1]
            div = op.module.divisor_override or op.win["k"][0] * op.win["k"][1]
            weight, groups = g.new_full((c, 1) + tuple(op.win["k"]), 1.0 / div), c
        raw = conv_transpose(g, weight, stride=s, dilation=d, groups=groups)
        org = ((here[0][0] * s[0], here[0][1] * s[0] - p[0]), (here[1][0] * s[1], here[1][1] * s[1] - p[1]))
        return [(ins[0], raw, org, True)]
    if k == "maxpool":
        wi = plan.axes[ins[0]]
        hs, ws = wi[0].size, wi[1].size
        M, C = g.shape[:2]
        idx_buf = _buffer(scratch, (node, "index"), M * w[0].size * w[1].size * C, g, torch.long)
        local = unpool_index(switches[node], plan.hw[ins[0]][1], n_idx, w, wi, u, idx_buf)  # [M, h, w, C]
        if _channels_last(g):  # scatter along the positions of [M, h*w, C]: no layout copies
            buf = _buffer(scratch, (node, "out"), M * hs * ws * C, g, g.dtype)
            out = g.new_zeros((M, hs * ws, C)) if buf is None else buf.view(M, hs * ws, C).zero_()
            out.scatter_add_(1, local.view(M, -1, C), g.permute(0, 2, 3, 1).reshape(M, -1, C))
            return [(ins[0], out.view(M, hs, ws, C).permute(0, 3, 1, 2), _affine(wi), True)]
        out = g.new_zeros((M, C, hs * ws))
        out.scatter_add_(2, local.permute(0, 3, 1, 2).reshape(M, C, -1), g.reshape(M, C, -1))
        return [(ins[0], out.view(M, C, wi[0].size, wi[1].size), _affine(wi), True)]
    if k == "bn":
        if node in mirror.folded_bn:  # its scale is in the conv below (Mirror.conv_weight)
            return [(ins[0], g, here, mine)]
        scale = bn_scale(op.module).to(g.dtype).view(1, -1, 1, 1)
        return [(ins[0], g.mul_(scale) if mine else g * scale, here, True)]
    if k == "skip":
        return [(ins[0], g, here, mine)]
    if k in ("add", "sub", "mul"):
        out = []
        for pos, a in enumerate(node.args):
            if isinstance(a, Node) and a in mirror.tg.signal:
                gi = -g if (k == "sub" and pos == 1) else g
                if k == "mul":
                    other = node.args[1 - pos]
                    gi = g * (env[other] if isinstance(other, Node) else other)
                out.append((a, reduce_to(gi, g.shape), here, k == "mul"))
        return out
    if k == "cat":
        sizes = [env[t].shape[1] for t in node.args[0]]
        return [(t, part, here, mine) for t, part in zip(node.args[0], torch.split(g, sizes, dim=1))
                if isinstance(t, Node) and t in mirror.tg.signal]
    # elementwise op: its exact derivative on the window of its recorded input
    x = _gather(env[ins[0]], n_idx, w, u).detach().requires_grad_(True)
    args = torch.fx.node.map_arg(node.args, lambda a: x if a is ins[0] else env[a])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: x if a is ins[0] else env[a])
    with torch.enable_grad():
        y = mirror.forward_node(node, args, kwargs, record=False, switches={})
        (gx,) = torch.autograd.grad(y, x, g)
    return [(ins[0], gx, here, False)]


__all__ = ["WindowPlan", "AxisWindow", "plan_window", "backward_window", "paste"]
