"""Receptive fields of torchvision AlexNet, VGG and ResNet: the numbers of docs/method.md section 3, and the empirical
gradient support of a geometry-identical slim copy (every conv 1 -> 1 channel with positive
weights, no ReLU/BN, max-pools as avg pools) as the oracle."""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from deconvis.errors import DeconvisError
from deconvis.graph.rf import receptive_fields, resolve_layer

DT = torch.float64


def meta_model(name: str) -> nn.Module:
    """A torchvision model on the meta device: geometry without the cost of initialising weights."""
    with torch.device("meta"):
        return torchvision.models.get_model(name, weights=None)


def slim_positive_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """Same geometry, one channel everywhere, positive weights, linear: its input-gradient support
    for a unit is exactly the set of pixels connected to it. Works for meta-device models (every
    parameterised layer is replaced by a CPU one)."""
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for name, mod in list(m.named_modules()):
        new = None
        if isinstance(mod, nn.Conv2d):
            new = nn.Conv2d(1, 1, mod.kernel_size, mod.stride, mod.padding, mod.dilation, bias=False).to(DT)
            with torch.no_grad():
                new.weight.copy_(0.5 + torch.rand(new.weight.shape, generator=gen, dtype=DT))
        elif isinstance(mod, (nn.ReLU, nn.BatchNorm2d, nn.Linear, nn.Dropout)):
            new = nn.Identity()
        elif isinstance(mod, nn.MaxPool2d):
            assert mod.dilation in (1, (1, 1))
            new = nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding, ceil_mode=mod.ceil_mode)
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, attr, new)
    return m.eval()


def supports(oracle: nn.Module, requests, size):
    """Per (module, units) request, the support mask [H, W] of each unit (one forward/backward)."""
    outs = {}
    hooks = [mod.register_forward_hook(lambda m, i, o, r=r: outs.__setitem__(r, o))
             for r, (mod, _u) in enumerate(requests)]
    n = sum(len(u) for _m, u in requests)
    x = torch.randn(n, 1, *size, dtype=DT, requires_grad=True)
    try:
        oracle(x)
    finally:
        for h in hooks:
            h.remove()
    seed, b = 0, 0
    for r, (_m, units) in enumerate(requests):
        for u in units:
            seed = seed + outs[r][b, 0, u[0], u[1]]
            b += 1
    (g,) = torch.autograd.grad(seed, x)
    masks = (g[:, 0] != 0).numpy()
    res, b = [], 0
    for _m, units in requests:
        res.append(list(masks[b:b + len(units)]))
        b += len(units)
    return res


def units_of(out, n, seed=0):
    h, w = out
    rng = random.Random(seed)
    fixed = {(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)}
    rest = [(y, x) for y in range(h) for x in range(w) if (y, x) not in fixed]
    return sorted(fixed | set(rng.sample(rest, min(len(rest), n - len(fixed)))))


def assert_supports_are_boxes(model, table, layers, size, n_units=12):
    """Each unit's support is exactly its clipped box, with no holes."""
    oracle = slim_positive_copy(model)
    reqs = []
    for row_name, module_name in layers:
        reqs.append((oracle.get_submodule(module_name), units_of(table[row_name].out, n_units)))
    for (row_name, _), (_mod, units), masks in zip(layers, reqs, supports(oracle, reqs, size)):
        for u, mask in zip(units, masks):
            (y0, y1, x0, x1), _ = table.clipped_box(row_name, *u)
            ys, xs = np.nonzero(mask)
            assert ys.size, (row_name, u)
            assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (y0, y1, x0, x1), (row_name, u)
            assert mask[y0:y1, x0:x1].all(), (row_name, u)


# ---------------------------------------------------------------------- the numbers of docs/method.md section 3
def test_alexnet_224_numbers():
    m = meta_model("alexnet")
    t = receptive_fields(m, 224)
    conv1 = t["features.0"]
    assert (conv1.rf, conv1.jump, conv1.start, conv1.out) == ((11, 11), (4, 4), (3.0, 3.0), (55, 55))
    # conv2 by hand: pool1 r = 11 + 2*4 = 19, j = 8, start = 3 + 4 = 7; conv2 k5 p2: r = 19 + 4*8
    assert (t["features.3"].rf, t["features.3"].jump, t["features.3"].start) == ((51, 51), (8, 8), (7.0, 7.0))
    conv5 = t[resolve_layer(m, t, "conv5")]          # DeconvNet alias: rectified conv5 = features.11
    assert conv5.name == "features.11"
    assert (conv5.rf, conv5.jump, conv5.start, conv5.out) == ((163, 163), (16, 16), (15.0, 15.0), (13, 13))
    assert t["avgpool"].rf == t["features.12"].rf     # adaptive 6x6 -> 6x6: identity
    fc = t["classifier.6"]
    assert fc.whole and fc.rf == (224, 224) and fc.box(0, 0) == (0, 224, 0, 224)


def test_vgg16_224_numbers():
    t = receptive_fields(meta_model("vgg16"), 224)
    conv53 = t["features.29"]                          # rectified conv5_3
    assert (conv53.rf, conv53.jump, conv53.start, conv53.out) == ((196, 196), (16, 16), (7.5, 7.5), (14, 14))
    assert t["features.28"].rf == (196, 196)
    assert (t["features.0"].rf, t["features.0"].start) == ((3, 3), (0.0, 0.0))
    assert (t["features.4"].rf, t["features.4"].jump, t["features.4"].start) == ((6, 6), (2, 2), (0.5, 0.5))


@pytest.mark.parametrize("depth", [11, 13, 16, 19])
def test_vgg_bn_variants_match_plain(depth):
    plain = receptive_fields(meta_model(f"vgg{depth}"), 224)
    bn = receptive_fields(meta_model(f"vgg{depth}_bn"), 224)
    geo = lambda r: (r.kind, r.out, r.rf, r.jump, r.start)
    strip = lambda t: [geo(r) for r in t if r.kind != "BatchNorm2d"]
    assert strip(plain) == strip(bn)
    for i, r in enumerate(bn.layers):
        if r.kind == "BatchNorm2d":
            assert geo(r)[1:] == geo(bn.layers[i - 1])[1:]
    convs = [r for r in plain if r.kind == "Conv2d"]
    assert len(convs) == {11: 8, 13: 10, 16: 13, 19: 16}[depth]
    last = [c for c in convs if c.out == (14, 14)]    # block 5: jump 16, each 3x3 conv adds 2 * 16
    assert len(last) == {11: 2, 13: 2, 16: 3, 19: 4}[depth]
    assert all(c.jump == (16, 16) and c.start == (7.5, 7.5) for c in last)
    assert all(b.rf[0] - a.rf[0] == 32 for a, b in zip(last, last[1:]))
    if depth == 16:
        assert last[-1].rf == (196, 196)


# ------------------------------------------------------------------------- empirical oracle
def test_alexnet_matches_support():
    m = meta_model("alexnet")
    t = receptive_fields(m, 224)
    assert_supports_are_boxes(m, t, [(n, n) for n in ("features.0", "features.2", "features.3", "features.11",
                                                      "features.12")], (224, 224))


def test_vgg16_matches_support_at_64():
    m = meta_model("vgg16")
    t = receptive_fields(m, 64)
    assert_supports_are_boxes(m, t, [("features.2", "features.2"), ("features.9", "features.9"),
                                     ("features.21", "features.21"), ("features.28", "features.28")], (64, 64))


@pytest.mark.parametrize("arch,size", [("resnet18", 96), ("resnet50", 128)])
def test_resnet_stages_match_support(arch, size):
    m = torchvision.models.get_model(arch, weights=None) if arch == "resnet18" else meta_model(arch)
    t = receptive_fields(m, size)
    stages = [(f"layer{i}", f"layer{i}") for i in range(1, 5)] + [("maxpool", "maxpool")]
    assert t["layer4"].jump == (32, 32) and t["layer1"].jump == (4, 4)
    assert_supports_are_boxes(m, t, stages, (size, size))
    adds = [r for r in t if r.kind == "add"]          # residual adds: branches aligned at start 0
    assert len(adds) == (8 if arch == "resnet18" else 16) and all(r.start == (0.0, 0.0) for r in adds)


def test_resnet_names_and_whole_head():
    t = receptive_fields(meta_model("resnet50"), 224)
    names = [r.name for r in t]
    assert names.index("layer1.0.relu") < names.index("layer1.0.relu#2") < names.index("layer1.0.relu#3")
    assert t["layer1"].name == "layer1.2.relu#3" and t["layer4"].name == "layer4.2.relu#3"
    assert t["layer4"].out == (7, 7) and t["layer4"].jump == (32, 32)
    assert t["avgpool"].whole and t["fc"].rf == (224, 224)
    assert sum(r.kind == "add" for r in t) == 16


class ShortcutD(nn.Module):
    """A ResNet-D style block whose shortcut average-pools first (centre offset by half a stride):
    the branches are misaligned and receptive fields are undefined."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.proj = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return torch.relu(self.conv(x) + self.proj(self.pool(x)))


def test_misaligned_residual_names_both_paths():
    with pytest.raises(DeconvisError) as e:
        receptive_fields(ShortcutD(), 16)
    msg = str(e.value)
    assert "conv (jump 2, start 0)" in msg and "proj (jump 2, start 0.5)" in msg and "\n" not in msg


# ------------------------------------------- channels-last blocks and squeeze-excitation gates
def _support_bbox(model: nn.Module, module_name: str, units, size: int, seed: int = 0):
    """Bounding boxes (y0, y1, x0, x1) of the input-gradient support of each unit (y, x) of a
    module's output, in the real model (random weights, float64): one backward per unit."""
    torch.manual_seed(seed)
    out = {}
    h = model.get_submodule(module_name).register_forward_hook(lambda m, i, o: out.__setitem__("a", o))
    x = torch.randn(1, 3, size, size, dtype=DT, requires_grad=True)
    try:
        model(x)
    finally:
        h.remove()
    boxes = []
    for y, xx in units:
        (g,) = torch.autograd.grad(out["a"][0, 0, y, xx], x, retain_graph=True)
        ys, xs = np.nonzero(g[0].abs().sum(0).numpy())
        boxes.append((ys.min(), ys.max() + 1, xs.min(), xs.max() + 1))
    return boxes


def test_convnext_rows_match_gradient_support():
    """ConvNeXt's blocks go channels-last for LayerNorm and the pointwise Linears and back: these
    act per position, so the field is that of the convs alone."""
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny().double().eval()
    size = 64
    table = receptive_fields(model, size)
    for layer in ("features.1", "features.3", "features.4"):
        row = table[layer]
        assert not row.whole
        units = units_of(row.out, 6)
        for u, bbox in zip(units, _support_bbox(model, layer, units, size)):
            assert bbox == table.clipped_box(layer, *u)[0], (layer, u)


def test_se_gate_rows_are_whole_with_a_local_field_that_matches_the_detached_gate():
    """After a squeeze-excitation gate every unit depends on the whole image (row.whole, JSON flag);
    the local field is the gradient support with the gate detached (the conv path only)."""
    from torchvision.ops.misc import SqueezeExcitation

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small().double().eval()
    size = 96
    table = receptive_fields(model, size)
    row = table["features.4"]
    assert row.whole and row.local is not None
    rec = row.to_record()
    assert rec["whole"] is True and rec["local"]["rf"] == list(row.local.rf)
    assert table["features.0"].to_record()["whole"] is False and "local" not in table["features.0"].to_record()
    detached = copy.deepcopy(model)
    for m in detached.modules():
        if isinstance(m, SqueezeExcitation):
            m.forward = (lambda self: lambda x: self._scale(x).detach() * x)(m)
    units = units_of(row.out, 6)
    for u, bbox in zip(units, _support_bbox(detached, "features.4", units, size)):
        assert bbox == table.crop_box("features.4", *u)[0], u
    # with the gate attached the support is the whole image: the whole flag is right
    (full,) = _support_bbox(model, "features.4", [units[0]], size)
    assert full == (0, size, 0, size)
