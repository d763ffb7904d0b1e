"""Shared check of the windowed mirror against the full path on units at the map's corners, edges
and centre (tests/test_window_masks.py, tests/test_window_layout.py)."""
from __future__ import annotations

import pytest
import torch


def border_units(act: torch.Tensor) -> torch.Tensor:
    """Units [M, 4] = (image, channel, y, x) of an activation ``act`` [N>=2, C, h, w]: its
    corners, edges and centre, twice (images 0 and 1 alternating), cycling over the channels."""
    h, w = act.shape[-2:]
    pos = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, 0), (0, w // 2), (h // 2, w // 2)]
    return torch.tensor([[i % 2, i % act.shape[1], y, x] for i, (y, x) in enumerate(pos * 2)])


def assert_windowed_equals_full(dn, layer: str, units: torch.Tensor, size, *, atol: float = 0.0,
                                atol_of_max: float = 0.0, rel: float, rule: str = "deconvnet") -> None:
    """``dn.project_window`` on a plan (not the full path) equals ``dn.project`` inside each unit's
    RF box on the image of ``size`` (H, W), to ``atol + atol_of_max * max|full|``, and both are
    zero elsewhere (the box holds the full reconstruction's mass, to ``rel``); both under ``rule``."""
    H, W = size
    full = dn.project(layer, units, rule=rule)
    rec, boxes = dn.project_window(layer, units, rule=rule)
    assert dn.window_plan(layer) is not None
    tol = atol + atol_of_max * float(full.abs().max())
    for m, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
        inside = full[m, :, cy0:cy1, cx0:cx1]
        got = rec[m, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        assert torch.allclose(got, inside, rtol=0, atol=tol), (layer, rule, m)
        assert float(inside.abs().sum()) == pytest.approx(float(full[m].abs().sum()), rel=rel)
        assert float(rec[m].abs().sum()) == pytest.approx(float(inside.abs().sum()), rel=rel)  # zero off the image
