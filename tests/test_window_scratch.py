"""The windowed mirror's reused unpool buffers (deconvis/mirror/window.py, REUSE_BUFFERS): with
and without them the windowed path gives the full path's numbers (float64 and float32), a result
never shares a buffer that a later call overwrites (a max-pool on the input sends its unpool's
output straight to the image), and chunks of any size agree with one chunk."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deconvis.mirror import deconvnet as dn_module
from deconvis.mirror import window
from deconvis.mirror.deconvnet import DeconvNet
from window_check import assert_windowed_equals_full, border_units


def _net(dtype: torch.dtype) -> nn.Module:
    # the first op a max-pool: its unpool writes the input window itself; a second pool deeper
    return nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()).to(dtype).eval()


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_reused_buffers_match_full_path(reuse, dtype, tol, monkeypatch):
    monkeypatch.setattr(window, "REUSE_BUFFERS", reuse)
    monkeypatch.setattr(dn_module, "WINDOW_WORK_LIMIT", float("inf"))  # never cut over to the full path
    torch.manual_seed(11)
    model = _net(dtype)
    H = W = 37
    x = torch.randn(2, 3, H, W, dtype=dtype)
    dn = DeconvNet(model)
    acts = dn.forward(x)
    for layer in ("2", "5", "0"):
        assert_windowed_equals_full(dn, layer, border_units(acts[layer]), (H, W), atol_of_max=tol, rel=tol)
    assert bool(dn.mirror.scratch()) is reuse


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_result_survives_later_calls(dtype):
    """The pool on the input sends its unpool's (reused) output to the image: each call's result
    is its own, unchanged by the next calls (other units, a smaller chunk) and equal to a fresh
    DeconvNet's; chunks of 3 give one chunk's numbers."""
    torch.manual_seed(12)
    model = _net(dtype)
    x = torch.randn(3, 3, 29, 29, dtype=dtype)
    dn = DeconvNet(model)
    acts = dn.forward(x)
    layer = "0"
    assert dn.window_plan(layer) is not None
    units = border_units(acts[layer])
    first, _ = dn.project_window(layer, units)
    kept = first.clone()
    dn.project_window(layer, units.flip(0)[:5])
    dn.project_window(layer, units[3:])
    assert torch.equal(first, kept)
    fresh = DeconvNet(model)
    fresh.forward(x)
    assert torch.equal(fresh.project_window(layer, units)[0], kept)
    assert torch.equal(dn.project_window(layer, units, batch_size=3)[0], kept)
    dn.release()
    assert not dn.mirror.scratch()


def test_a_model_turned_to_bfloat16_gets_bfloat16_buffers():
    """The pool keys buffers by node: after the model goes from float32 to bfloat16 (in place, so
    the same DeconvNet runs it; both dtypes take the channels-last unpool), a float32 buffer must
    not be reused for the bfloat16 windows; the projections equal a fresh DeconvNet's."""
    torch.manual_seed(13)
    model = _net(torch.float32)
    x = torch.randn(2, 3, 29, 29)
    dn = DeconvNet(model)
    units = border_units(dn.forward(x)["0"])
    dn.project_window("0", units)
    assert any(b.dtype == torch.float32 for b in dn.mirror.scratch().values())
    model.bfloat16()
    dn.forward(x.bfloat16())
    got, _ = dn.project_window("0", units)
    fresh = DeconvNet(model)
    fresh.forward(x.bfloat16())
    want, _ = fresh.project_window("0", units)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)
