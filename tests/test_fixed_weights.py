"""The mirror's filters kept between calls inside ``DeconvNet.fixed_weights()`` (the projection
phase): the same numbers as the filters computed per call, on both paths and with a BatchNorm
folded into a conv; a parameter changed in place inside the block (an optimizer step, a
state_dict load) is followed; outside the block nothing is kept."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deconvis.mirror.deconvnet import DeconvNet
from window_check import border_units


def _net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(21)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    for m in net.modules():  # BatchNorms that scale: random statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_()
            m.weight.data.uniform_(0.5, 1.5)
    return net.to(dtype).eval()


def _projections(dn: DeconvNet, layer: str, units: torch.Tensor):
    return dn.project_window(layer, units)[0], dn.project(layer, units)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kept_filters_give_the_per_call_numbers(dtype):
    net = _net(dtype)
    x = torch.randn(2, 3, 20, 20, dtype=dtype, generator=torch.Generator().manual_seed(3))
    dn, ref = DeconvNet(net), DeconvNet(copy.deepcopy(net))
    acts = dn.forward(x)
    ref.forward(x)
    units = border_units(acts["6"])
    with dn.fixed_weights():
        first = _projections(dn, "6", units)
        w1 = dn.mirror.conv_weight(dn.graph.node("4"), dtype, True)
        assert dn.mirror.conv_weight(dn.graph.node("4"), dtype, True) is w1  # kept
        again = _projections(dn, "6", units)
    want = _projections(ref, "6", units)
    for a, b, c in zip(first, again, want):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
    # outside the block nothing is kept
    assert dn.mirror.conv_weight(dn.graph.node("4"), dtype, True) is not dn.mirror.conv_weight(
        dn.graph.node("4"), dtype, True)


def _set_running_var(net):
    with torch.no_grad():
        net[5].running_var.mul_(3.0)


def _step_conv_weight(net):
    with torch.no_grad():  # as an optimizer step: in place, under no_grad
        net[4].weight.mul_(-0.5).add_(0.1)


def _load_first_conv(net):
    net[0].load_state_dict({"weight": torch.randn_like(net[0].weight), "bias": net[0].bias.detach().clone()})


@pytest.mark.parametrize("change", [_set_running_var, _step_conv_weight, _load_first_conv])
def test_a_parameter_changed_inside_the_block_is_followed(change):
    dtype = torch.float64
    net = _net(dtype)
    x = torch.randn(2, 3, 20, 20, dtype=dtype, generator=torch.Generator().manual_seed(4))
    dn = DeconvNet(net)
    acts = dn.forward(x)
    units = border_units(acts["6"])
    with dn.fixed_weights():
        before = _projections(dn, "6", units)
        change(net)
        dn.forward(x)
        after = _projections(dn, "6", units)
    fresh = DeconvNet(copy.deepcopy(net))
    fresh.forward(x)
    want = _projections(fresh, "6", units)
    for a, b, c in zip(before, after, want):
        assert not torch.allclose(a, b)
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12)
