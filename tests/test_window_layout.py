"""The windowed mirror's float32 CPU path (deconvis/mirror/window.py, CHANNELS_LAST): windows
carried channels-last through transposed convs and unpools (the sub-pixel conv of
deconvis/mirror/tconv.py included) give the full path's numbers to float32 round-off, on a net
whose strided, padded convs and overlapping pools put border units' windows partly off the map."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deconvis.mirror import deconvnet as dn_module
from deconvis.mirror import window
from deconvis.mirror.deconvnet import DeconvNet
from window_check import assert_windowed_equals_full, border_units


@pytest.mark.parametrize("channels_last", [True, False])
def test_float32_windows_match_full_path(channels_last, monkeypatch):
    monkeypatch.setattr(window, "CHANNELS_LAST", channels_last)
    monkeypatch.setattr(dn_module, "WINDOW_WORK_LIMIT", float("inf"))  # never cut over to the full path
    torch.manual_seed(7)
    # conv1 takes the sub-pixel form (3 channels * 4*4 phases); two overlapping max-pools unpool
    model = nn.Sequential(nn.Conv2d(3, 8, 7, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(8, 12, 5, padding=2),
                          nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU()).eval()
    H = W = 67
    x = torch.randn(2, 3, H, W)
    dn = DeconvNet(model)
    acts = dn.forward(x)
    used = []
    real = window._channels_last
    monkeypatch.setattr(window, "_channels_last", lambda g: used.append(real(g)) or real(g))
    for layer in ("4", "7"):
        assert_windowed_equals_full(dn, layer, border_units(acts[layer]), (H, W), atol_of_max=1e-5, rel=1e-5)
    assert any(used) is channels_last


@pytest.mark.parametrize("n_images, n_units", [(1, 40), (6, 1)])  # origin-free part on the map / on the windows
def test_unpool_index_matches_a_loop(n_images, n_units):
    """unpool_index against divmod per position, windows partly off the map included."""
    gen = torch.Generator().manual_seed(n_images)
    H, W, hm, wm, C = 13, 11, 6, 5, 3  # pool input map H x W, pooled map hm x wm
    switches = torch.randint(0, H * W, (n_images, C, hm, wm), generator=gen)
    w = (window.AxisWindow(1, -1, 3, 1, 1, 3), window.AxisWindow(1, -2, 4, 1, 2, 4))  # pooled windows
    wi = (window.AxisWindow(2, -3, 7, 2, 3, 7), window.AxisWindow(2, -5, 9, 2, 5, 9))  # input windows
    assert (n_images * hm * wm <= n_units * 3 * 4) is (n_units > 1)
    n_idx = torch.randint(0, n_images, (n_units,), generator=gen)
    u = torch.stack([torch.randint(0, hm, (n_units,), generator=gen), torch.randint(0, wm, (n_units,), generator=gen)], 1)
    got = window.unpool_index(switches, W, n_idx, w, wi, u)
    assert got.shape == (n_units, 3, 4, C) and got.is_contiguous()
    for m in range(n_units):
        uy, ux = u[m].tolist()
        oy, ox = 2 * uy - 3, 2 * ux - 5
        for i in range(3):
            for j in range(4):
                r, c = min(max(uy - 1 + i, 0), hm - 1), min(max(ux - 2 + j, 0), wm - 1)
                for ch in range(C):
                    q, col = divmod(int(switches[n_idx[m], ch, r, c]), W)
                    want = min(max((q - oy) * 9 + (col - ox), 0), 7 * 9 - 1)
                    assert int(got[m, i, j, ch]) == want, (m, i, j, ch)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_float32_windows_come_back_contiguous(batch_size, monkeypatch):
    """A stride-1 first conv runs conv_transpose2d channels-last: one chunk or several, the
    reconstructions come back in the contiguous [M, C, h, w] layout, equal to the float64 ones."""
    monkeypatch.setattr(dn_module, "WINDOW_WORK_LIMIT", float("inf"))
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                          nn.ReLU()).eval()
    x = torch.randn(2, 3, 24, 24)
    units = torch.tensor([[0, 1, 0, 0], [1, 2, 5, 5], [0, 3, 11, 11], [1, 4, 6, 0], [0, 5, 3, 9]])
    dn = DeconvNet(model)
    dn.forward(x)
    rec, _ = dn.project_window("4", units, batch_size=batch_size)
    assert rec.is_contiguous()
    dn64 = DeconvNet(model.double())
    dn64.forward(x.double())
    ref, _ = dn64.project_window("4", units)
    assert torch.allclose(rec.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("stem", ["3x3 stride 1", "11x11 stride 4"])
def test_preserve_format_keeps_the_mirrors_channels_last_windows(stem):
    """``memory_format=torch.preserve_format`` hands back the float32 windows in the layout the
    mirror made them (channels-last on the CPU: the stride-1 stem's conv_transpose2d and the
    stride-4 stem's sub-pixel form alike), dense, with the same values as the default contiguous
    result, one chunk or several."""
    torch.manual_seed(9)
    first = nn.Conv2d(3, 8, 3, padding=1) if stem.startswith("3x3") else nn.Conv2d(3, 8, 11, 4, 2)
    model = nn.Sequential(first, nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(2, 3, 67, 67)
    dn = DeconvNet(model)
    dn.forward(x)
    units = dn.strongest("4", 2)
    for batch_size in (None, 3):
        ref, ref_boxes = dn.project_window("4", units, batch_size=batch_size)
        got, boxes = dn.project_window("4", units, batch_size=batch_size, memory_format=torch.preserve_format)
        assert ref.is_contiguous() and torch.equal(boxes, ref_boxes)
        assert got.is_contiguous(memory_format=torch.channels_last) and got.stride(1) == 1
        assert torch.equal(got, ref)
