"""The mirror equals autograd with the ReLU rule replaced (docs/method.md section 1), to float64 round-off,
for every layer of every supported architecture, on random units of random inputs."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vgg import VGG, cfgs, make_layers

from autograd_oracle import oracle_project
from deconvis.mirror.deconvnet import RULES, DeconvNet

TOL = 1e-10


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.randn(c, generator=gen))
                m.bias.data.copy_(torch.randn(c, generator=gen) * 0.2)


def alexnet():
    m = torchvision.models.AlexNet(num_classes=10)
    m.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 24), nn.ReLU(inplace=True),
                                 nn.Dropout(), nn.Linear(24, 10))
    return m, 67


def vgg11_bn():
    with torch.device("meta"):  # skip allocating torchvision's 100M-parameter classifier
        m = VGG(make_layers(cfgs["A"], batch_norm=True), num_classes=10, init_weights=False)
    m.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, 10))
    m = m.to_empty(device="cpu")
    for mod in m.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
    return m, 32


def zoo_stack():
    """Nested Sequential with non-square, strided, dilated, grouped convs, BN, LRN, dropout,
    overlapping/padded/ceil-mode max-pools and an average pool."""
    m = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 6, (3, 5), stride=(1, 2), padding=(1, 2)), nn.BatchNorm2d(6),
                      nn.ReLU(inplace=True)),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.LocalResponseNorm(3),
        nn.Sequential(nn.Conv2d(6, 8, 3, dilation=2, padding=2, groups=2), nn.ReLU()),
        nn.Dropout2d(0.3),
        nn.MaxPool2d((2, 3), stride=(2, 1), dilation=(1, 2)),
        nn.AvgPool2d(2, stride=1, padding=1),
        nn.Conv2d(8, 5, 1),
        nn.ReLU(),
    )
    return m, (23, 29)


class Functional(nn.Module):
    """A hand-written forward with functional ReLUs and flatten."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def functional():
    return Functional(), 16


ARCHS = {"alexnet": alexnet, "vgg11_bn": vgg11_bn, "zoo_stack": zoo_stack, "functional": functional}


@functools.lru_cache(maxsize=None)
def _build_cached(arch: str):
    gen = torch.Generator().manual_seed(sum(map(ord, arch)))
    torch.manual_seed(sum(map(ord, arch)))
    model, size = ARCHS[arch]()
    _randomise_bn(model, gen)
    model = model.double().eval()
    h, w = (size, size) if isinstance(size, int) else size
    images = torch.randn(3, 3, h, w, generator=gen, dtype=torch.float64)
    return model, images


def _build(arch: str):
    model, images = _build_cached(arch)
    return copy.deepcopy(model), images.clone()


def _units(act: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    nz = act.nonzero()
    pick = nz[torch.randperm(len(nz), generator=gen)[:n]]
    if act.dim() == 2:
        pick = torch.cat([pick, torch.zeros(len(pick), 2, dtype=torch.long)], 1)
    return pick


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_layer_matches_autograd_oracle(arch):
    model, images = _build(arch)
    dn = DeconvNet(model)
    acts = dn.forward(images)
    gen = torch.Generator().manual_seed(1)
    named = {n for n, _ in model.named_modules()}
    checked = 0
    for layer in dn.layer_names:
        if layer not in named:  # functional steps cannot be hooked by the oracle
            continue
        units = _units(acts[layer], 2, gen)
        if len(units) == 0:
            continue
        for rule in RULES:
            got = dn.project(layer, units, rule=rule)
            want = oracle_project(model, images, layer, units, rule,
                                  patch_functional_relu=(arch == "functional"))
            assert want.norm() > 0
            assert _rel(got, want) <= TOL, (arch, layer, rule, _rel(got, want))
            checked += 1
    assert checked >= 3 * 4


def test_gradient_rule_is_the_plain_input_gradient():
    model, images = _build("alexnet")
    dn = DeconvNet(model)
    dn.forward(images)
    units = torch.tensor([[1, 7, 2, 1], [2, 100, 1, 0]])
    got = dn.project("features.10", units, rule="gradient")
    x = images[units[:, 0]].clone().requires_grad_(True)
    act = model.features[:11](x)
    seed = torch.zeros_like(act)
    ar = torch.arange(len(units))
    seed[ar, units[:, 1], units[:, 2], units[:, 3]] = act[ar, units[:, 1], units[:, 2], units[:, 3]]
    (want,) = torch.autograd.grad(act, x, seed)
    assert want.norm() > 0 and _rel(got, want) <= TOL


@pytest.mark.parametrize("arch", ["alexnet", "vgg11_bn", "zoo_stack"])
@pytest.mark.parametrize("rule", RULES)
def test_windowed_equals_full_image(arch, rule):
    model, images = _build(arch)
    dn = DeconvNet(model)
    acts = dn.forward(images)
    gen = torch.Generator().manual_seed(2)
    H, W = images.shape[-2:]
    for layer in dn.layer_names:
        if acts[layer].dim() != 4:
            continue
        units = _units(acts[layer], 3, gen)
        if len(units) == 0:
            continue
        full = dn.project(layer, units, rule=rule)
        rec, boxes = dn.project_window(layer, units, rule=rule)
        assert rec.shape[0] == len(units)
        pasted = torch.zeros_like(full)
        for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
            assert (y1 - y0, x1 - x0) == tuple(rec.shape[-2:])
            cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
            pasted[i, :, cy0:cy1, cx0:cx1] = rec[i, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
            outside = torch.ones(H, W, dtype=torch.bool)
            outside[cy0:cy1, cx0:cx1] = False
            assert float(full[i][:, outside].abs().sum()) == 0.0  # nothing outside the RF
        assert _rel(pasted, full) <= TOL, (arch, layer, rule)


def test_windowed_box_equals_receptive_field_geometry():
    """AlexNet at 224 px: the window of unit (y, x) is the RF box of docs/method.md section 3."""
    model = torchvision.models.alexnet().eval()
    dn = DeconvNet(model)
    dn.forward(torch.randn(1, 3, 224, 224))
    # (layer, rf, jump, start) from docs/method.md section 3
    for layer, r, j, start in [("conv1", 11, 4, 3), ("conv5", 163, 16, 15)]:
        units = torch.tensor([[0, 0, 0, 0], [0, 1, 5, 2], [0, 2, 12, 12]])
        rec, boxes = dn.project_window(layer, units)
        assert tuple(rec.shape[-2:]) == (r, r)
        for (_, _, y, x), box in zip(units.tolist(), boxes.tolist()):
            cy, cx = start + y * j, start + x * j
            assert box == [cy - (r - 1) // 2, cy + (r - 1) // 2 + 1, cx - (r - 1) // 2, cx + (r - 1) // 2 + 1]
