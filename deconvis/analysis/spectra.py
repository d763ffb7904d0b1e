"""Frequency content of first-layer filters and aliasing of second-layer projections (ZF 2014
Sec. 4.1, Fig. 6).

Frequencies are in cycles per pixel: 0 is constant, 0.5 the Nyquist frequency (a pixel-wise
checkerboard along an axis); a radial frequency ``r = sqrt(fy^2 + fx^2)`` reaches 0.707 in the
corners of the spectrum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from deconvis.errors import DeconvisError

#: default band edges (cycles/pixel): low < 1/8 <= mid < 1/4 <= high
BAND_EDGES: Tuple[float, float] = (0.125, 0.25)


def power_spectrum(images: Tensor, size: int) -> np.ndarray:
    """|FFT|^2 of ``images`` [M, C, h, w] zero-padded to ``size`` x ``size`` (top-left), summed
    over the C channels -> float64 [M, size, size] (numpy ``fft2`` layout, DC at [0, 0])."""
    if images.dim() != 4:
        raise DeconvisError(f"expected [M, C, h, w], got shape {list(images.shape)}")
    if images.shape[-1] > size or images.shape[-2] > size:
        raise DeconvisError(f"FFT size {size} is smaller than the {images.shape[-2]}x{images.shape[-1]} input")
    f = torch.fft.fft2(images.detach().double().cpu(), s=(size, size))
    return (f.real ** 2 + f.imag ** 2).sum(1).numpy()


def radial_frequency(size: int) -> np.ndarray:
    """[size, size] radial frequency (cycles/pixel) of each bin of a ``size``-point 2-D FFT."""
    f = np.fft.fftfreq(size)
    return np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)


def radial_profile(power: np.ndarray, nbins: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Radially averaged power: bins of width 1/size from 0 to 0.5 (bin k holds r in
    [(k - 0.5)/size, (k + 0.5)/size); the corners beyond 0.5 are left out).
    ``power`` [M, size, size] -> (frequencies [B], mean power [M, B])."""
    size = power.shape[-1]
    nb = nbins or size // 2 + 1
    r = radial_frequency(size)
    idx = np.floor(r * size + 0.5).astype(int)
    keep = idx < nb
    counts = np.bincount(idx[keep], minlength=nb)
    prof = np.stack([np.bincount(idx[keep], weights=p[keep], minlength=nb) for p in power])
    return np.arange(nb) / size, prof / np.maximum(counts, 1)


def band_fractions(power: np.ndarray, edges: Sequence[float] = BAND_EDGES) -> np.ndarray:
    """Fraction of each spectrum's energy in the bands low [0, e1), mid [e1, e2), high [e2, inf)
    of radial frequency (the whole 2-D spectrum, corners included). [M, size, size] -> [M, 3]."""
    e1, e2 = float(edges[0]), float(edges[1])
    if not 0 < e1 < e2:
        raise DeconvisError(f"band edges {list(edges)} must satisfy 0 < low/mid < mid/high (cycles/pixel)")
    r = radial_frequency(power.shape[-1])
    masks = [r < e1, (r >= e1) & (r < e2), r >= e2]
    tot = power.reshape(len(power), -1).sum(1)
    parts = np.stack([power[:, m].sum(1) for m in masks], 1)
    return parts / np.maximum(tot, 1e-300)[:, None]


@dataclass
class Aliasing:
    """Energy of projections at the first layer's stride frequency (lattice ``(a/s, b/s)``)."""

    stride: int
    fraction: float        # share of the non-DC energy in the lattice bins (mean over projections)
    white_fraction: float  # the share a white spectrum would put there (bins counted)
    ratio: float           # fraction / white_fraction
    peak_ratio: float      # power per lattice bin / power per other bin at the same radial frequencies
                           # (mean over projections): > 1 = a peak at the stride frequency, i.e. aliasing

    def to_dict(self) -> Dict[str, float]:
        return dict(vars(self))


def lattice_mask(size: int, stride: int, halfwidth: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """(alias, dc) boolean [size, size] masks: bins within ``halfwidth`` bins (Chebyshev) of a
    frequency ``(a/stride, b/stride)`` other than (0, 0), and of (0, 0) itself."""
    k = np.fft.fftfreq(size) * size  # integer bin frequencies, signed
    alias = np.zeros((size, size), bool)
    dc = np.zeros((size, size), bool)
    step = size / stride
    for a in range(stride):
        for b in range(stride):
            cy, cx = a * step, b * step
            dy = np.abs(((k[:, None] - cy + size / 2) % size) - size / 2)
            dx = np.abs(((k[None, :] - cx + size / 2) % size) - size / 2)
            near = (dy <= halfwidth) & (dx <= halfwidth)
            (dc if a == 0 and b == 0 else alias)[near] = True
    return alias & ~dc, dc


def aliasing(projections: Tensor, stride: int, halfwidth: int = 1) -> Aliasing:
    """Aliasing indicator of pixel-space projections [M, C, H, W] (square, H divisible by
    ``stride``) at the lattice of the first layer's ``stride``; the DC neighbourhood is excluded
    from both the lattice energy and the total."""
    if stride < 2:
        raise DeconvisError(f"the first layer's stride is {stride}: no stride frequency below Nyquist to alias")
    h, w = projections.shape[-2:]
    if h != w or h % stride:
        raise DeconvisError(f"projections are {h}x{w}; the aliasing indicator needs a square size divisible "
                            f"by the stride {stride}")
    p = power_spectrum(projections, h)
    alias, dc = lattice_mask(h, stride, halfwidth)
    tot = p[:, ~dc].sum(1)
    frac = p[:, alias].sum(1) / np.maximum(tot, 1e-300)
    white = alias.sum() / (~dc).sum()
    r = radial_frequency(h)
    ring = (r >= r[alias].min()) & (r <= r[alias].max()) & ~alias & ~dc
    peak = (p[:, alias].mean(1) / np.maximum(p[:, ring].mean(1), 1e-300)) if ring.any() else np.full(len(p), np.nan)
    f = float(frac.mean())
    return Aliasing(stride, f, float(white), f / float(white), float(peak.mean()))
