"""``DeconvNet.project_map`` (a whole feature map seeded at once, ZF's strongest-map view) through
ReLUs, against the autograd oracle with the ReLU backward replaced (docs/method.md section 1)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autograd_oracle import _patch
from deconvis.mirror.deconvnet import DeconvNet


def _oracle_map(model: nn.Module, images: torch.Tensor, layer: str, image_index: int, channels, rule: str):
    out = []
    for c in channels:
        m = copy.deepcopy(model).eval()
        _patch(m, rule)
        got = {}
        m.get_submodule(layer).register_forward_hook(lambda mod, i, o: got.__setitem__("a", o))
        x = images[image_index:image_index + 1].clone().requires_grad_(True)
        m(x)
        act = got["a"]
        seed = torch.zeros_like(act)
        seed[0, c] = act[0, c]  # every position of the channel keeps its own value
        (g,) = torch.autograd.grad(act, x, seed)
        out.append(g[0])
    return torch.stack(out)


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
def test_project_map_through_relus_matches_autograd(rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(5, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3)).double().eval()
    images = torch.randn(3, 3, 14, 14, dtype=torch.float64)
    dn = DeconvNet(model)
    dn.forward(images)
    for layer in ("4", "5"):  # a ReLU output, and a conv whose seed goes through ReLUs below
        got = dn.project_map(layer, 2, [0, 2, 3], rule=rule)
        want = _oracle_map(model, images, layer, 2, [0, 2, 3], rule)
        assert got.shape == want.shape == (3, 3, 14, 14)
        assert float(want.abs().max()) > 0
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (layer, float((got - want).abs().max()))


def test_project_map_is_not_the_sum_of_units_through_a_relu():
    """Seeding all positions at once differs from summing single-unit projections once a ReLU
    rule acts on the combined signal: the test above is not a linear identity in disguise."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).double().eval()
    dn = DeconvNet(model)
    a = dn.forward(torch.randn(1, 3, 8, 8, dtype=torch.float64))["2"]
    full = dn.project_map("2", 0, [1])
    units = torch.tensor([[0, 1, y, x] for y in range(a.shape[2]) for x in range(a.shape[3])])
    summed = dn.project("2", units).sum(0, keepdim=True)
    assert not torch.allclose(full, summed, rtol=1e-6, atol=1e-9)
