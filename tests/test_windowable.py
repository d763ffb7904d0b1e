"""Which ops the windowed deconvnet takes (``deconvis.mirror.window.windowable``, ``plan_window``):
an average pool that divides by the window's real pixels (padding with ``count_include_pad=False``)
or whose output is not the floor-mode size (``ceil_mode`` adding a window) is not local and takes
the full path; so do binary ops with a map-varying operand, ops outside the elementwise set,
reshapes, concatenations along another dim than the channels, and branches that read one map at
different jumps. The others take the windowed path and equal the full projection."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deconvis.errors import DeconvisError
from deconvis import DeconvNet
from window_check import assert_windowed_equals_full


def _floor(n, k, s, p):
    return (n + 2 * p - k) // s + 1


# (kernel, stride, padding, count_include_pad, ceil_mode, input (h, w), windowed)
CASES = [
    ((3, 3), (2, 2), (1, 1), True, False, (9, 9), True),
    ((3, 3), (2, 2), (1, 1), True, False, (8, 8), True),    # floor mode dropping a pixel
    ((3, 3), (2, 2), (1, 1), False, False, (9, 9), False),  # divides by the real pixels at the border
    ((3, 3), (2, 2), (0, 0), False, False, (9, 9), True),   # no padding: count_include_pad is moot
    ((3, 3), (2, 2), (0, 0), True, True, (8, 8), False),    # ceil mode adds a window
    ((3, 3), (2, 2), (0, 0), True, True, (9, 9), True),     # ceil mode, same size as floor
    ((2, 3), (1, 2), (0, 1), True, True, (7, 8), False),    # x only gains a window
    ((3, 2), (2, 1), (1, 0), True, True, (8, 7), False),    # y only gains a window
    ((3, 2), (2, 1), (1, 0), True, True, (9, 7), True),     # neither, non-square
]


@pytest.mark.parametrize("k,s,p,cip,ceil,size,want", CASES)
def test_average_pools_take_the_windowed_path_only_when_local(k, s, p, cip, ceil, size, want):
    torch.manual_seed(0)
    pool = nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=cip)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(3, 2, 1)).double()
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    out = pool(net[:2](x)).shape[-2:]
    local = (p == (0, 0) or cip) and tuple(out) == tuple(_floor(size[a], k[a], s[a], p[a]) for a in (0, 1))
    assert local == want  # the case says what it covers
    dn = DeconvNet(net)
    dn.forward(x)
    assert (dn.window_plan("3") is not None) == local
    units = torch.tensor([[0, 1, 0, 0], [0, 0, out[0] - 1, out[1] - 1]])
    rec, boxes = dn.project_window("3", units)
    full = dn.project("3", units)
    if not local:
        assert torch.equal(rec, full)
        return
    for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        cy0, cx0 = max(y0, 0), max(x0, 0)
        cy1, cx1 = min(y1, size[0]), min(x1, size[1])
        pasted = torch.zeros_like(full[i])
        pasted[:, cy0:cy1, cx0:cx1] = rec[i, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        assert torch.allclose(pasted, full[i], rtol=1e-12, atol=1e-14)


class Binary(nn.Module):
    """conv -> ``op`` of its map and ``other`` -> conv: a binary op is windowed only when its one
    other operand is a number, a per-channel constant (spatially 1 x 1) or, for add and sub, the
    same map again."""

    def __init__(self, op: str, other: str):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3)
        self.op, self.other = op, other
        self.per_channel = nn.Parameter(torch.randn(1, 3, 1, 1))
        self.chw = nn.Parameter(torch.randn(3, 1, 1))
        self.map = nn.Parameter(torch.randn(1, 3, 7, 8))
        self.row = nn.Parameter(torch.randn(1, 1, 1, 8))
        self.map2d = nn.Parameter(torch.randn(7, 8))
        self.row1d = nn.Parameter(torch.randn(8))  # 1-D: broadcast along the width
        self.square = nn.Parameter(torch.randn(1, 3, 8, 8))  # (on an 8 x 8 input)
        self.c1b = nn.Conv2d(2, 1, 3, padding=1)  # a one-channel signal, broadcast over the channels

    def forward(self, x):
        y = self.c1(x)
        z = {"number": 0.5, "per_channel": self.per_channel, "chw": self.chw, "map": self.map,
             "row": self.row, "row1d": self.row1d, "map2d": self.map2d, "square": self.square, "self": y,
             "one_channel": self.c1b(x)}[self.other]
        return self.c2({"add": torch.add, "sub": torch.sub, "mul": torch.mul}[self.op](y, z))


@pytest.mark.parametrize("op,other,want", [
    ("add", "per_channel", True), ("mul", "per_channel", True), ("sub", "chw", True),
    ("mul", "number", True), ("add", "self", True), ("sub", "self", True),
    ("mul", "self", False),  # a product of two signals: not linear in the window
    ("add", "map", False), ("mul", "row", False), ("mul", "row1d", False),  # constants that vary over the map
    ("mul", "map2d", False), ("add", "square", False),  # a 2-D one; one as high as wide
    ("add", "one_channel", False),  # a signal of another shape (broadcast over the channels)
])
def test_binary_ops_take_the_windowed_path_only_with_a_constant_or_matching_operand(op, other, want):
    torch.manual_seed(1)
    net = Binary(op, other).double()
    H, W = (8, 8) if other == "square" else (7, 8)
    x = torch.randn(1, 2, H, W, dtype=torch.float64)
    dn = DeconvNet(net)
    dn.forward(x)
    assert (dn.window_plan("c2") is not None) == want
    units = torch.tensor([[0, 1, 0, 0], [0, 0, 4, 5]])  # (image, channel, y, x)
    rec, boxes = dn.project_window("c2", units)
    full = dn.project("c2", units)
    for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
        pasted = torch.zeros_like(full[i])
        pasted[:, cy0:cy1, cx0:cx1] = rec[i, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        assert torch.allclose(pasted, full[i], rtol=1e-12, atol=1e-14)



class Graph(nn.Module):
    """conv -> ``kind`` -> conv; ``kind`` names the op between the convs."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
        self.lo = nn.Parameter(torch.randn(1, 4, 8, 8) * 0.1)
        self.c8 = nn.Conv2d(8, 3, 3, padding=1)
        self.s2, self.s1 = nn.Conv2d(2, 4, 2, 2), nn.Conv2d(2, 4, 5)  # 8 x 8 -> 4 x 4 at jumps 2 and 1

    def forward(self, x):
        k = self.kind
        if k == "jumps":  # the input read at jump 2 and at jump 1 by branches that meet again
            return self.c2(self.s2(x) + self.s1(x))
        y = self.c1(x)
        if k in ("cat_1", "cat_dim_1", "cat_dim_-3"):
            z = torch.relu(y)
            return self.c8(torch.cat([y, z], 1) if k == "cat_1" else torch.cat([y, z], dim=int(k[8:])))
        if k == "shuffle":  # reshapes to 5-D and back
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        else:
            # a function and a method outside the elementwise set that the receptive-field table
            # passes (they keep H and W in place)
            y = {"permute": lambda: torch.permute(y, (0, 1, 2, 3)),
                 "permute_method": lambda: y.permute(0, 1, 2, 3),
                 "tanh_method": lambda: y.tanh(),  # a method inside it
                 "clamp_map": lambda: torch.clamp(y, self.lo),  # its other operand varies over the map
                 "clamp_map_kw": lambda: torch.clamp(y, min=self.lo),  # the same, as a keyword
                 "clamp_map_method": lambda: y.clamp(self.lo),  # the same, as a method
                 "cat_batch": lambda: torch.cat([y, y]),  # concatenated along the images
                 "pad": lambda: F.pad(y, (1, 0, 0, 1)),  # changes the map's size
                 "view": lambda: y.view(-1, 4, 8, 8),  # a reshape, even one that keeps the shape
                 }[k]()
        return self.c2(y)


@pytest.mark.parametrize("kind,want", [
    ("tanh_method", True), ("cat_1", True), ("cat_dim_1", True), ("cat_dim_-3", True),
    ("permute", False), ("permute_method", False), ("clamp_map", False), ("clamp_map_kw", False),
    ("clamp_map_method", False), ("shuffle", False), ("cat_batch", False), ("pad", False), ("view", False),
    ("jumps", False),  # no single cone: the branches disagree on the jump
])
def test_graph_ops_take_the_windowed_path_only_when_local(kind, want, monkeypatch):
    from deconvis.mirror import deconvnet as dn_module

    monkeypatch.setattr(dn_module, "WINDOW_WORK_LIMIT", float("inf"))
    torch.manual_seed(2)
    net = Graph(kind).double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    dn = DeconvNet(net)
    acts = dn.forward(x)
    layer = "c8" if kind.startswith("cat_") and kind != "cat_batch" else "c2"
    assert (dn.window_plan(layer) is not None) == want
    if kind == "cat_batch":  # the full backward cannot split a unit's signal by images: a clear error
        with pytest.raises(DeconvisError, match="batch dimension"):
            dn.project(layer, torch.tensor([[0, 1, 0, 0]]), rule="gradient")
        return
    h, w = acts[layer].shape[-2:]
    units = torch.tensor([[0, 1, 0, 0], [1, 0, h - 1, w // 2], [0, 2, h // 2, w - 1]])
    if want:
        assert_windowed_equals_full(dn, layer, units, (8, 8), atol=1e-12, rel=1e-9, rule="gradient")
    else:
        rec, boxes = dn.project_window(layer, units, rule="gradient")
        assert torch.equal(rec, dn.project(layer, units, rule="gradient"))
        assert boxes.tolist() == [[0, 8, 0, 8]] * 3
