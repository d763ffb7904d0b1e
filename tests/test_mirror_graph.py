"""The mirror on any traced graph (ResNet, DenseNet, GoogLeNet, MobileNet, EfficientNet, ShuffleNet,
SqueezeNet, ConvNeXt, and a hand-built net with every ReLU-family unit), against an independent
oracle: the model's own eval forward under a TorchFunctionMode that swaps the ReLU-family backward
(tests/autograd_oracle.py), float64, random weights and inputs, all three rules. Also: the
windowed path equals the full path, and the user's model is left untouched."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from autograd_oracle import graph_oracle_project
from deconvis.errors import DeconvisError
from deconvis.mirror.deconvnet import DeconvNet

RULES = ("deconvnet", "guided", "gradient")


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """float64, eval, BN running statistics and affine parameters drawn at random."""
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.1)
    return model


def _units(act: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` random units (image, channel, y, x) among those with a positive activation."""
    g = torch.Generator().manual_seed(seed)
    if act.dim() == 2:
        act = act[:, :, None, None]
    pos = (act > 0).nonzero()
    if len(pos) == 0:
        pos = torch.cartesian_prod(*[torch.arange(s) for s in act.shape])
    return pos[torch.randperm(len(pos), generator=g)[:n]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# (builder, input size, [(layer as the user names it, module for the oracle, its call)])
ZOO = {
    "resnet18": (lambda: torchvision.models.resnet18(), 64,
                 [("layer1.0.relu#2", "layer1.0.relu", 2), ("layer2", "layer2", 1), ("layer4.1", "layer4.1", 1)]),
    "resnet50": (lambda: torchvision.models.resnet50(), 64, [("layer1", "layer1", 1), ("layer3", "layer3", 1)]),
    "densenet121": (lambda: torchvision.models.densenet121(), 64,
                    [("features.denseblock2", "features.denseblock2", 1), ("features.transition3", "features.transition3", 1)]),
    "googlenet": (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=True), 64,
                  [("inception3b", "inception3b", 1), ("inception4e", "inception4e", 1)]),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), 64, [("features.4", "features.4", 1), ("features.14", "features.14", 1)]),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), 64,
                           [("features.2", "features.2", 1), ("features.6", "features.6", 1)]),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), 64, [("features.3", "features.3", 1), ("features.6", "features.6", 1)]),
    "shufflenet_v2": (lambda: torchvision.models.shufflenet_v2_x0_5(), 64, [("stage2", "stage2", 1), ("stage4", "stage4", 1)]),
    "squeezenet": (lambda: torchvision.models.squeezenet1_1(), 64, [("features.4", "features.4", 1), ("features.12", "features.12", 1)]),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(), 64, [("features.1", "features.1", 1), ("features.5", "features.5", 1)]),
}


#: the zoo layers the windowed path cannot run on (project_window takes the full path there), and why
FULL_PATH = {
    "mobilenet_v3_small": "squeeze-excitation gates: every unit sees the whole image",
    "efficientnet_b0": "squeeze-excitation gates: every unit sees the whole image",
    "shufflenet_v2": "the channel shuffle reshapes to 5-D maps",
    "convnext_tiny": "channels-last permutes with LayerNorm and per-position Linear",
}


@pytest.mark.parametrize("arch", list(ZOO))
def test_zoo_matches_oracle_and_windowed_equals_full(arch, monkeypatch):
    """Every listed layer of each model, 64 px, two random active units, all three rules; the
    windowed backward forced (no full-path cut-over) on every layer where it can run."""
    _check_zoo(arch, ZOO[arch][2], monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ZOO))
def test_zoo_bigger_inputs_more_units(arch, monkeypatch):
    """The same at 96 px with six units per layer."""
    _check_zoo(arch, ZOO[arch][2], monkeypatch, size=96, n_units=6)


def _check_zoo(arch, targets, monkeypatch, size=None, n_units=2):
    """``project`` against the oracle, and ``project_window`` against ``project`` with the windowed
    backward forced (the cut-over to the full path off) and asserted wherever the path applies."""
    import math

    from deconvis.mirror import deconvnet

    monkeypatch.setattr(deconvnet, "WINDOW_WORK_LIMIT", math.inf)  # compare the windowed path, never skip it
    windowed, real = [], deconvnet.backward_window
    monkeypatch.setattr(deconvnet, "backward_window", lambda *a, **k: windowed.append(1) or real(*a, **k))
    build, default_size, _ = ZOO[arch]
    size = size or default_size
    torch.manual_seed(0)
    model = _randomise(build(), 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # the mirror must use eval semantics anyway and leave the mode alone
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    dn = DeconvNet(model)
    acts = dn.forward(x)
    for i, (layer, module, call) in enumerate(targets):
        act = acts[dn.resolve(layer)]
        units = _units(act, n_units, seed=i)
        for rule in RULES:
            got = dn.project(layer, units, rule=rule)
            want = graph_oracle_project(model, x, module, units, rule, call=call)
            assert want.abs().max() > 0, (arch, layer, rule)
            assert _rel(got, want) <= 1e-10, (arch, layer, rule, _rel(got, want))
            n_before = len(windowed)
            rec, boxes = dn.project_window(layer, units, rule=rule)
            assert (len(windowed) > n_before) == (arch not in FULL_PATH), (arch, layer, "path")
            pasted = torch.zeros_like(got)
            for m, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
                cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, size), max(x0, 0), min(x1, size)
                pasted[m, :, cy0:cy1, cx0:cx1] = rec[m, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
            assert _rel(pasted, got) <= 1e-10, (arch, layer, rule, "windowed")
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


class _Zoo(nn.Module):
    """Every ReLU-family unit (module, functional, in-place, method), a residual add, a
    concatenation, a channel shuffle, a squeeze-excitation gate, a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.prelu = nn.PReLU(8, init=0.2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.leaky = nn.LeakyReLU(0.1, inplace=True)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.relu6 = nn.ReLU6(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.c4 = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.se1 = nn.Conv2d(16, 4, 1)
        self.se2 = nn.Conv2d(4, 16, 1)
        self.c5 = nn.Conv2d(16, 8, 3, stride=2, padding=1)

    def forward(self, x):
        a = self.prelu(self.c1(x))
        b = self.leaky(self.c2(a))
        c = self.relu6(self.c3(b)) + a
        c = torch.relu(c)
        d = torch.cat([c, nn.functional.leaky_relu(b, 0.3)], 1)
        d = self.pool(d)
        n, ch, h, w = d.size()
        d = d.view(n, 2, ch // 2, h, w).transpose(1, 2).contiguous().view(n, ch, h, w)
        e = self.c4(d).relu_()
        s = torch.sigmoid(self.se2(nn.functional.relu(self.se1(e.mean((2, 3), keepdim=True)))))
        return nn.functional.relu(self.c5(e * s), inplace=True)


def test_every_relu_family_unit_and_graph_op_matches_oracle():
    torch.manual_seed(3)
    model = _Zoo().double().eval()
    x = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    dn = DeconvNet(model)
    acts = dn.forward(x)
    for layer, module in (("c5", "c5"), ("c3", "c3"), ("pool", "pool")):
        units = _units(acts[dn.resolve(layer)], 3, seed=1)
        for rule in RULES:
            got = dn.project(layer, units, rule=rule)
            want = graph_oracle_project(model, x, module, units, rule)
            assert want.abs().max() > 0
            assert _rel(got, want) <= 1e-10, (layer, rule, _rel(got, want))
    # the rules differ here (a test that could not fail otherwise)
    units = _units(acts["c5"], 2, seed=2)
    outs = [dn.project("c5", units, rule=r) for r in RULES]
    assert _rel(outs[0], outs[1]) > 1e-3 and _rel(outs[1], outs[2]) > 1e-3


def test_windowed_path_is_used_and_boxes_are_the_rf_boxes():
    """On ResNet-18 the windowed path carries cones (not whole maps) for early stages, and its
    boxes are the receptive-field table's boxes of the same trace."""
    torch.manual_seed(0)
    model = _randomise(torchvision.models.resnet18(), 2)
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    dn = DeconvNet(model)
    dn.forward(x)
    plan = dn.window_plan("layer1")
    assert plan is not None
    ay, ax = plan.axes[plan.nodes[0]]
    assert not ay.full and ay.size < 96  # a real window, smaller than the image
    table = dn.receptive_fields(96)
    units = torch.tensor([[0, 3, 0, 0], [0, 5, 7, 11], [0, 1, 23, 23]])
    _, boxes = dn.project_window("layer1", units)
    for u, b in zip(units.tolist(), boxes.tolist()):
        assert tuple(b) == table.box("layer1", u[2], u[3])


def test_se_gate_layers_take_the_full_path_with_a_local_crop_box():
    torch.manual_seed(0)
    model = _randomise(torchvision.models.mobilenet_v3_small(), 3)
    dn = DeconvNet(model)
    dn.forward(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert dn.window_plan("features.6") is None  # after an SE gate: the whole image
    row = dn.receptive_fields(64)["features.6"]
    assert row.whole and row.local is not None and not row.local.whole
    units = torch.tensor([[0, 2, 1, 1]])
    rec, boxes = dn.project_window("features.6", units)
    assert boxes.tolist() == [[0, 64, 0, 64]]
    assert torch.equal(rec, dn.project("features.6", units))


def test_unknown_layer_lists_containers_and_rows():
    dn = DeconvNet(torchvision.models.resnet18())
    with pytest.raises(DeconvisError, match=r"unknown layer 'layer5'.*did you mean.*layer"):
        dn.resolve("layer5")
