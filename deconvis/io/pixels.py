"""Pixels of one image: decoding to uint8 RGB (OpenCV), the resize + centre crop that gives the
displayed image, and the normalisation into the network input and back.

Pure functions on numpy arrays and tensors (the preprocessing is described in :mod:`deconvis.io.images`).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch

from deconvis.io.models import Preprocess

#: grey value used to pad crops outside the image
GREY = 128


class UnreadableImage(Exception):
    """An image file that OpenCV cannot decode (skipped, not fatal)."""


def to_rgb8(img: np.ndarray) -> np.ndarray:
    """Any decoded image -> uint8 RGB ``[H, W, 3]``.

    Accepts grey ``[H, W]``/``[H, W, 1]``, RGB(A) ``[H, W, 3|4]`` (channel order as given; alpha is
    dropped), uint8/uint16 (scaled by 255/65535), bool, or float in [0, 1].
    """
    a = np.asarray(img)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.round(a.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        info = np.iinfo(a.dtype)
        a = np.round((a.astype(np.float64) - info.min) * (255.0 / (info.max - info.min))).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"cannot read an image of shape {a.shape}")
    return np.ascontiguousarray(a[:, :, :3])


def read_image(path: str) -> np.ndarray:
    """Read ``path`` with OpenCV (IMREAD_UNCHANGED) -> uint8 RGB ``[H, W, 3]``;
    :class:`UnreadableImage` if it cannot be decoded."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    try:
        data = np.fromfile(path, dtype=np.uint8)  # fromfile+imdecode copes with non-ASCII paths
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except (OSError, cv2.error) as exc:
        raise UnreadableImage(f"{path}: {exc}") from exc
    if img is None or img.size == 0:
        raise UnreadableImage(f"{path}: not a decodable image")
    if img.ndim == 3 and img.shape[2] >= 3:
        img = img[:, :, [2, 1, 0] + list(range(3, img.shape[2]))]  # BGR(A) -> RGB(A)
    try:
        return to_rgb8(img)
    except ValueError as exc:
        raise UnreadableImage(f"{path}: {exc}") from exc


def resized_size(h: int, w: int, resize: int) -> Tuple[int, int]:
    """Size after resizing the short side to ``resize`` (long side truncated, as torchvision)."""
    if h <= w:
        return resize, max(1, int(resize * w / h))
    return max(1, int(resize * h / w)), resize


def crop_offset(h: int, w: int, crop: Tuple[int, int]) -> Tuple[int, int]:
    """Top-left corner of the centre crop (torchvision rounding; negative = padding)."""
    return int(round((h - crop[0]) / 2.0)), int(round((w - crop[1]) / 2.0))


def preprocess_image(rgb: np.ndarray, pp: Preprocess) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` -> the displayed image, uint8 RGB ``[crop_h, crop_w, 3]``:
    short side resized to ``pp.resize`` (area when shrinking, bilinear when enlarging), then
    centre-cropped to ``pp.crop`` (zero padding if the resized image is smaller)."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    h, w = rgb.shape[:2]
    nh, nw = resized_size(h, w, pp.resize)
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if nh < h else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (nw, nh), interpolation=interp)
    ch, cw = pp.crop
    top, left = crop_offset(nh, nw, (ch, cw))
    out = np.zeros((ch, cw, 3), dtype=np.uint8)
    ys, xs = max(0, top), max(0, left)
    ye, xe = min(nh, top + ch), min(nw, left + cw)
    out[ys - top:ye - top, xs - left:xe - left] = rgb[ys:ye, xs:xe]
    return out


def normalize(display: np.ndarray, pp: Preprocess) -> torch.Tensor:
    """Displayed uint8 RGB ``[h, w, 3]`` -> network input float32 ``[3, h, w]``
    (``(x / 255 - mean) / std``; numpy, single-threaded: cheap inside DataLoader workers)."""
    mean = np.asarray(pp.mean, dtype=np.float32)
    std = np.asarray(pp.std, dtype=np.float32)
    x = (np.asarray(display, dtype=np.float32) * np.float32(1.0 / 255.0) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Network input ``[..., C, h, w]`` -> display values in [0, 1] (``x * std + mean`` per
    channel, clamped), in ``x``'s dtype and device: the one inverse of the normalisation."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0, 1)


def denormalize(tensor: torch.Tensor, pp: Preprocess) -> np.ndarray:
    """Network input ``[3, h, w]`` (or ``[N, 3, h, w]``) -> displayed uint8 RGB ``[h, w, 3]``
    (``[N, h, w, 3]``)."""
    x = unnormalize(tensor.detach().to("cpu", torch.float64), pp.mean, pp.std) * 255.0
    return x.round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).numpy()
