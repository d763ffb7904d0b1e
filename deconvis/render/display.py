"""Turn reconstructions into pictures: the contrast stretch of ZF's figures.

Reconstructions are signed and centred on zero. ``to_uint8`` maps each one to [0, 255] with zero
at mid-grey (128): ``v -> 128 + 127 * v / max|v|``, per image (``shared=False``) or with one scale
for the whole batch (``shared=True``), so grids can compare magnitudes. A zero image stays grey.
``resize_tile`` is the one way tiles change size (sheets, evolution figures).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor


def to_uint8(rec: Tensor, shared: bool = False, percentile: Optional[float] = None) -> np.ndarray:
    """Reconstructions [M, C, H, W] (C = 1 or 3) -> uint8 images [M, H, W, C] (RGB for C = 3).

    Zero maps to 128. The scale is ``max|v|`` per image, or over the whole batch when ``shared``;
    ``percentile`` (e.g. 99.5) uses that percentile of ``|v|`` instead of the maximum, clipping
    the few brightest pixels.
    """
    return to_uint8_tensor(rec.detach().cpu(), shared, percentile).numpy()


def to_uint8_tensor(rec: Tensor, shared: bool = False, percentile: Optional[float] = None) -> Tensor:
    """:func:`to_uint8` on ``rec``'s own device: uint8 ``[M, H, W, C]`` there, so a GPU copies 1
    byte per pixel to the host instead of 4 or 8. Computed in ``rec``'s precision (float32 for
    half inputs; a ``percentile`` scale in float64, float32 on MPS) as ``v * (127 / scale) + 128``,
    rounded: in float32 that is the exact stretch but at rounding ties, where it can be one level
    off (a few values in 100,000; float64 arithmetic over float32 reconstructions cost the
    projection of AlexNet's 10,368 winners 4 s more)."""
    if rec.dim() == 3:
        rec = rec[None]
    if rec.dim() != 4:
        raise ValueError(f"reconstructions must be [M, C, H, W], got shape {list(rec.shape)}")
    rec = rec.detach()
    work = rec.dtype if rec.dtype in (torch.float32, torch.float64) else torch.float32
    wide = torch.float32 if rec.device.type == "mps" else torch.float64  # (MPS has no float64)
    if percentile is None:  # max |v| is exact in the input's precision
        dims = tuple(range(1, rec.dim()))  # (no flatten: it would copy a channels-last batch)
        # amax and amin: together 10-17x faster than aminmax(dim=1) on the CPU
        scale = torch.maximum(rec.amax(dims), rec.amin(dims).neg_()).to(work)
    else:
        scale = torch.quantile(rec.to(wide).abs().flatten(1), percentile / 100.0, dim=1).to(work)
    if shared:
        scale = scale.amax().expand_as(scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # 128 + v * (127 / scale), rounded, on one new tensor; with the maximum as scale |v| * 127 / scale
    # is at most 127 (plus round-off far below half a level), so the result is in [1, 255]: no clamp
    factor = 127.0 / scale
    if work == torch.float32 and not bool(torch.isfinite(factor).all()):  # max |v| under ~4e-37: overflows
        v = rec.to(wide).div_(scale.to(wide).view(-1, 1, 1, 1)).mul_(127.0)
    else:
        v = torch.mul(rec.to(work), factor.view(-1, 1, 1, 1))
    v.add_(128.0).round_()
    if percentile is not None:
        v.clamp_(0, 255)
    out = torch.empty((v.shape[0], v.shape[2], v.shape[3], v.shape[1]), dtype=torch.uint8, device=v.device)
    out.copy_(v.permute(0, 2, 3, 1))
    return out


def resize_tile(img: np.ndarray, th: int, tw: int) -> np.ndarray:
    """uint8 tile ``[h, w, C]`` -> ``[th, tw, C]``: nearest when enlarging (pixels stay visible),
    area averaging when shrinking; the tile itself (contiguous) when it already has that size."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    h, w = img.shape[:2]
    img = np.ascontiguousarray(img)
    if (h, w) == (th, tw):
        return img
    interp = cv2.INTER_NEAREST if th >= h and tw >= w else cv2.INTER_AREA
    return cv2.resize(img, (tw, th), interpolation=interp)
