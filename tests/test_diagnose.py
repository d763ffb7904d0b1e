"""deconvis.analysis.diagnose: dead channels, checked against a direct forward pass (float64 oracle)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deconvis.analysis.diagnose import channel_max, dead_channels
from deconvis.errors import DeconvisError


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
    ).double()


def test_forced_dead_channels_are_found_and_only_them():
    m = _tiny()
    with torch.no_grad():
        m[0].bias[4] = -1e6       # conv1 channel 4 can never fire
        m[3].bias[[1, 3]] = -1e6  # conv2 channels 1 and 3 neither
    x = torch.randn(7, 3, 12, 12, dtype=torch.float64)
    dead = dead_channels(m, x, ["conv1", "conv2"], batch_size=3)
    assert dead == {"conv1": [4], "conv2": [1, 3]}
    # oracle: rectified maps straight from the model
    with torch.no_grad():
        r1 = m[1](m[0](x))
        r2 = m[:5](x)
    mx = channel_max(m, x, ["conv1", "conv2"], batch_size=3)
    torch.testing.assert_close(mx["conv1"], r1.amax(dim=(0, 2, 3)))
    torch.testing.assert_close(mx["conv2"], r2.amax(dim=(0, 2, 3)))
    assert (mx["conv2"][[0, 2, 4]] > 0).all()


def test_batches_iterable_threshold_and_mode_restored():
    m = _tiny(1).train()
    x = torch.randn(5, 3, 10, 10, dtype=torch.float64)
    whole = channel_max(m, x, ["conv2"])
    parts = channel_max(m, [x[:2], x[2:]], ["conv2"])
    torch.testing.assert_close(whole, parts)
    assert m.training
    # a threshold above a channel's maximum marks it dead
    c = int(whole["conv2"].argmin())
    thr = float(whole["conv2"][c]) + 1e-9
    assert c in dead_channels(m, x, ["conv2"], threshold=thr)["conv2"]


def test_bad_input_is_a_deconvis_error():
    m = _tiny()
    with pytest.raises(DeconvisError):
        dead_channels(m, torch.randn(3, 8, 8, dtype=torch.float64), ["conv1"])
    with pytest.raises(DeconvisError):
        dead_channels(m, torch.randn(1, 3, 8, 8, dtype=torch.float64), [])
    with pytest.raises(DeconvisError, match="conv"):
        dead_channels(m, torch.randn(1, 3, 8, 8, dtype=torch.float64), ["conv9"])
