"""The windowed mirror zeroes the parts of a window that lie off the map below each transposed
conv (deconvis/mirror/window.py): block by block on the CPU (ZERO_BY_BLOCKS; blocks of one extent
together, GROUP_STRIPS, or one by one) or by one mask product (the other devices' way). Both give the full path's numbers, float64, on a net whose
padded convs and pools put every border unit's window partly off the map."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deconvis.mirror import deconvnet as dn_module
from deconvis.mirror import window
from deconvis.mirror.deconvnet import DeconvNet
from window_check import assert_windowed_equals_full, border_units


@pytest.mark.parametrize("blocks, grouped", [(True, True), (True, False), (False, True)])
def test_off_map_zeroing_matches_full_path(blocks, grouped, monkeypatch):
    """(GROUP_STRIPS: the blocks of one extent zeroed together over their units; border_units puts
    units of both images at the same positions, so groups hold several units.)"""
    monkeypatch.setattr(window, "ZERO_BY_BLOCKS", blocks)
    monkeypatch.setattr(window, "GROUP_STRIPS", grouped)
    monkeypatch.setattr(dn_module, "WINDOW_WORK_LIMIT", float("inf"))  # never cut over to the full path
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 6, 5, 2, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(6, 8, 3, padding=2,
                          dilation=2), nn.ReLU(), nn.Conv2d(8, 5, (3, 5), padding=(1, 2)), nn.ReLU()).double().eval()
    H = W = 41
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    dn = DeconvNet(model)
    acts = dn.forward(x)
    for layer in ("1", "4", "6"):
        # corners, edges and the centre of both images, every channel the layer has at least once
        assert_windowed_equals_full(dn, layer, border_units(acts[layer]), (H, W), atol=1e-12, rel=1e-12)
