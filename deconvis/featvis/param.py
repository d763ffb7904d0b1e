"""The image parametrisation of feature visualisation (Olah et al. 2017, "Feature Visualization").

An image is not optimised pixel by pixel: it is the inverse FFT of a spectrum whose coefficients
are scaled by ``1 / f**decay_power`` (so a step of the optimiser moves low frequencies as much as
high ones: the gradient is whitened for natural-image statistics), in a *decorrelated* colour
space: the three channels of that image are mapped to RGB by the Cholesky factor ``L`` of the
ImageNet colour covariance (``rgb = L z`` at each pixel), and a sigmoid takes them into (0, 1).

Shapes: a spectrum is real [N, 3, H, W // 2 + 1, 2] (real and imaginary parts, ``torch.fft.rfft2``
layout with ``norm="ortho"``); images are [N, 3, H, W] in (0, 1), pixels.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

#: square root of the ImageNet RGB colour correlation as published with Lucid (the matrix
#: ``color_correlation_svd_sqrt`` of lucid/optvis/param/color.py): ``S S^T`` is the covariance
COLOR_SQRT = np.array([[0.26, 0.09, 0.02],
                       [0.27, 0.00, -0.05],
                       [0.27, -0.09, 0.03]], dtype=np.float64)
#: the ImageNet colour covariance that matrix stands for, scaled as Lucid scales it (largest column
#: norm of the square root 1)
COLOR_COVARIANCE = (COLOR_SQRT @ COLOR_SQRT.T) / np.max(np.linalg.norm(COLOR_SQRT, axis=0)) ** 2
#: its lower-triangular Cholesky factor: ``rgb = COLOR_CHOLESKY @ z`` turns unit-variance
#: uncorrelated colours ``z`` into colours with covariance ``COLOR_COVARIANCE``
COLOR_CHOLESKY = np.linalg.cholesky(COLOR_COVARIANCE)
#: Lucid's constant dividing the inverse FFT (keeps the initial image near grey)
FFT_DIVISOR = 4.0


def rfft_freqs(h: int, w: int) -> np.ndarray:
    """Spatial frequency magnitude (cycles per pixel) of each coefficient of an ``rfft2`` of an
    [h, w] image: float64 [h, w // 2 + 1]."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fx * fx + fy * fy)


class FourierParam:
    """The decorrelated Fourier parametrisation of images of ``size`` (h, w) pixels.

    ``decay_power``: the spectrum scale is ``1 / max(f, 1 / max(h, w)) ** decay_power`` (0: plain
    Fourier basis); ``decorrelate``: map colours through :data:`COLOR_CHOLESKY` (else the three
    channels are RGB directly). :meth:`image` is the forward map, :meth:`spectrum_of` its inverse.
    """

    def __init__(self, size: Tuple[int, int], decay_power: float = 1.0, decorrelate: bool = True,
                 dtype: torch.dtype = torch.float32, device: "torch.device | str" = "cpu") -> None:
        self.size = (int(size[0]), int(size[1]))
        h, w = self.size
        self.decorrelate = bool(decorrelate)
        self.dtype, self.device = dtype, torch.device(device)
        scale = 1.0 / np.maximum(rfft_freqs(h, w), 1.0 / max(h, w)) ** float(decay_power)
        self.scale = torch.as_tensor(scale, dtype=dtype, device=self.device)  # [h, w // 2 + 1]
        self.color = torch.as_tensor(COLOR_CHOLESKY if decorrelate else np.eye(3), dtype=dtype, device=self.device)

    @property
    def spectrum_shape(self) -> Tuple[int, int, int, int]:
        """(3, h, w // 2 + 1, 2): the shape of one image's spectrum."""
        h, w = self.size
        return (3, h, w // 2 + 1, 2)

    def random(self, seeds: Sequence[int], sd: float = 0.01) -> Tensor:
        """Initial spectra [len(seeds), 3, h, w // 2 + 1, 2]: N(0, sd) coefficients, image i drawn
        from a generator seeded with ``seeds[i]`` alone (so an image does not depend on the others
        in its batch)."""
        out = [torch.randn(self.spectrum_shape, generator=torch.Generator().manual_seed(int(s)),
                           dtype=torch.float64) * sd for s in seeds]
        return torch.stack(out).to(self.dtype).to(self.device)

    def logits(self, spectrum: Tensor) -> Tensor:
        """Pre-sigmoid RGB [N, 3, h, w] of ``spectrum`` [N, 3, h, w // 2 + 1, 2]."""
        z = torch.fft.irfft2(torch.view_as_complex(spectrum * self.scale[..., None]), s=self.size, norm="ortho")
        z = z / FFT_DIVISOR
        return torch.einsum("ij,njhw->nihw", self.color, z)

    def image(self, spectrum: Tensor) -> Tensor:
        """RGB images [N, 3, h, w] in (0, 1) of ``spectrum``."""
        return torch.sigmoid(self.logits(spectrum))

    def spectrum_of(self, images: Tensor, eps: Optional[float] = None) -> Tensor:
        """The spectrum whose :meth:`image` is ``images`` [N, 3, h, w] (values clamped into
        [eps, 1 - eps] first; default eps: 1e-6 in float32, 1e-12 in float64)."""
        if tuple(images.shape[-2:]) != self.size or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, {self.size[0]}, {self.size[1]}], got {list(images.shape)}")
        eps = eps if eps is not None else (1e-12 if self.dtype == torch.float64 else 1e-6)
        x = images.to(self.device, self.dtype).clamp(eps, 1 - eps)
        rgb = torch.log(x) - torch.log1p(-x)  # logit
        # solve color @ z = rgb per pixel (lower-triangular for the Cholesky factor)
        flat = rgb.permute(1, 0, 2, 3).reshape(3, -1)
        z = torch.linalg.solve_triangular(self.color, flat, upper=False)
        z = z.reshape(3, images.shape[0], *self.size).permute(1, 0, 2, 3) * FFT_DIVISOR
        spec = torch.fft.rfft2(z, norm="ortho") / self.scale
        return torch.view_as_real(spec).contiguous()
