"""The windowed mirror zeroes the parts of a window that lie off the map below each transposed
conv (deconvis/mirror/window.py): block by block on the CPU (ZERO_BY_BLOCKS) or by one mask
product (the other devices' way). Both give the full path's numbers, float64, on a net whose
padded convs and pools put every border unit's window partly off the map."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deconvis.mirror import deconvnet as dn_module
from deconvis.mirror import window
from deconvis.mirror.deconvnet import DeconvNet


@pytest.mark.parametrize("blocks", [True, False])
def test_off_map_zeroing_matches_full_path(blocks, monkeypatch):
    monkeypatch.setattr(window, "ZERO_BY_BLOCKS", blocks)
    monkeypatch.setattr(dn_module, "WINDOW_WORK_LIMIT", float("inf"))  # never cut over to the full path
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 6, 5, 2, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(6, 8, 3, padding=2,
                          dilation=2), nn.ReLU(), nn.Conv2d(8, 5, (3, 5), padding=(1, 2)), nn.ReLU()).double().eval()
    H = W = 41
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    dn = DeconvNet(model)
    acts = dn.forward(x)
    for layer in ("1", "4", "6"):
        h, w = acts[layer].shape[-2:]
        # corners, edges and the centre of both images, every channel the layer has at least once
        pos = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, 0), (0, w // 2), (h // 2, w // 2)]
        units = torch.tensor([[i % 2, i % acts[layer].shape[1], y, xx] for i, (y, xx) in enumerate(pos * 2)])
        full = dn.project(layer, units)
        rec, boxes = dn.project_window(layer, units)
        assert dn.window_plan(layer) is not None
        for m, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
            cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
            inside = full[m, :, cy0:cy1, cx0:cx1]
            assert torch.allclose(rec[m, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0], inside, rtol=0, atol=1e-12)
            assert float(inside.abs().sum()) == pytest.approx(float(full[m].abs().sum()), rel=1e-12)
            assert float(rec[m].abs().sum()) == pytest.approx(float(inside.abs().sum()), rel=1e-12)  # zero off the image
