"""The windowed backward (deconvis/mirror/window.py) equals the full one, float64, all three rules,
where the two axes differ and through every op kind it windows. The full path is itself checked
against autograd (tests/test_mirror_graph.py); here the windowed one is forced (no cut-over) and
compared with it on units at the corners, edges and centre, and on batches whose units touch one
side of the map only (the range check that lets the mask product skip a batch, ZERO_BY_BLOCKS off).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deconvis.mirror import deconvnet as dn_module
from deconvis.mirror import window
from deconvis.mirror.deconvnet import DeconvNet
from window_check import assert_windowed_equals_full, border_units

RULES = ("deconvnet", "guided", "gradient")


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) * 2 + 0.2)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.1)
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64) * 0.5)
    return model


def _one_side_batches(act: torch.Tensor) -> list:
    """Unit batches [2, 4] of ``act``'s map: one unit on the middle of one side (top, bottom, left,
    right) and one at the centre, of the two images: the batch's range of units reaches out of
    the map on that side only."""
    h, w = act.shape[-2:]
    c = act.shape[1]
    sides = [(0, w // 2), (h - 1, w // 2), (h // 2, 0), (h // 2, w - 1)]
    return [torch.tensor([[0, 0, y, x], [1, c - 1, h // 2, w // 2]]) for y, x in sides]


def _check(dn, layers, acts, size):
    """Each layer's unit batches (corners, edges and centre; then each side alone) under the three
    rules in turn, windowed against full."""
    for i, layer in enumerate(layers):
        assert dn.window_plan(layer) is not None, layer
        act = acts[dn.resolve(layer)]
        for j, units in enumerate([border_units(act)] + _one_side_batches(act)):
            rule = RULES[(i + j) % len(RULES)]
            assert_windowed_equals_full(dn, layer, units, size, atol=1e-12, rel=1e-9, rule=rule)


def _anisotropic() -> nn.Module:
    """Every geometric setting differs between the axes: kernels, strides, paddings, a dilation, a
    non-square max pool, an average pool of other strides, and a 1 x 1 kernel with padding 1 (the
    border rows and columns of its output read only padding: their windows lie wholly off the
    map, just past its edge, where the average pool below carries them back onto it)."""
    return nn.Sequential(
        nn.Conv2d(3, 6, (3, 5), stride=(1, 2), padding=(1, 3), dilation=(1, 2)), nn.ReLU(),
        nn.MaxPool2d((2, 3), stride=(2, 1), padding=(0, 1)),
        nn.Conv2d(6, 8, (5, 3), stride=(2, 1), padding=(2, 0)), nn.ReLU(),
        nn.AvgPool2d(3, (1, 2), padding=1),
        nn.Conv2d(8, 5, 1, padding=1), nn.ReLU())


# (input size, layers): a map several units high and wide; one where layer 3's map is one row
# high (the target's window is the whole map along y), one where it is one column wide
@pytest.mark.parametrize("size", [(12, 37), (5, 37), (12, 8)])
@pytest.mark.parametrize("blocks", [True, False])
def test_windowed_equals_full_where_the_axes_differ(size, blocks, monkeypatch):
    monkeypatch.setattr(window, "ZERO_BY_BLOCKS", blocks)
    monkeypatch.setattr(dn_module, "WINDOW_WORK_LIMIT", float("inf"))
    torch.manual_seed(11)
    model = _anisotropic().double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    dn = DeconvNet(model)
    acts = dn.forward(x)
    if size != (12, 37):  # the case says what it covers
        t = dn.window_plan("3").axes[dn.graph.node("3")]
        assert (t[0].full, t[1].full) == ((True, False) if size[0] == 5 else (False, True))
    _check(dn, ("0", "3", "6"), acts, size)
    table = dn.receptive_fields(size)
    for layer in ("0", "3", "6"):
        units = border_units(acts[layer])
        _, boxes = dn.project_window(layer, units)
        assert boxes.tolist() == [list(table.box(layer, y, x)) for y, x in units[:, 2:].tolist()]
        # the plan's share of the full backward's work, by its definition: channel-weighted window
        # area (clipped to the map) over map area, summed over the path's nodes
        plan = dn.window_plan(layer)
        maps = [x if n.op == "placeholder" else acts[dn.mirror.tg.row_names[n]] for n in plan.nodes]
        area = sum(v.shape[1] * min(plan.axes[n][0].size, v.shape[2]) * min(plan.axes[n][1].size, v.shape[3])
                   for n, v in zip(plan.nodes, maps))
        assert plan.work == pytest.approx(area / sum(v[0].numel() for v in maps), rel=1e-12)
        assert all(plan.hw[n] == tuple(v.shape[-2:]) for n, v in zip(plan.nodes, maps))


class _Ops(nn.Module):
    """A BatchNorm folded into its conv and one that is not (after a ReLU6), per-channel and
    functional PReLU, LeakyReLU, two branches added, a product with the signal second, a
    difference of two signals, elementwise ops (a module, a function with a tensor keyword, a
    function with number arguments)."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1, self.prelu = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.PReLU(6)
        self.c2, self.relu6, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.ReLU6(), nn.BatchNorm2d(6)
        self.leaky, self.pool = nn.LeakyReLU(0.2), nn.MaxPool2d(2)
        self.ca, self.cb = nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.sig = nn.Sigmoid()
        self.lo = nn.Parameter(torch.tensor(-0.3))
        self.w = nn.Parameter(torch.tensor([0.25]))
        self.c3 = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        a = self.prelu(self.bn1(self.c1(x)))
        b = self.leaky(self.bn2(self.relu6(self.c2(a) * 3)))
        p = self.pool(b)
        s = torch.relu(self.ca(p)) + torch.relu(self.cb(p))
        s = 2 * s - self.sig(s)
        s = torch.clamp(s, min=self.lo)
        s = F.hardtanh(s, -0.5, 0.8)
        s = F.prelu(torch.tanh(input=s), self.w)  # (tanh's input given by keyword)
        return torch.relu(self.c3(s))


@pytest.mark.parametrize("blocks", [True, False])
def test_windowed_equals_full_through_every_op_kind(blocks, monkeypatch):
    monkeypatch.setattr(window, "ZERO_BY_BLOCKS", blocks)
    monkeypatch.setattr(dn_module, "WINDOW_WORK_LIMIT", float("inf"))
    torch.manual_seed(12)
    model = _randomise_bn(_Ops(), 13).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    dn = DeconvNet(model)
    acts = dn.forward(x)
    kinds = {dn.mirror.ops[n].kind for n in dn.window_plan("c3").nodes}
    assert kinds == {"input", "conv", "bn", "relu", "maxpool", "add", "mul", "sub", "generic"}, kinds
    assert len(dn.mirror.folded_bn) == 1  # bn1 folded into c1, bn2 not
    _check(dn, ("c1", "prelu", "c3"), acts, (16, 16))


class _CatConstant(nn.Module):
    """A concatenation of the signal with a constant map (a buffer that does not depend on the
    image): only the signal's channels go down."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(6, 3, 3, padding=1)
        self.register_buffer("const", torch.randn(1, 2, 9, 10))

    def forward(self, x):
        return self.c2(torch.cat([torch.relu(self.c1(x)), self.const], 1))


def test_windowed_equals_full_through_a_concatenation_with_a_constant_map(monkeypatch):
    monkeypatch.setattr(dn_module, "WINDOW_WORK_LIMIT", float("inf"))
    torch.manual_seed(14)
    model = _CatConstant().double().eval()
    x = torch.randn(1, 3, 9, 10, dtype=torch.float64)
    dn = DeconvNet(model)
    acts = dn.forward(x)
    assert dn.window_plan("c2") is not None
    units = torch.tensor([[0, c, y, x] for c, (y, x) in enumerate([(0, 0), (4, 5), (8, 9)])])
    assert float(acts["c2"][units[:, 0], units[:, 1], units[:, 2], units[:, 3]].abs().min()) > 0
    for rule in RULES:
        assert_windowed_equals_full(dn, "c2", units, (9, 10), atol=1e-12, rel=1e-9, rule=rule)


class _SharedSignal(nn.Module):
    """Adds hand both operands the same signal, which the branches must not write in place while
    the other still has to read it: one node concatenated with itself (the concatenation hands it
    two views; the second must go into a copy, not into the first view) beside a branch computed
    before it; a BatchNorm that is not folded after a dropout; an identity elementwise op
    (``.double()`` of a float64 map, whose derivative is the signal itself) above a ReLU."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3)
        self.c4, self.c5, self.bn, self.drop = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Dropout()

    def forward(self, x):
        o = self.c2(x)
        a = torch.relu(self.c1(x))
        s = torch.cat([a, a], 1) + o
        s = s + self.bn(self.drop(torch.relu(self.c4(x))))
        s = s + torch.relu(self.c5(x)).double()
        return self.c3(s)


class _Short(nn.Module):
    """A stride-2 conv without padding on a 7 x 6 map: its transposed output (6 x 6) falls a row
    short of its input's window (the whole 7 x 6 map), above a ReLU that reads that window."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 2, 2)
        self.c2, self.c3 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        return self.c3(self.c2(torch.relu(self.c1(torch.relu(self.c0(x))))))



class _Meet(nn.Module):
    """A stride-2 conv without padding on a 7-row map: its transposed output falls a row short of
    its input's window (the whole map along y). Its output is read first by a product, then by a
    conv that writes off the map, which its 3-wide kernel carries back onto the map below: that
    map must still take the map mask."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, (2, 3), 2)
        self.c2, self.c3 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x):
        a = torch.relu(self.c1(torch.relu(self.c0(x))))
        return self.c3(torch.cat([2 * a, self.c2(a)], 1))


@pytest.mark.parametrize("net,size", [(_SharedSignal, (11, 11)), (_Meet, (7, 24)), (_Short, (7, 6))])
def test_windowed_equals_full_where_branches_meet(net, size, monkeypatch):
    monkeypatch.setattr(dn_module, "WINDOW_WORK_LIMIT", float("inf"))
    torch.manual_seed(15)
    model = _randomise_bn(net(), 16).double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    dn = DeconvNet(model)
    acts = dn.forward(x)
    for rule, units in zip(RULES * 2, [border_units(acts["c3"])] + _one_side_batches(acts["c3"])):
        assert_windowed_equals_full(dn, "c3", units, size, atol=1e-12, rel=1e-9, rule=rule)
