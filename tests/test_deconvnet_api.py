"""DeconvNet's contract: names and aliases, clear errors, the user's model left untouched,
parameters shared (not copied), strongest units, whole-map mode, display normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from autograd_oracle import oracle_project
from deconvis.mirror.deconvnet import DeconvNet
from deconvis.render.display import to_uint8
from deconvis.errors import DeconvisError


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    ).double()


def test_aliases_alexnet_and_vgg():
    dn = DeconvNet(torchvision.models.alexnet())
    assert [dn.resolve(f"conv{i}") for i in range(1, 6)] == ["features.1", "features.4", "features.7",
                                                             "features.9", "features.11"]
    assert dn.conv_layers() == ["features.1", "features.4", "features.7", "features.9", "features.11"]
    assert dn.resolve("pool1") == "features.2" and dn.resolve("fc6") == "classifier.2"
    assert dn.display_name("features.11") == "conv5"
    with torch.device("meta"):
        vgg = torchvision.models.vgg16()
    dn = DeconvNet(vgg)
    assert dn.resolve("conv5_3") == "features.29" and dn.resolve("conv1_1") == "features.1"
    assert dn.display_name("features.29") == "conv5_3"
    with torch.device("meta"):
        vggbn = torchvision.models.vgg16_bn()
    assert DeconvNet(vggbn).resolve("conv1_2") == "features.5"  # conv, BN, ReLU


def test_unknown_layer_lists_close_matches():
    dn = DeconvNet(small_net())
    with pytest.raises(DeconvisError, match=r"unknown layer 'conv3'.*did you mean"):
        dn.resolve("conv3")


def test_errors_are_clear():
    dn = DeconvNet(small_net())
    with pytest.raises(DeconvisError, match="call forward"):
        dn.project("conv1", [[0, 0, 0, 0]])
    with pytest.raises(DeconvisError, match=r"4 dims"):
        dn.forward(torch.randn(3, 16, 16, dtype=torch.float64))
    with pytest.raises(DeconvisError, match="channels"):
        dn.forward(torch.randn(1, 1, 16, 16, dtype=torch.float64))
    with pytest.raises(DeconvisError, match="too small"):
        dn.forward(torch.randn(1, 3, 1, 1, dtype=torch.float64))
    dn.forward(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(DeconvisError, match=r"out of range.*channel"):
        dn.project("conv1", [[0, 9, 0, 0]])
    with pytest.raises(DeconvisError, match=r"out of range.*image"):
        dn.project("conv1", [[2, 0, 0, 0]])
    with pytest.raises(DeconvisError, match=r"shape \[M, 4\]"):
        dn.project("conv1", [[0, 0, 0]])
    with pytest.raises(DeconvisError, match="integer"):
        dn.project("conv1", torch.zeros(1, 4))
    with pytest.raises(DeconvisError, match="unknown rule"):
        dn.project("conv1", [[0, 0, 0, 0]], rule="backprop")


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y = self.conv(x).flatten(2).transpose(1, 2)
        return self.attn(y, y, y)[0]


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_refused_models_are_named_with_the_op():
    with pytest.raises(DeconvisError, match=r"attention op at node \d+ of \d+ \('attn', MultiheadAttention\)"):
        DeconvNet(_Attention())
    with pytest.raises(DeconvisError, match=r"torch.fx could not trace _DataDependent.*control flow"):
        DeconvNet(_DataDependent())


def test_smooth_ops_take_their_exact_derivative():
    """A sigmoid on the path (no deconvnet rule of its own) is differentiated exactly: the
    projection through it equals autograd with the ReLU rule swapped."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 4, 3), nn.ReLU()).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    dn = DeconvNet(net)
    dn.forward(x)
    units = dn.strongest("3", 3)  # active units: a zero seed would make the test vacuous
    for rule in ("deconvnet", "guided", "gradient"):
        got = dn.project("3", units, rule=rule)
        want = oracle_project(net, x, "3", units, rule)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * want.abs().max())
        assert want.abs().max() > 0


def test_model_untouched_and_outputs_unchanged():
    model = small_net().train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    ref = model(x.clone())
    model.train()
    dn = DeconvNet(model)
    acts = dn.forward(x)
    dn.project("conv2", dn.strongest("conv2", 2), rule="guided")
    dn.project_window("conv2", dn.strongest("conv2", 2))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats included
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    assert torch.equal(model(x.clone()), ref)
    assert torch.allclose(acts["8"], ref)  # DeconvNet's forward gives the model's eval output


def test_parameters_are_shared_not_copied():
    model = small_net().eval()
    dn = DeconvNet(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        model[3].weight.mul_(-1.5)  # "training" changes the weights after the mirror was built
    dn.forward(x)
    units = dn.strongest("5", 1)[:3]
    want = oracle_project(model, x, "5", units, "deconvnet")
    got = dn.project("5", units)
    assert float((got - want).norm() / want.norm()) < 1e-10


def test_float32_follows_model_dtype():
    model = small_net().float()
    dn = DeconvNet(model)
    dn.forward(torch.randn(2, 3, 16, 16, dtype=torch.float64))  # cast to the model's dtype
    rec = dn.project("conv2", dn.strongest("conv2"))
    assert rec.dtype == torch.float32 and rec.shape == (6, 3, 16, 16)


def test_strongest_matches_brute_force_with_ties():
    dn = DeconvNet(small_net())
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    x[2] = x[0]  # image 2 repeats image 0: ties go to the smaller image index
    acts = dn.forward(x)
    a = acts["1"]
    units = dn.strongest("conv1", k=2)
    assert units.shape == (4 * 2, 4)
    for c in range(4):
        vals = sorted(((float(a[n, c, y, xx]), -n, -y, -xx) for n in range(3) for y in range(16)
                       for xx in range(16)), reverse=True)[:2]
        want = [[-nn_, c, -yy, -xx_] for _, nn_, yy, xx_ in vals]
        assert units[2 * c: 2 * c + 2].tolist() == want


def test_project_map_is_sum_of_single_units_before_nonlinearity():
    """Whole-map seeding through a purely linear path equals the sum of unit projections."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3)).double()
    dn = DeconvNet(model)
    acts = dn.forward(torch.randn(2, 3, 12, 12, dtype=torch.float64))
    a = acts["2"]
    full = dn.project_map("2", 1, [3])
    units = torch.tensor([[1, 3, y, x] for y in range(a.shape[2]) for x in range(a.shape[3])])
    summed = dn.project("2", units).sum(0, keepdim=True)
    assert torch.allclose(full, summed, rtol=1e-10, atol=1e-12)


def test_to_uint8_contrast_stretch():
    rec = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    rec[0, 0, 0, 0] = 2.0
    rec[0, 1, 1, 1] = -1.0
    rec[1, 2, 2, 2] = 0.5
    img = to_uint8(rec)
    assert img.shape == (2, 4, 4, 3) and img.dtype == np.uint8
    assert img[0, 0, 0, 0] == 255 and img[0, 1, 1, 1] == round(128 - 63.5) and img[0, 2, 2, 2] == 128
    assert img[1, 2, 2, 2] == 255  # per-image scale
    shared = to_uint8(rec, shared=True)
    assert shared[1, 2, 2, 2] == round(128 + 127 * 0.25)
    assert (to_uint8(torch.zeros(1, 3, 2, 2)) == 128).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_to_uint8_scale_is_the_largest_magnitude_of_either_sign(dtype):
    # random signed reconstructions whose extreme is negative in one image and positive in another,
    # against 128 + 127 v / max|v| in float64 (float32: one level off at most, at rounding ties)
    rec = torch.randn(4, 3, 9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rec[1] -= 5.0
    rec[2] += 5.0
    v = rec.numpy()
    ref = np.round(128 + 127 * v / np.abs(v).reshape(4, -1).max(1)[:, None, None, None]).transpose(0, 2, 3, 1)
    got = to_uint8(rec.to(dtype)).astype(np.int64)
    assert np.abs(got - ref).max() <= (0 if dtype == torch.float64 else 1)
    assert got[1].min() == 1 and got[2].max() == 255
    # a channels-last batch (the mirror's float32 windows on the CPU): the same tiles, bit for bit
    cl = rec.to(dtype).contiguous(memory_format=torch.channels_last)
    assert np.array_equal(to_uint8(cl), to_uint8(rec.to(dtype)))
