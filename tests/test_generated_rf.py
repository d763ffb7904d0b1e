"""Every row of the receptive-field table (deconvis.graph.rf) of generated networks
(tests/netgen.py) against the empirical gradient support (docs/method.md section 3).

Oracle (the method of tests/test_rf.py, generalised to graphs): the traced network evaluated by
an fx interpreter written here, with every conv and Linear given all-positive weights and no
bias, every elementwise nonlinearity, BatchNorm, LayerNorm, LRN and dropout made the identity,
max-pools replaced by sum pools of the same geometry, and a gate's product ``x * s`` replaced by
the sum ``x + s``. That network is linear with positive coefficients, so the input pixels with a
non-zero gradient for one unit are exactly the pixels it can see. Each unit's support must lie
in its clipped box, and fill the box along every axis where the box lies inside the image
(tests/test_rf.py ``check_units``).
"""
from __future__ import annotations

import operator
import random
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import netgen
from deconvis.graph.rf import receptive_fields
from deconvis.graph.trace import trace_graph
from test_rf import _DilatedSumPool, check_units, pick_units

DT = torch.float64
DRAWS, SLOW_DRAWS = 60, 600

_IDENTITY_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
                     nn.Sigmoid, nn.BatchNorm2d, nn.LayerNorm, nn.LocalResponseNorm, nn.Dropout, nn.Dropout2d,
                     nn.Identity)
_IDENTITY_FUNCS = {F.relu, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.prelu, F.silu, F.gelu, F.hardswish,
                   F.hardsigmoid, torch.sigmoid, F.sigmoid, F.layer_norm, F.local_response_norm, F.dropout}
_IDENTITY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_"}


class PositiveLinear(torch.fx.Interpreter):
    """Runs a traced net as its positive linear stand-in (see the module docstring) and keeps
    every node's value in ``values``."""

    def __init__(self, gm: torch.fx.GraphModule, seed: int):
        super().__init__(gm)
        self.gen = torch.Generator().manual_seed(seed)
        self.values: Dict[torch.fx.Node, Any] = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n] = out
        return out

    def positive(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 + torch.rand(w.shape, generator=self.gen, dtype=DT)

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        x = args[0]
        if isinstance(m, nn.Conv2d):
            return F.conv2d(x, self.positive(m.weight), None, m.stride, m.padding, m.dilation, m.groups)
        if isinstance(m, nn.Linear):
            return F.linear(x, self.positive(m.weight))
        if isinstance(m, nn.MaxPool2d):
            return _DilatedSumPool(m)(x)
        if isinstance(m, nn.AdaptiveMaxPool2d):
            return F.adaptive_avg_pool2d(x, m.output_size)
        if isinstance(m, _IDENTITY_MODULES):
            return x
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        if target in _IDENTITY_FUNCS:
            return args[0] if args else kwargs["input"]
        if target is F.max_pool2d:
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
            p = dict(zip(names, args[1:]), **{k: v for k, v in kwargs.items() if k in names})
            return _DilatedSumPool(nn.MaxPool2d(**p))(args[0])
        if target in (operator.mul, torch.mul) and all(isinstance(a, torch.Tensor) for a in args[:2]):
            return args[0] + args[1]  # a gate: the same dependencies, positive and linear
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if target in _IDENTITY_METHODS:
            return args[0]
        return super().call_method(target, args, kwargs)


def _channels_last(gm: torch.fx.GraphModule) -> set:
    """The nodes holding a channels-last map [N, H, W, C] (between permute(0, 2, 3, 1) and back)."""
    cl = set()
    for n in gm.graph.nodes:
        dims = list(n.args[1:]) if n.op == "call_method" and n.target == "permute" else None
        if dims and isinstance(dims[0], (tuple, list)):
            dims = list(dims[0])
        if dims == [0, 2, 3, 1]:
            cl.add(n)
        elif dims == [0, 3, 1, 2]:
            continue
        elif any(isinstance(a, torch.fx.Node) and a in cl for a in n.all_input_nodes):
            cl.add(n)
    return cl


def check_whole(table, name: str, supports) -> None:
    """A whole row (after a gate, global pooling, flatten, Linear): every unit sees the same
    region, the union of its input units' boxes clipped to the image. That union may include
    edge pixels reached only through padding, so the support lies inside it; all units that see
    anything (a pad after a whole row adds units that see nothing) see the same pixels."""
    (cy0, cy1, cx0, cx1), _pad = table.clipped_box(name, 0, 0)
    seeing = [(sb, mask) for sb, mask in supports if sb is not None]
    assert seeing or not supports, f"{name}: no unit of a whole row sees anything"
    first = seeing[0][1] if seeing else None
    for sb, mask in seeing:
        y0, y1, x0, x1 = sb
        assert cy0 <= y0 and y1 <= cy1 and cx0 <= x0 and x1 <= cx1, f"{name}: support {sb} outside {table[name].box(0, 0)}"
        assert (mask == first).all(), f"{name}: units of a whole row see different pixels"


def check_rf(net: netgen.GenNet) -> None:
    rng = random.Random(net.seed)
    table = receptive_fields(net.model, net.size, in_channels=net.in_ch)
    tg = trace_graph(net.model)
    cl = _channels_last(tg.graph_module)
    requests: List[Tuple[str, torch.fx.Node, List[Tuple[int, int]]]] = []
    for row in table:
        if row.name == "input":
            continue
        requests.append((row.name, tg.node(row.name), pick_units(row.out, n=6, rng=rng)))
    n = sum(len(u) for _, _, u in requests)
    interp = PositiveLinear(tg.graph_module, net.seed)
    x = torch.randn(n, net.in_ch, *net.size, dtype=DT, requires_grad=True)
    interp.run(x)
    total, b = 0, 0
    for name, node, units in requests:
        v = interp.values[node]
        assert isinstance(v, torch.Tensor), f"row {name} is not a tensor\n{net}"
        for (y, xx) in units:
            if v.dim() == 2:
                total = total + v[b].sum()
            elif node in cl:
                total = total + v[b, y, xx, ...].sum()
            else:  # the last two dims are the map (a shuffle's 5-d view too)
                total = total + v[b, ..., y, xx].sum()
            b += 1
    (g,) = torch.autograd.grad(total, x)
    masks = (g.abs().sum(1) > 0).numpy()
    b = 0
    for name, node, units in requests:
        supports = []
        for _u in units:
            ys, xs = masks[b].nonzero()
            supports.append((None if ys.size == 0 else (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1), masks[b]))
            b += 1
        try:
            if table[name].whole:
                check_whole(table, name, supports)
            else:
                check_units(table, name, units, supports, net.size)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{net}") from None


def test_rf_rows_match_gradient_support_on_generated_nets():
    netgen.check_nets("rf", check_rf, DRAWS)


@pytest.mark.slow
def test_rf_rows_match_gradient_support_on_many_generated_nets():
    netgen.check_nets("rf-slow", check_rf, SLOW_DRAWS)


# ------------------------------------------------------------------ shrunk regression examples
class _GateThenChannelsLast(nn.Module):
    """Found by the generator: a channels-last block (ConvNeXt-style) after a squeeze-excitation
    gate. The permute of a whole map (every unit sees the whole image) to [N, H, W, C] was not
    marked channels-last, so the rows inside reported the last two dims (W, C) as the map size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(6, 2, 1), nn.Conv2d(2, 6, 1)
        self.norm = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        x = self.conv(x)
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        y = self.lin(self.norm(x.permute(0, 2, 3, 1)))
        return y.permute(0, 3, 1, 2)


def test_regression_channels_last_after_a_gate():
    table = receptive_fields(_GateThenChannelsLast(), (9, 13))
    for name in ("permute", "norm", "lin", "permute_1"):
        row = table[name]
        assert row.whole and row.out == (9, 13), (name, row.out)
        assert row.local.out == (9, 13) and row.local.rf == (3, 3), (name, row.local)  # the gate-detached field
