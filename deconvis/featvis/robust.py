"""Transformation robustness (Olah et al. 2017): a random jitter, scale and rotation of the image
at each optimisation step, so the optimum cannot rely on exact pixel positions (high-frequency
patterns that only one alignment excites).

The three are composed into one affine map and resampled once (bilinear), keeping the image's
size, so a unit (y, x) of the layer means the same place at every step; where the transformed
image leaves the canvas the border is filled with grey (0.5), as Lucid pads. All images of a step
share one draw (as Lucid does), so an image's result does not depend on its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Jitter:
    """One draw: shift (dy, dx) in pixels, zoom factor, rotation in degrees (about the centre)."""

    dy: float = 0.0
    dx: float = 0.0
    scale: float = 1.0
    angle: float = 0.0


def draw(gen: torch.Generator, jitter: int, scale: float, rotate: float) -> Jitter:
    """A random :class:`Jitter`: integer shifts uniform in [-jitter, jitter] pixels, zoom uniform in
    [1 - scale, 1 + scale], angle uniform in [-rotate, rotate] degrees. Always four draws from
    ``gen``, whatever the ranges, so the sequence of draws does not depend on them."""
    u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
    j = int(jitter)
    return Jitter(dy=float(min(j, math.floor(u[0] * (2 * j + 1)) - j)),
                  dx=float(min(j, math.floor(u[1] * (2 * j + 1)) - j)),
                  scale=1.0 + float(scale) * (2 * u[2] - 1), angle=float(rotate) * (2 * u[3] - 1))


def theta(t: Jitter, size: Tuple[int, int]) -> Tensor:
    """The ``F.affine_grid`` matrix float64 [2, 3] (output -> input, normalised coordinates,
    ``align_corners=False``) of ``t`` for images of ``size`` (h, w): the output shows the input
    zoomed by ``t.scale`` and rotated by ``t.angle`` about the image centre, then shifted by
    (``t.dy``, ``t.dx``) pixels."""
    h, w = size
    a = math.radians(t.angle)
    c, s = math.cos(a), math.sin(a)
    # pixel offsets from the centre: input = R(-a) (out - shift) / scale, as (x, y) columns
    inv = torch.tensor([[c, s], [-s, c]], dtype=torch.float64) / t.scale
    d = torch.diag(torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64))
    d_inv = torch.diag(torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64))
    lin = d @ inv @ d_inv
    shift = -(d @ inv @ torch.tensor([t.dx, t.dy], dtype=torch.float64))
    return torch.cat([lin, shift[:, None]], dim=1)


def apply(images: Tensor, t: Jitter, fill: float = 0.5) -> Tensor:
    """``images`` [N, C, H, W] transformed by ``t`` (bilinear), the uncovered border ``fill``."""
    if t == Jitter():
        return images
    n, _, h, w = images.shape
    th = theta(t, (h, w)).to(images.dtype).to(images.device).expand(n, 2, 3)
    grid = F.affine_grid(th, list(images.shape), align_corners=False)
    return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
