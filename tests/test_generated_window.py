"""The windowed projection (DeconvNet.project_window) on generated networks (tests/netgen.py),
float64, all three rules, against the full path (DeconvNet.project, itself checked against the
autograd oracle in test_generated_mirror.py). The cut-over to the full path when the cones cover
(nearly) whole maps is switched off, so the windowed backward runs on every layer it can, and
the test asserts which path ran: backward_window for a layer with a window plan, the full path
(with the image as its box) for one without."""
from __future__ import annotations

import random

import pytest
import torch

import netgen
from deconvis.mirror import deconvnet as dn_module
from deconvis.mirror.deconvnet import DeconvNet
from test_generated_mirror import RULES, pick_units, rel_err

DRAWS, SLOW_DRAWS = 60, 600
#: ops the windowed path leaves to the full path by design (deconvis/mirror/window.py): gates and
#: heads see the whole image; pads, reshapes (shuffles), permutes (channels-last) and chunks
NOT_WINDOWED = {"se_torchvision", "se_hand", "global_avgpool", "global_maxpool", "global_mean", "flatten",
                "flatten_map", "linear_head", "fc_hidden", "pad_module", "pad_functional", "shuffle", "chunk",
                "channels_last", "layernorm", "linear_per_position"}


def paste(rec: torch.Tensor, boxes: torch.Tensor, size) -> torch.Tensor:
    """Box reconstructions [M, C, rh, rw] laid on zero images [M, C, H, W] (clipped)."""
    H, W = size
    out = rec.new_zeros(rec.shape[:2] + (H, W))
    for m, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        assert (y1 - y0, x1 - x0) == tuple(rec.shape[-2:]), (boxes[m], rec.shape)
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
        if cy1 > cy0 and cx1 > cx0:
            out[m, :, cy0:cy1, cx0:cx1] = rec[m, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out


class Paths:
    """Counts the windowed backward calls (``backward_window`` as DeconvNet calls it)."""

    def __init__(self, monkeypatch):
        self.windowed = 0
        real = dn_module.backward_window

        def counting(*args, **kwargs):
            self.windowed += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(dn_module, "backward_window", counting)
        monkeypatch.setattr(dn_module, "WINDOW_WORK_LIMIT", float("inf"))  # never cut over


def make_check(paths: Paths, ran: dict):
    def check(net: netgen.GenNet) -> None:
        rng = random.Random(net.seed)
        x = net.images(2, seed=net.seed)
        dn = DeconvNet(net.model)
        acts = dn.forward(x)
        table = dn.receptive_fields(net.size)
        for layer in net.probes:
            act = acts[dn.resolve(layer)]
            units = pick_units(act, 2, rng)
            plan = dn.window_plan(layer) if act.dim() == 4 else None
            for rule in RULES:
                before = paths.windowed
                rec, boxes = dn.project_window(layer, units, rule=rule)
                full = dn.project(layer, units, rule=rule)
                if plan is not None:
                    assert paths.windowed == before + 1, f"{layer}: the windowed backward did not run\n{net}"
                    row = table[dn.resolve(layer)]
                    for u, b in zip(units.tolist(), boxes.tolist()):
                        assert tuple(b) == row.box(u[2], u[3]), f"{layer} unit {u}: box {b} != RF box\n{net}"
                    ran["windowed"] += 1
                    ran.setdefault("windowed_tags", set()).update(net.tags)
                else:
                    assert paths.windowed == before, f"{layer}: windowed backward ran without a plan\n{net}"
                    assert boxes.tolist() == [[0, net.size[0], 0, net.size[1]]] * len(units)
                    ran["full"] += 1
                err = rel_err(paste(rec, boxes, net.size), full)
                assert err <= 1e-10, f"{layer} {rule}: windowed vs full relative error {err:.3g}\n{net}"
    return check


def _run(monkeypatch, name: str, n: int) -> None:
    paths = Paths(monkeypatch)
    ran = {"windowed": 0, "full": 0}
    netgen.check_nets(name, make_check(paths, ran), n)
    assert ran["windowed"] > 0 and ran["full"] > 0, ran
    # every op that can sit inside a receptive-field cone took the windowed path somewhere
    local_ops = netgen.OPS - NOT_WINDOWED
    missing = netgen.covered({t: 1 for t in ran["windowed_tags"]}, local_ops)
    assert not missing, f"the windowed path never ran on a net with {missing}"


def test_windowed_equals_full_on_generated_nets(monkeypatch):
    _run(monkeypatch, "window", DRAWS)


@pytest.mark.slow
def test_windowed_equals_full_on_many_generated_nets(monkeypatch):
    _run(monkeypatch, "window-slow", SLOW_DRAWS)


# ------------------------------------------------------------------ shrunk regression examples
class _ChunkThenConv(torch.nn.Module):
    """Found by the generator (a ShuffleNet unit): an item of a torch.chunk read by a conv. The
    window planner read the chunk's tuple as a tensor (AttributeError: 'tuple' object has no
    attribute 'shape'); the layer now takes the full path."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3)
        self.c2 = torch.nn.Conv2d(2, 2, 1)

    def forward(self, x):
        a, b = torch.chunk(self.c1(x), 2, 1)
        return torch.cat((a, self.c2(b)), 1)


def test_regression_chunk_item_read_by_a_conv(monkeypatch):
    paths = Paths(monkeypatch)
    torch.manual_seed(0)
    model = _ChunkThenConv().double().eval()
    dn = DeconvNet(model)
    dn.forward(torch.randn(1, 1, 9, 8, dtype=torch.float64))
    units = torch.tensor([[0, 1, 2, 3]])
    assert dn.window_plan("c2") is None
    rec, boxes = dn.project_window("c2", units)
    assert paths.windowed == 0 and boxes.tolist() == [[0, 9, 0, 8]]
    assert torch.equal(rec, dn.project("c2", units))
    assert dn.window_plan("c1") is not None  # before the chunk the windowed path still applies
