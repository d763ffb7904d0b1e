"""Receptive-field geometry (deconvis.graph.rf) against the empirical gradient support (docs/method.md section 3).

Oracle: a copy of the network with all-positive weights, ReLUs removed and max-pools replaced
by average (sum) pools of the same geometry is linear with positive coefficients, so the input
pixels with non-zero gradient for one unit are exactly the pixels it can see. Its bounding box
must lie inside the table's clipped box; along an axis where the unclipped box lies inside the
image, every tap of the unit's cone is a real unit and the bounding box equals the box.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

from deconvis.errors import DeconvisError
from deconvis.graph.rf import (AxisRF, LayerRF, RFTable, clip_box, conv_out_size, pool_out_size, receptive_fields)

DT = torch.float64


# --------------------------------------------------------------------------------- the oracle
class _DilatedSumPool(nn.Module):
    """Max-pool stand-in for dilation > 1 (AvgPool2d has no dilation): zero-pad, then a depthwise
    ones conv; extra bottom/right zeros give ceil_mode's extra windows (size taken from torch)."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        target = self.pool(x).shape[-2:]  # the real max-pool's output size
        k, s, p, d = (nn.modules.utils._pair(v) for v in
                      (self.pool.kernel_size, self.pool.stride, self.pool.padding, self.pool.dilation))
        extra = [max(0, (target[a] - 1) * s[a] + d[a] * (k[a] - 1) + 1 - x.shape[2 + a] - 2 * p[a]) for a in (0, 1)]
        xp = F.pad(x, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]))
        ones = torch.ones(x.shape[1], 1, k[0], k[1], dtype=x.dtype)
        y = F.conv2d(xp, ones, stride=s, dilation=d, groups=x.shape[1])
        assert y.shape[-2:] == target
        return y


def positive_linear_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deep copy in float64: conv/linear weights uniform in [0.5, 1.5], ReLU and BN -> Identity,
    max-pools -> avg pools of the same geometry (ceil_mode kept)."""
    m = copy.deepcopy(model).to(DT).eval()
    gen = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=gen, dtype=DT))
    for name, mod in list(m.named_modules()):
        new = None
        if isinstance(mod, (nn.ReLU, nn.BatchNorm2d)):
            new = nn.Identity()
        elif isinstance(mod, nn.MaxPool2d):
            d = nn.modules.utils._pair(mod.dilation)
            if d == (1, 1):
                new = nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding, ceil_mode=mod.ceil_mode)
            else:
                new = _DilatedSumPool(mod)
        if new is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(m.get_submodule(parent_name) if parent_name else m, attr, new)
    return m


def support_boxes(oracle: nn.Module, requests, size, in_ch):
    """Input-gradient supports for many units at once: ``requests`` is a list of (module, units);
    returns, per request, a list of (bounding box (y0, y1, x0, x1) half-open or None when empty,
    support mask [H, W]) for each unit (y, x) of that module's output, channels summed. One
    forward and one backward: batch image b seeds only its own unit (the oracle is linear)."""
    outs = {}
    hooks = [mod.register_forward_hook(lambda m, i, o, r=r: outs.__setitem__(r, o))
             for r, (mod, _units) in enumerate(requests)]
    n = sum(len(units) for _mod, units in requests)
    try:
        x = torch.randn(n, in_ch, *size, dtype=DT, requires_grad=True)
        oracle(x)
    finally:
        for h in hooks:
            h.remove()
    seed, b = 0, 0
    for r, (_mod, units) in enumerate(requests):
        for u in units:
            seed = seed + outs[r][b, :, u[0], u[1]].sum()
            b += 1
    (g,) = torch.autograd.grad(seed, x)
    masks = (g.abs().sum(1) > 0).numpy()
    results, b = [], 0
    for _mod, units in requests:
        res = []
        for _u in units:
            ys, xs = np.nonzero(masks[b])
            res.append((None if ys.size == 0 else (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1), masks[b]))
            b += 1
        results.append(res)
    return results


def check_units(table: RFTable, row_name: str, units, supports, size, exact=False):
    """Assert the geometry of ``units`` of row ``row_name`` against their gradient ``supports``.

    ``exact``: also the bounding box equals the clipped box and the support fills it."""
    for u, (sb, mask) in zip(units, supports):
        box = table.box(row_name, *u)
        (cy0, cy1, cx0, cx1), _pad = table.clipped_box(row_name, *u)
        if sb is None:
            assert not exact, f"unit {u} of {row_name} sees nothing; table says {box}"
            continue
        y0, y1, x0, x1 = sb
        assert cy0 <= y0 and y1 <= cy1 and cx0 <= x0 and x1 <= cx1, \
            f"{row_name} unit {u}: support {sb} outside clipped box {(cy0, cy1, cx0, cx1)}"
        if box[0] >= 0 and box[1] <= size[0]:
            assert (y0, y1) == (box[0], box[1]), f"{row_name} unit {u}: support rows {(y0, y1)} != {box[:2]}"
        if box[2] >= 0 and box[3] <= size[1]:
            assert (x0, x1) == (box[2], box[3]), f"{row_name} unit {u}: support cols {(x0, x1)} != {box[2:]}"
        if exact:
            assert sb == (cy0, cy1, cx0, cx1), f"{row_name} unit {u}: support {sb} != clipped box"
            assert mask[cy0:cy1, cx0:cx1].all(), f"{row_name} unit {u}: support has holes"


def check_stack(net: nn.Sequential, size, seed: int, exact: bool) -> None:
    """Every conv/pool layer of a 1-channel stack against the oracle, 24 units per layer."""
    table = receptive_fields(net, size, in_channels=1)
    oracle = positive_linear_copy(net, seed)
    layers = [i for i, layer in enumerate(net) if not isinstance(layer, nn.ReLU)]
    units = {i: pick_units(table[str(i)].out, rng=random.Random(seed)) for i in layers}
    results = support_boxes(oracle, [(oracle[i], units[i]) for i in layers], size, 1)
    for i, res in zip(layers, results):
        check_units(table, str(i), units[i], res, size, exact=exact)


def pick_units(out, n=24, rng=None):
    rng = rng or random.Random(0)
    h, w = out
    corners = {(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)}
    everything = [(y, x) for y in range(h) for x in range(w)]
    if len(everything) <= n:
        return everything
    return sorted(corners | set(rng.sample(everything, n - len(corners))))


# --------------------------------------------------------------------------- pure functions
def test_axis_recurrence_by_hand():
    a = AxisRF(1, 1, 0)
    a = a.step(k=11, s=4, p=2)            # AlexNet conv1
    assert (a.r, a.j, a.start) == (11, 4, 3)
    a = a.step(k=3, s=2, p=0)             # pool1: r = 11 + 2*4, start = 3 + 1*4
    assert (a.r, a.j, a.start) == (19, 8, 7)
    b = AxisRF(1, 1, 0).step(k=2, s=2, p=0)
    assert (b.r, b.j, float(b.start)) == (2, 2, 0.5)
    c = AxisRF(1, 1, 0).step(k=3, s=1, p=1, d=2)  # dilated: r = 1 + 2*2
    assert (c.r, c.j, c.start) == (5, 1, 1)
    assert AxisRF(5, 2, 3).shift(2).start == -1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), k=st.integers(1, 5), s=st.integers(1, 4), d=st.integers(1, 3),
       p=st.integers(0, 3), ceil=st.booleans())
@example(n=5, k=2, s=2, d=1, p=1, ceil=True)  # ceil mode's last window would start in the padding: dropped
def test_out_size_formulas_match_torch(n, k, s, d, p, ceil):
    x = torch.zeros(1, 1, n, 1)
    expected_conv = conv_out_size(n, k, s, p, d)
    if expected_conv >= 1:
        assert F.conv2d(x, torch.ones(1, 1, k, 1), stride=(s, 1), padding=(p, 0), dilation=(d, 1)).shape[2] \
            == expected_conv
    if 2 * p <= k:  # torch: pool padding at most half the kernel size
        expected_pool = pool_out_size(n, k, s, p, d, ceil)
        try:
            got = F.max_pool2d(x, (k, 1), (s, 1), (p, 0), (d, 1), ceil_mode=ceil).shape[2]
        except RuntimeError:
            got = 0
        assert max(expected_pool, 0) == got


def test_out_size_defaults_are_a_plain_window():
    """Left out, stride is 1 (conv), padding 0, dilation 1, floor mode: a 10-pixel axis and a
    kernel of 3 give 8 convolution and 4 pooling (stride 2) outputs, as torch computes them."""
    x = torch.zeros(1, 1, 10, 1)
    assert conv_out_size(10, 3) == F.conv2d(x, torch.ones(1, 1, 3, 1)).shape[2] == 8
    assert pool_out_size(10, 3, 2) == F.max_pool2d(x, (3, 1), (2, 1)).shape[2] == 4


def test_unknown_layers_are_named_with_the_model_and_close_matches():
    """Without a traced graph the table's own names are matched (rows and containers); with one,
    a layer that does not depend on the image is named as such."""
    rows = [LayerRF(name=n, kind="conv", out=(4, 4), rf=(3, 3), jump=(1, 1), start=(1.0, 1.0))
            for n in ("features.conv1", "features.conv2")]
    table = RFTable((8, 8), rows, {"features": "features.conv2"}, "Tiny")
    assert table.resolve("features") == "features.conv2"
    with pytest.raises(DeconvisError) as e:
        table.resolve("features.conv3")
    assert str(e.value).startswith("unknown layer 'features.conv3' in Tiny (did you mean: ")
    assert "features.conv1" in str(e.value) and "features.conv2" in str(e.value)
    with pytest.raises(DeconvisError, match=r"'feature' in Tiny \(did you mean: features, "):
        table.resolve("feature")  # the container first: the closest name

    class Side(nn.Module):  # `scale` runs on a parameter, not on the image
        def __init__(self):
            super().__init__()
            self.conv, self.scale = nn.Conv2d(1, 1, 3), nn.Identity()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.conv(x) * self.scale(self.w)

    table = receptive_fields(Side(), 8, in_channels=1)
    with pytest.raises(DeconvisError, match=r"layer 'scale' \(scale\) of Side has no receptive-field row"):
        table.resolve("scale")


def test_layer_box_and_clip():
    row = LayerRF("c", "Conv2d", out=(5, 4), rf=(5, 4), jump=(2, 3), start=(1.0, 0.5))
    assert row.centre(0, 0) == (1.0, 0.5)
    assert row.box(0, 0) == (-1, 4, -1, 3)        # 1 +- 2 ; 0.5 +- 1.5
    assert row.box(2, 1) == (3, 8, 2, 6)
    with pytest.raises(DeconvisError, match="outside layer"):
        row.box(5, 0)
    table = RFTable((8, 7), [LayerRF("input", "input", (8, 7), (1, 1), (1, 1), (0.0, 0.0)), row])
    (cb, pad) = table.clipped_box("c", 0, 0)
    assert cb == (0, 4, 0, 3) and pad == (1, 0, 1, 0)
    (cb, pad) = table.clipped_box("c", 4, 3)      # box (7, 12, 8, 12): rows 7..8 in, cols all out
    assert cb == (7, 8, 7, 7) and pad == (0, 4, 0, 4)   # empty width: all 4 columns are padding
    assert clip_box((-3, 2, 5, 9), (4, 6)) == ((0, 2, 5, 6), (3, 0, 0, 3))
    assert clip_box((-9, -4, 0, 6), (4, 6)) == ((0, 0, 0, 6), (5, 0, 0, 0))


# -------------------------------------------------------------------- random stacks (oracle)
@st.composite
def stacks(draw):
    """A random chain of Conv2d/MaxPool2d/AvgPool2d (1 channel) that torch accepts, with the
    output size torch gives each layer (computed on the meta device: no arithmetic)."""
    size = (draw(st.integers(5, 18)), draw(st.integers(5, 18)))
    layers, sizes = [], []
    x = torch.zeros(1, 1, *size, device="meta")
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "max", "avg"]))
        k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        d = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if kind != "avg" else (1, 1)
        if kind == "conv":
            p = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
            layer = nn.Conv2d(1, 1, k, s, p, d, bias=False)
            run = lambda t, k=k, s=s, p=p, d=d: F.conv2d(t, torch.zeros(1, 1, *k, device="meta"), None, s, p, d)
        else:
            lim = [k[a] // 2 for a in (0, 1)]  # torch: pool padding <= kernel // 2
            p = (draw(st.integers(0, lim[0])), draw(st.integers(0, lim[1])))
            ceil = draw(st.booleans())
            layer = (nn.MaxPool2d(k, s, p, d, ceil_mode=ceil) if kind == "max"
                     else nn.AvgPool2d(k, s, p, ceil_mode=ceil))
            run = layer
        try:
            y = run(x)
        except RuntimeError:
            break
        if min(y.shape[-2:]) < 1:
            break
        layers.append(layer)
        sizes.append(tuple(y.shape[-2:]))
        x = y
        if kind != "conv" and draw(st.booleans()):
            layers.append(nn.ReLU())
            sizes.append(sizes[-1])
    if not layers:
        layers.append(nn.Conv2d(1, 1, 1, bias=False))
        sizes.append(size)
    return nn.Sequential(*layers), size, sizes


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=stacks(), seed=st.integers(0, 1000))
def test_random_stacks_match_gradient_support(case, seed):
    net, size, sizes = case
    table = receptive_fields(net, size, in_channels=1)
    assert [r.name for r in table] == ["input"] + [str(i) for i in range(len(net))]
    for i, layer in enumerate(net):
        row = table[str(i)]
        assert row.out == sizes[i]                         # torch's out sizes (ceil_mode included)
        if isinstance(layer, nn.ReLU):
            above = table[str(i - 1)]
            assert (row.rf, row.jump, row.start) == (above.rf, above.jump, above.start)
    check_stack(net, size, seed, exact=False)


@st.composite
def regular_stacks(draw):
    """Stacks where every axis divides exactly, stride <= kernel, padding <= kernel - 1, no
    dilation: then every unit sees exactly its clipped box, with no holes. Sizes are built from
    the top: each layer's input length is (out - 1) * s + k - 2p."""
    n_layers = draw(st.integers(1, 4))
    specs = []
    for _ in range(n_layers):
        kind = draw(st.sampled_from(["conv", "max", "avg"]))
        per_axis = []
        for _a in (0, 1):
            k = draw(st.integers(1, 4))
            s = draw(st.integers(1, k))
            pmax = k - 1 if kind == "conv" else min(k - 1, k // 2)
            per_axis.append((k, s, draw(st.integers(0, pmax))))
        specs.append((kind, per_axis, draw(st.booleans())))
    out = [draw(st.integers(1, 4)), draw(st.integers(1, 4))]
    for kind, per_axis, _ in reversed(specs):
        for a in (0, 1):
            k, s, p = per_axis[a]
            out[a] = (out[a] - 1) * s + k - 2 * p
        assume(min(out) >= 1)
    assume(max(out) <= 40)
    layers = []
    for kind, per_axis, ceil in specs:
        k = tuple(v[0] for v in per_axis)
        s = tuple(v[1] for v in per_axis)
        p = tuple(v[2] for v in per_axis)
        if kind == "conv":
            layers.append(nn.Conv2d(1, 1, k, s, p, bias=False))
        elif kind == "max":
            layers += [nn.MaxPool2d(k, s, p, ceil_mode=ceil), nn.ReLU()]
        else:
            layers.append(nn.AvgPool2d(k, s, p, ceil_mode=ceil))
    return nn.Sequential(*layers), (out[0], out[1])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=regular_stacks(), seed=st.integers(0, 1000))
def test_regular_stacks_see_exactly_their_clipped_box(case, seed):
    net, size = case
    check_stack(net, size, seed, exact=True)


# --------------------------------------------------------------------- graphs with branches
class Branchy(nn.Module):
    """Functional ops, a concat of branches of different RF, a strided residual add, view,
    adaptive pooling and flatten. ``oracle=True``: no ReLU, avg instead of max pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.b1 = nn.Conv2d(2, 2, 1)
        self.b2 = nn.Conv2d(2, 2, 5, padding=2)
        self.b3 = nn.Conv2d(2, 2, 3, padding=3, dilation=3)
        self.down = nn.Conv2d(6, 3, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(2, 3, 1, stride=2)
        self.fc = nn.Linear(3, 2)
        self.oracle = False
        self.taps = {}

    def forward(self, x):
        act = (lambda t: t) if self.oracle else F.relu
        x = act(self.stem(x))
        y = torch.cat([self.b1(x), act(self.b2(x)), self.b3(x)], 1)
        if self.oracle:
            self.taps["cat"] = y
        y = F.avg_pool2d(y, 3, 1, 1) if self.oracle else F.max_pool2d(y, 3, 1, 1)
        z = self.down(y) + self.skip(x)
        z = z.view(z.size(0), z.size(1), z.size(2), z.size(3))
        if self.oracle:
            self.taps["add"] = z
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def _branchy_oracle(net: Branchy) -> Branchy:
    o = positive_linear_copy(net)
    o.oracle = True
    return o


def test_branches_rows_and_values():
    net = Branchy()
    t = receptive_fields(net, (13, 11), in_channels=1)
    names = [r.name for r in t]
    assert names[:3] == ["input", "stem", "relu"]
    for want in ("cat", "max_pool2d", "add", "view", "adaptive_avg_pool2d", "flatten", "fc"):
        assert want in names
    # cat: jump 1, centre agrees, RF = largest branch: stem 3 + dilated (3-1)*3 = 9
    assert t["cat"].rf == (9, 9) and t["cat"].start == (0.0, 0.0)
    assert t["b2"].rf == (7, 7) and t["b1"].rf == (3, 3)
    # max_pool2d 3/1/1: +2 ; down 3/2/1: +2 ; skip path only 3 -> add takes the largest
    assert t["max_pool2d"].rf == (11, 11)
    assert t["add"].rf == (13, 13) and t["add"].jump == (2, 2) and t["add"].out == (7, 6)
    assert t["view"] == LayerRF("view", "view", (7, 6), (13, 13), (2, 2), (0.0, 0.0))
    for name in ("adaptive_avg_pool2d", "flatten", "fc"):
        assert t[name].whole and t[name].rf == (13, 11) and t[name].box(0, 0) == (0, 13, 0, 11)


@pytest.mark.parametrize("tap", ["cat", "add"])
def test_branches_match_gradient_support(tap):
    net = Branchy()
    size = (13, 11)
    t = receptive_fields(net, size, in_channels=1)
    o = _branchy_oracle(net)
    units = pick_units(t[tap].out, n=30)
    x = torch.randn(len(units), 1, *size, dtype=DT, requires_grad=True)
    o(x)
    y = o.taps[tap]
    (g,) = torch.autograd.grad(sum(y[b, :, u[0], u[1]].sum() for b, u in enumerate(units)), x)
    for b, u in enumerate(units):
        ys, xs = np.nonzero(g[b].abs().sum(0).numpy())
        (cy0, cy1, cx0, cx1), _ = t.clipped_box(tap, *u)
        assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (cy0, cy1, cx0, cx1), (tap, u)


def test_fc_sees_the_whole_image():
    net = Branchy()
    t = receptive_fields(net, (9, 10), in_channels=1)
    o = _branchy_oracle(net)
    x = torch.randn(1, 1, 9, 10, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(o(x)[0, 0], x)
    assert (g != 0).all()
    assert t.clipped_box("fc", 0, 0) == ((0, 9, 0, 10), (0, 0, 0, 0))


class Shuffly(nn.Module):
    """Padding modules and F.pad, channel chunk/slice/shuffle (view + transpose), a gate."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((2, 0, 1, 3))                 # left, right, top, bottom
        self.c1 = nn.Conv2d(1, 4, 3, stride=2)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)
        self.c3 = nn.Conv2d(4, 2, (1, 3), stride=(1, 2))
        self.taps = {}

    def forward(self, x):
        x = self.c1(self.pad(x))
        a, b = torch.chunk(x, 2, dim=1)
        x = torch.cat([a, self.c2(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        y = self.c3(F.pad(x[:, :4], (1, 0, 0, 2)))
        self.taps["y"] = y
        return y * torch.sigmoid(y.mean((2, 3), keepdim=True))


def test_pads_chunks_and_shuffles_match_support():
    net = Shuffly()
    size = (11, 14)
    t = receptive_fields(net, size, in_channels=1)
    kinds = [r.kind for r in t]
    for k in ("ZeroPad2d", "getitem", "cat", "view", "transpose", "contiguous", "pad", "mean",
              "sigmoid", "mul"):
        assert k in kinds, k
    row = t["c3"]
    # pad top 1 / left 2: start (-1, -2); c1 3/2: r 3, j 2, start (0, -1); c2 (one branch) 3/1/1: r 7;
    # F.pad left 1: start (0, -3); c3 (1, 3)/(1, 2): r (7, 7 + 2*2), j (2, 4), start (0, -3 + 2)
    assert row.rf == (7, 11) and row.jump == (2, 4) and row.start == (0.0, -1.0)
    assert t["mean"].whole and t["mul"].whole            # a global gate makes every unit see it all
    o = positive_linear_copy(net)
    o.taps = {}
    units = pick_units(row.out, n=30)
    x = torch.randn(len(units), 1, *size, dtype=DT, requires_grad=True)
    o(x)
    y = o.taps["y"]
    (g,) = torch.autograd.grad(sum(y[b, :, u[0], u[1]].sum() for b, u in enumerate(units)), x)
    for b, u in enumerate(units):
        ys, xs = np.nonzero(g[b].abs().sum(0).numpy())
        (cy0, cy1, cx0, cx1), _ = t.clipped_box("c3", *u)
        if ys.size == 0:
            continue
        assert cy0 <= ys.min() and ys.max() < cy1 and cx0 <= xs.min() and xs.max() < cx1, u
        box = t.box("c3", *u)
        if 0 <= box[0] and box[1] <= size[0]:
            assert (ys.min(), ys.max() + 1) == box[:2], u
        if 0 <= box[2] and box[3] <= size[1]:
            assert (xs.min(), xs.max() + 1) == box[2:], u


class Misaligned(nn.Module):
    def __init__(self, jump: bool):
        super().__init__()
        self.a = nn.Conv2d(1, 1, 2, stride=2)                    # start 0.5, jump 2
        self.b = nn.Conv2d(1, 1, 5) if jump else nn.Conv2d(1, 1, 1, stride=2)  # jump 1 / start 0

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("jump", [False, True])
def test_misaligned_branches_raise_naming_both(jump):
    with pytest.raises(DeconvisError) as e:
        receptive_fields(Misaligned(jump), 8, in_channels=1)
    msg = str(e.value)
    assert "\n" not in msg and "a (jump" in msg and "b (jump" in msg and "add" in msg


def test_adaptive_pools():
    def table(out, size):
        net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.AdaptiveAvgPool2d(out))
        return receptive_fields(net, size, in_channels=1)

    same = table((8, 6), (8, 6))["1"]
    assert not same.whole and (same.rf, same.jump, same.start) == ((3, 3), (1, 1), (0.0, 0.0))
    even = table((4, 2), (8, 6))["1"]                  # k = s = (2, 3)
    assert not even.whole and even.rf == (4, 5) and even.jump == (2, 3) and even.start == (0.5, 1.0)
    uneven = table((3, 4), (8, 6))["1"]
    assert uneven.whole and uneven.out == (3, 4) and uneven.rf == (8, 6) and uneven.box(2, 3) == (0, 8, 0, 6)
    glob = table(1, (8, 6))["1"]
    assert glob.whole and glob.rf == (8, 6) and glob.start == (3.5, 2.5)


def test_shapes_sizes_and_records():
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, (3, 5), stride=(1, 2), padding=(1, 0)), nn.ReLU()),
                        nn.MaxPool2d((2, 3), ceil_mode=True), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 10, 17))
    t = receptive_fields(net, (10, 17))
    assert len(t) == 6 and "0" in t and "0.0" in t and "nope" not in t
    assert t["0"].name == "0.1"                        # a container stands for its last row
    assert t["0.0"].rf == (3, 5) and t["0.0"].jump == (1, 2) and t["0.0"].start == (0.0, 2.0)
    assert t["1"].out == (5, 3) and t["1"].rf == (4, 9) and t["1"].jump == (2, 6)
    recs = t.to_records()
    assert recs[0] == {"name": "input", "kind": "input", "out": [10, 17], "rf": [1, 1], "jump": [1, 1],
                       "start": [0, 0], "whole": False}
    assert set(recs[2]) == {"name", "kind", "out", "rf", "jump", "start", "whole"}
    text = t.format()
    assert "0.0" in text and "MaxPool2d" in text and "10x17" in text
    assert text.splitlines()[-1].startswith("input 10x17 px;")  # height x width
    lines = {ln.split()[0]: ln for ln in text.splitlines()[2:-1]}  # rows by name (no header, no footnote)
    assert t.layers[-1].whole and "(all)" in lines[t.layers[-1].name]  # the Linear sees the whole image
    assert [l.name for l in t.layers if "(all)" in lines[l.name]] == [l.name for l in t.layers if l.whole]
    # aligned columns: names and kinds flush left, the numbers flush right (their ends line up)
    assert all(lines[l.name].startswith(l.name + " ") for l in t.layers)
    ends = {lines[l.name].index(f" {l.out[0]}x{l.out[1]} ") + len(f" {l.out[0]}x{l.out[1]}") for l in t.layers}
    assert len(ends) == 1
    with pytest.raises(DeconvisError, match="did you mean"):
        t["0.00"]


def test_crop_box_is_the_local_field_after_a_gate():
    """A row that sees the whole image only through a squeeze-excitation gate crops to the local
    field of its conv path; other rows crop to their receptive-field box."""
    from torchvision.ops import SqueezeExcitation

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), SqueezeExcitation(4, 2),
                        nn.Conv2d(4, 4, 3, padding=1))
    t = receptive_fields(net, 16)
    gated, plain = t["3"], t["0"]
    assert gated.whole and gated.local is not None and plain.local is None
    for y, x in ((0, 0), (5, 9), (15, 3)):
        assert gated.crop_box(y, x) == gated.local.box(y, x) != gated.box(y, x)
        assert plain.crop_box(y, x) == plain.box(y, x)
    assert gated.crop_box(5, 9) == (3, 8, 7, 12)  # two 3x3 convs: 5x5 centred on the unit
    assert t.crop_box("3", 5, 9)[0] == (3, 8, 7, 12)
    rec = next(r for r in t.to_records() if r["name"] == "3")
    assert rec["whole"] and rec["local"] == {"rf": [5, 5], "jump": [1, 1], "start": [0, 0]}
    # a local field that differs between y and x: the record keeps the axes apart
    net = nn.Sequential(nn.Conv2d(3, 4, (3, 5), padding=(1, 0)), nn.ReLU(), SqueezeExcitation(4, 2),
                        nn.Conv2d(4, 4, 1))
    t = receptive_fields(net, (16, 20))
    loc = t["3"].local
    assert t["3"].whole and loc.rf[0] != loc.rf[1] and loc.start[0] != loc.start[1]
    rec = next(r for r in t.to_records() if r["name"] == "3")
    assert rec["local"] == {"rf": list(loc.rf), "jump": list(loc.jump), "start": list(loc.start)}


# ---------------------------------------------------------------------------------- errors
def test_too_small_input_one_line():
    net = nn.Sequential(nn.Conv2d(3, 2, 5), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3))
    with pytest.raises(DeconvisError) as e:
        receptive_fields(net, 7)
    msg = str(e.value)
    assert msg.startswith("input 7x7 is too small for Sequential: layer 2 (Conv2d) would have size 0x0")
    assert "\n" not in msg
    assert receptive_fields(net, 10)["2"].out == (1, 1)   # 10 -> 6 -> 3 -> 1
    with pytest.raises(DeconvisError, match=r"input 3x9 is too small for Sequential: layer 0 \(Conv2d\)"):
        receptive_fields(net, (3, 9))


def test_wrong_size_for_fixed_linear():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.c(x), 1))

    assert receptive_fields(Fixed(), 8)["fc"].whole
    with pytest.raises(DeconvisError, match="does not fit Fixed: layer fc \\(Linear\\)"):
        receptive_fields(Fixed(), 10)


def test_unknown_module_named():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU())
    with pytest.raises(DeconvisError, match=r"through 1 \(GroupNorm\).*unknown module kind 'GroupNorm'"):
        receptive_fields(net, 8)
    up = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2))
    with pytest.raises(DeconvisError, match="Upsample"):
        receptive_fields(up, 8)


def test_untraceable_and_not_a_module():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.c(x)
            return x

    with pytest.raises(DeconvisError, match="torch.fx could not trace DataDependent"):
        receptive_fields(DataDependent(), 8)
    with pytest.raises(DeconvisError, match="nn.Module"):
        receptive_fields(lambda x: x, 8)  # type: ignore[arg-type]
    with pytest.raises(DeconvisError, match="at least 1x1"):
        receptive_fields(nn.Conv2d(3, 3, 1), (0, 4))


def test_model_untouched_and_modes_restored():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    net.train()
    net[1].eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    receptive_fields(net, 9)
    assert net.training and not net[1].training and net[0].training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


class InnerGlobal(nn.Module):
    """A global pool over a map that sees only an inner part of the image: F.pad with negative
    amounts crops (top 3, left 2, right 1) and a stride-2 (7, 3) conv without padding leaves the
    last rows and columns unseen; the pooled row and the Linear after it see that part."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, (7, 3), stride=2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = self.c1(F.pad(x, (-2, -1, -3, 0)))
        g = x.mean((2, 3))
        return self.fc(g)


def test_a_whole_row_that_sees_an_inner_part_matches_support():
    size = (15, 17)
    t = receptive_fields(InnerGlobal(), size, in_channels=1)
    x = torch.randn(1, 1, *size, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(positive_linear_copy(InnerGlobal())(x).sum(), x)
    ys, xs = np.nonzero(g[0, 0].numpy())
    support = (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
    assert 0 < support[0] and support[1] < size[0] and 0 < support[2] and support[3] < size[1]  # inside
    whole = [r for r in t if r.whole]
    assert len(whole) >= 2  # the pooled row and the Linear
    for r in whole:
        assert r.box(0, 0) == support, r.name
        assert r.rf == (support[1] - support[0], support[3] - support[2]) and r.jump == r.rf
    one = receptive_fields(nn.Sequential(nn.Flatten(), nn.Linear(1, 2)), 1, in_channels=1)["1"]
    assert one.whole and one.rf == one.jump == (1, 1)  # a whole row of one pixel: jump 1, as its rf


def test_units_outside_a_layer_are_named_and_rows_may_be_passed_as_objects():
    t = receptive_fields(InnerGlobal(), (15, 17), in_channels=1)
    row = t["c1"]
    h, w = row.out
    assert h != w
    assert t.box(row, h - 1, w - 1) == t.box("c1", h - 1, w - 1) == row.box(h - 1, w - 1)
    for y, x in ((h, 0), (0, w), (-1, 0), (0, -1)):
        with pytest.raises(DeconvisError, match=rf"unit \({y}, {x}\) is outside layer 'c1', whose output is "
                                                rf"{h}x{w}; use 0 <= y < {h}, 0 <= x < {w}$"):
            row.box(y, x)
