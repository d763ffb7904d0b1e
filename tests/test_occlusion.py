"""Incremental occlusion against the naive computation (each occluded copy forwarded in full), float64."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deconvis.analysis.occlusion import fill_values, grid, occlusion
from deconvis.analysis.occlusion_engine import IncrementalOcclusion
from deconvis.errors import DeconvisError
from deconvis.mirror.deconvnet import DeconvNet


# ------------------------------------------------------------------------------ small nets
class Chain(nn.Module):
    """Conv/ReLU/max-pool chain: padding, stride, dilation, groups, ceil_mode, avg-pool, BN."""

    def __init__(self, k: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
            nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
            nn.AvgPool2d(2, 1), nn.Conv2d(8, 7, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(7, k)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.down(x))


class Residual(nn.Module):
    """Residual blocks, a concat, a squeeze-excitation gate and a pad (not windowable)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = Block(4, 6, 2)
        self.side = nn.Conv2d(6, 2, 1)
        self.b2 = Block(8, 8, 1)
        self.se = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.b1(x)
        x = torch.cat([x, self.side(x)], 1)
        x = F.pad(x, (1, 0, 1, 0))
        x = self.b2(x)
        gate = torch.sigmoid(self.se(x.mean((2, 3))))[:, :, None, None]
        x = x * gate
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class NegativePool(nn.Module):
    """No ReLU before its padded max pools: negative values reach the padding, so padding the
    window with 0 instead of -inf changes the border units."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.pool1 = nn.MaxPool2d(3, 2, padding=1)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2, 2, padding=1, ceil_mode=True)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.pool2(self.conv2(self.pool1(self.bn(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


class SENet(nn.Module):
    """Issue 20: conv, ReLU, conv (groups, stride), ReLU, squeeze-excitation gate, 1x1 conv,
    spatial mean, Linear. After the gate every unit of every map depends on every pixel."""

    def __init__(self, groups: int, stride: int, act: type):
        from torchvision.ops import SqueezeExcitation

        super().__init__()
        self.c1, self.r1 = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.c2, self.r2 = nn.Conv2d(16, 16, 3, stride=stride, padding=1, groups=groups), nn.ReLU()
        self.se = SqueezeExcitation(16, 4, activation=act)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.c3(self.se(self.r2(self.c2(self.r1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.double().eval()


# ---------------------------------------------------------------------------- the oracle
def naive(model: nn.Module, x: torch.Tensor, tops, size, fill: torch.Tensor, module: nn.Module, chunk: int = 32):
    """Every occluded copy forwarded in full (``chunk`` copies per plain forward of the eval-mode
    model): (logits [P, K], per-channel sums of ``module`` [P, C])."""
    store = {}
    hook = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    logits, sums = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(tops), chunk):
                xo = x.repeat(len(tops[i:i + chunk]), 1, 1, 1)
                for b, (y, x0) in enumerate(tops[i:i + chunk]):
                    xo[b, :, y:y + size[0], x0:x0 + size[1]] = fill[:, None, None]
                logits.append(model(xo))
                a = store["a"]
                sums.append(a.sum((2, 3)) if a.dim() == 4 else a)
    finally:
        hook.remove()
    return torch.cat(logits), torch.cat(sums)


def incremental(model, x, tops, size, fill, layer, batch):
    eng = IncrementalOcclusion(model, x, size, [layer])
    t = torch.tensor(tops, dtype=torch.long)
    outs = [eng.run(c, fill) for c in t.split(batch)]
    return eng, torch.cat([o.logits for o in outs]), torch.cat([o.sums[eng.layers[0]] for o in outs])


def _positions(h, w, size, stride):
    return [(y, x) for y in grid(h, size[0], stride[0]) for x in grid(w, size[1], stride[1])]


def reference_fill(x: torch.Tensor, spec) -> torch.Tensor:
    """The occluder's value per channel [C], computed here, not by the code under test."""
    C, H, W = x.shape[-3:]
    if spec == "mean":
        return x.reshape(C, H * W).sum(1) / (H * W)
    return torch.full((C,), 0.0 if spec == "zero" else float(spec), dtype=x.dtype)


def _check(model, x, size, stride, fill_spec, layer, batch):
    module = dict(model.named_modules())[layer]
    fill = reference_fill(x, fill_spec)
    tops = _positions(x.shape[-2], x.shape[-1], size, stride)
    eng, lg, s = incremental(model, x, tops, size, fill, layer, batch)
    lg0, s0 = naive(model, x, tops, size, fill, module)
    assert lg.shape == lg0.shape and s.shape == s0.shape
    scale = max(float(lg0.abs().max()), 1.0)
    assert float((lg - lg0).abs().max()) <= 1e-10 * scale
    assert float((s - s0).abs().max()) <= 1e-10 * max(float(s0.abs().max()), 1.0)
    # the occluder really changes something (the test could not pass with the clean numbers)
    assert float((lg0 - lg0[:1]).abs().max()) > 1e-6
    return eng


@pytest.mark.parametrize("fill,size,stride,batch", [
    ("mean", (5, 7), (3, 4), 4),    # batches of 4, last one short
    ("zero", (9, 9), (5, 5), 1),    # one square per batch
    (0.7, (4, 3), (7, 2), 64),      # all squares in one batch; stride 7 leaves a margin
    ("mean", (23, 2), (1, 11), 3),  # a full-height bar at the left/right edges
])
def test_chain_equals_naive(fill, size, stride, batch):
    torch.manual_seed(0)
    model = _randomise_bn(Chain())
    x = torch.randn(1, 3, 23, 26, dtype=torch.float64)
    eng = _check(model, x, size, stride, fill, "features.8", batch)
    assert eng.fallback == []  # every conv-side op is windowed
    assert eng.bound > 1.0


@pytest.mark.parametrize("layer", ["b1.conv2", "b2.bn2"])
def test_residual_graph_equals_naive(layer):
    torch.manual_seed(1)
    model = _randomise_bn(Residual())
    x = torch.randn(1, 3, 20, 18, dtype=torch.float64)
    eng = _check(model, x, (6, 5), (4, 3), "mean", layer, 5)
    assert "pad" in eng.fallback  # computed in full for the batch, and said so


class ViewHead(nn.Module):
    """A head that flattens with ``view``, which needs the plain forward's memory layout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 12 * 10, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


def test_view_after_a_window_equals_naive():
    """The whole-map inputs of a view are gathered from windows (found by the generated nets)."""
    torch.manual_seed(8)
    model = ViewHead().double().eval()
    x = torch.randn(1, 3, 12, 10, dtype=torch.float64)
    eng = _check(model, x, (3, 4), (2, 3), "zero", "conv", 5)
    assert "view" in eng.whole


def test_max_pool_padding_is_minus_infinity():
    torch.manual_seed(5)
    model = _randomise_bn(NegativePool())
    with torch.no_grad():
        model.bn.bias.fill_(-1.0)  # mostly negative maps into both pools
    x = torch.randn(1, 3, 21, 19, dtype=torch.float64)
    with torch.no_grad():
        a = model.bn(model.conv1(x))
    assert float(a[0, :, 0, 0].max()) < 0 < float(a.max())  # the corner window's values are all negative
    _check(model, x, (5, 4), (3, 3), "mean", "pool2", 6)


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 2, 16])
def test_squeeze_excitation_gate_equals_naive(groups, stride, act):
    """Issue 20 section 1: the gate changes the whole map, so every later spatial node runs in full."""
    torch.manual_seed(6)
    model = SENet(groups, stride, act).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    eng = _check(model, x, (8, 8), (4, 4), "mean", "c3", 16)
    assert {"se.mul", "c3"} <= set(eng.whole) and "c2" not in eng.whole  # the gate product, named by its module


def test_torchvision_regnet_y_gates_equal_naive():
    """A torchvision squeeze-excitation family (RegNetY, random weights, 64 px), map (b) after
    the first gates."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(7)
    model = _randomise_bn(torchvision.models.regnet_y_400mf(num_classes=6))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    eng = _check(model, x, (16, 16), (24, 24), "mean", "trunk_output.block2", 4)
    assert eng.fallback == [] and any(w.startswith("trunk_output.block1") for w in eng.whole)


def test_torchvision_resnet18_equals_naive():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(2)
    model = _randomise_bn(torchvision.models.resnet18(num_classes=7))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    eng = _check(model, x, (16, 16), (20, 20), "mean", "layer3", 3)
    assert eng.fallback == [] and "fc" in eng.whole


def test_positions_and_grid():
    assert grid(10, 4, 3) == [0, 3, 6]  # the last square ends at pixel 10, the image's edge
    assert grid(11, 4, 3) == [0, 3, 6]  # stride not dividing: a 1 px margin
    assert grid(4, 4, 1) == [0]


def _small_api_case():
    torch.manual_seed(3)
    model = _randomise_bn(Chain(k=6))
    x = torch.randn(3, 19, 21, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("fill_spec,least_target", [("zero", False), ("mean", True), ("-0.4", False)])
def test_occlusion_api_maps_equal_naive(fill_spec, least_target):
    """Maps (b)-(e) against every occluded copy forwarded in full; the fill computed here. With
    ``least_target`` map (d) follows the least probable class, so (d) and (e) differ everywhere."""
    model, x = _small_api_case()
    with torch.no_grad():
        probs_clean = torch.softmax(model(x[None]), -1)[0]
    target = int(probs_clean.argmin()) if least_target else None
    res = occlusion(model, x, layer="features.8", size=6, stride=(4, 5), fill=fill_spec, batch_size=7, target=target)
    tops = [(y, x0) for y in res.tops_y for x0 in res.tops_x]
    fill = reference_fill(x, fill_spec)
    np.testing.assert_allclose(res.fill_value, fill.numpy(), rtol=1e-12, atol=0)
    lg0, s0 = naive(model, x[None], tops, (6, 6), fill, model.features[8])
    # (b): the strongest channel of the clean image (largest single activation)
    store = {}
    h = model.features[8].register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    with torch.no_grad():
        model(x[None])
    h.remove()
    ch = int(store["a"][0].flatten(1).amax(1).argmax())
    assert res.channel == ch
    shape = (len(res.tops_y), len(res.tops_x))
    np.testing.assert_allclose(res.activation, s0[:, ch].reshape(shape).numpy(), rtol=1e-10, atol=1e-12)
    probs = torch.softmax(lg0, -1)
    assert res.target == (int(probs_clean.argmin()) if least_target else int(probs_clean.argmax()))
    assert res.clean_top_class == int(probs_clean.argmax())
    assert res.clean_probability == pytest.approx(float(probs_clean[res.target]), rel=1e-12)
    np.testing.assert_allclose(res.probability, probs[:, res.target].reshape(shape).numpy(), rtol=1e-10, atol=1e-14)
    # (e): the most probable class and its own probability (not the target's)
    np.testing.assert_array_equal(res.top_class, probs.argmax(-1).reshape(shape).numpy())
    np.testing.assert_allclose(res.top_probability, probs.max(-1).values.reshape(shape).numpy(), rtol=1e-10, atol=1e-14)
    if least_target:  # (e) is not (d) here, so taking (e)'s probability from the target fails
        assert (res.top_class != res.target).all()
    # (c): the deconvnet projection of that whole map
    dn = DeconvNet(model)
    dn.forward(x[None])
    proj = dn.project_map("features.8", 0, [ch])[0].numpy()
    np.testing.assert_allclose(res.projection, proj, rtol=1e-10, atol=1e-14)
    rec = res.to_json()
    assert rec["square_size"] == [6, 6] and rec["stride"] == [4, 5] and rec["fill"] == fill_spec
    assert rec["top_probability"] == res.top_probability.tolist() and rec["top_class"] == res.top_class.tolist()
    json.dumps(rec, allow_nan=False)


def test_occlusion_api_target_and_default_layer():
    model, x = _small_api_case()
    res = occlusion(model, x, size=8, stride=6, target=2, class_names=list("abcdef"))
    assert res.target == 2 and res.name(2) == "c" and res.to_json()["target_name"] == "c"
    assert res.layer == DeconvNet(model).conv_layers()[-1]
    assert res.activation.shape == res.probability.shape == res.top_class.shape == (2, 3)  # 19 x 21 px: tops y 0, 6; x 0, 6, 12


@pytest.mark.parametrize("kwargs,needle", [
    (dict(size=40), "does not fit"),
    (dict(size=0), "does not fit"),
    (dict(size=8, stride=0), "stride"),
    (dict(size=8, layer="conv9"), "unknown layer"),
    (dict(size=8, target=6), "out of range"),
    (dict(size=8, target=-1), "out of range"),
    (dict(size=8, fill="blue"), "fill"),
    (dict(size=8, batch_size=0), "batch size"),
])
def test_bad_input_one_line_error(kwargs, needle):
    model, x = _small_api_case()
    with pytest.raises(DeconvisError) as exc:
        occlusion(model, x, **kwargs)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_changed_range_matches_rf_boxes():
    """The units whose RF box (RFTable.box, half-open) meets the square, by brute force over every unit."""
    from deconvis.analysis.occlusion_engine import changed_range
    from deconvis.graph.rf import receptive_fields

    table = receptive_fields(Chain(), (23, 26))
    lo_px = torch.arange(0, 20)
    hi_px = lo_px + 4
    for row in table:
        if row.whole or row.name == "input":
            continue
        for axis in (0, 1):
            lo, hi = changed_range(row, axis, lo_px, hi_px)
            for a, b, l_, h_ in zip(lo_px.tolist(), hi_px.tolist(), lo.tolist(), hi.tolist()):
                units = []
                for u in range(row.out[axis]):
                    box = row.box(u, 0) if axis == 0 else row.box(0, u)
                    u0, u1 = (box[0], box[1]) if axis == 0 else (box[2], box[3])
                    if u0 < b and a < u1:
                        units.append(u)
                assert (units[0], units[-1] + 1) == (l_, h_) if units else h_ <= l_, (row.name, axis, a, units)


@pytest.mark.parametrize("make,size", [(lambda: Residual(), (20, 18)), (lambda: NegativePool(), (21, 19)),
                                       (lambda: SENet(2, 2, nn.SiLU), (32, 32))])
def test_engine_table_from_its_clean_pass_equals_receptive_fields(make, size):
    """The engine reads the RF table's shapes off its clean pass; the rows equal the shape pass's."""
    from deconvis.graph.rf import receptive_fields

    torch.manual_seed(9)
    model = _randomise_bn(make())
    eng = IncrementalOcclusion(model, torch.randn(1, 3, *size, dtype=torch.float64), (3, 3))
    want = receptive_fields(model, size)
    rows = [(r.name, r.out, r.rf, r.jump, r.start, r.whole) for r in eng.table]
    assert rows == [(r.name, r.out, r.rf, r.jump, r.start, r.whole) for r in want] and len(rows) >= 8


def test_float32_within_round_off():
    torch.manual_seed(4)
    model = _randomise_bn(Residual()).float()
    x = torch.randn(1, 3, 20, 18)
    fill = fill_values(x, "mean")
    tops = _positions(20, 18, (6, 5), (4, 3))
    _, lg, s = incremental(model, x, tops, (6, 5), fill, "b2.bn2", 16)
    lg0, s0 = naive(model, x, tops, (6, 5), fill, model.b2.bn2)
    assert float((lg - lg0).abs().max()) <= 1e-5 * float(lg0.abs().max())
    assert float((s - s0).abs().max()) <= 1e-5 * float(s0.abs().max())


def test_square_sizes_and_positions_are_checked_on_every_side():
    """On a 7x9 image: a square side from 1 up to the image's fits, 0 or past it does not; a
    position past any one of the four edges is named (the first bad one)."""
    net = nn.Sequential(nn.Conv2d(3, 2, 3)).double()
    x = torch.randn(1, 3, 7, 9, dtype=torch.float64)
    for size in ((1, 1), (7, 9), (3, 2)):
        h, w = size
        eng = IncrementalOcclusion(net, x, size)
        eng.check_positions(torch.tensor([[0, 0], [7 - h, 9 - w]]))
        for bad in ([-1, 0], [0, -1], [7 - h + 1, 0], [0, 9 - w + 1]):
            with pytest.raises(DeconvisError, match=r"^square at \[%d, %d\] runs past the 7x9 image$" % tuple(bad)):
                eng.check_positions(torch.tensor([[0, 0], bad, [0, 0]]))
    for size in ((0, 2), (2, 0), (8, 2), (3, 10)):
        with pytest.raises(DeconvisError, match=r"^square %dx%d px does not fit the 7x9 image; use a side "
                                                r"between 1 and 7$" % size):
            IncrementalOcclusion(net, x, size).check_positions(torch.zeros(1, 2, dtype=torch.int64))
