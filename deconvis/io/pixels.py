"""Pixels of one image: decoding to uint8 RGB (OpenCV), the resize + centre crop that gives the
displayed image, and the normalisation into the network input and back.

Pure functions on numpy arrays and tensors (the preprocessing is described in :mod:`deconvis.io.images`).

Decompression bombs: a file's header gives its size before any pixel is decoded (Pillow reads
only the header); an image above ``max_pixels`` (default :data:`MAX_PIXELS`, the size above
which Pillow refuses to open a file) is :class:`ImageTooLarge`, skipped like an unreadable one
and never decoded. An image above :data:`REDUCED_DECODE_ABOVE` pixels that is only needed with
its short side at least ``min_side`` pixels is decoded at 1/2, 1/4 or 1/8 of its size (OpenCV's
``IMREAD_REDUCED_COLOR_*``: JPEG scales inside the decoder), never in full.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from deconvis.io.models import Preprocess
from deconvis.io.rgb import swap_red_blue

#: grey value used to pad crops outside the image
GREY = 128
#: default cap on an image's width x height (``--max-pixels``): Pillow's decompression-bomb limit
#: (2 x ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 megapixels; 4.3 GB of 8-bit RGBA decoded)
MAX_PIXELS = 178_956_970
#: images above this many pixels are decoded reduced when the caller's ``min_side`` allows it
REDUCED_DECODE_ABOVE = 1 << 24


class UnreadableImage(Exception):
    """An image file that OpenCV cannot decode (skipped, not fatal)."""


class ImageTooLarge(UnreadableImage):
    """An image whose header says it has more pixels than the cap (skipped, never decoded)."""


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


def header_pixels(path: str) -> Tuple[Optional[Tuple[int, int]], Optional[int]]:
    """``((h, w), h * w)`` from the file's header alone (Pillow opens lazily: no pixel is
    decoded); ``(None, n)`` when Pillow refuses the header as a bomb (``n`` from its message), and
    ``(None, None)`` when Pillow cannot read the header (OpenCV may still decode the file)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Image.DecompressionBombError as exc:
            m = re.search(r"\((\d+) pixels\)", str(exc))
            return None, int(m.group(1)) if m else 2 * int(Image.MAX_IMAGE_PIXELS or MAX_PIXELS)
        except Exception:  # noqa: BLE001 - not a format Pillow knows, or a damaged header
            return None, None
    return (int(h), int(w)), int(h) * int(w)


def too_large(path: str, max_pixels: Optional[int] = MAX_PIXELS) -> str:
    """Why ``path`` is refused for its size ('' when it is not, or ``max_pixels`` is 0/None)."""
    if not max_pixels:
        return ""
    return _refusal(*header_pixels(path), max_pixels)


def _refusal(size: Optional[Tuple[int, int]], n: Optional[int], max_pixels: Optional[int]) -> str:
    if not max_pixels or n is None or n <= max_pixels:
        return ""
    dims = f"{size[1]}x{size[0]} = " if size else ""
    return (f"{dims}{n / 1e6:.1f} megapixels, above --max-pixels {max_pixels} (a decompression bomb?); raise "
            "--max-pixels (max_pixels in the config) to read it")


def _reduced_flag(size: Optional[Tuple[int, int]], min_side: Optional[int]) -> Tuple[int, int]:
    """(OpenCV imread flag, reduction factor) for an image of ``size`` needed at ``min_side``."""
    import cv2

    if size is None or not min_side or size[0] * size[1] <= REDUCED_DECODE_ABOVE:
        return cv2.IMREAD_UNCHANGED, 1
    flags = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
    for f in (8, 4, 2):
        if min(size) // f >= min_side:
            return flags[f], f
    return cv2.IMREAD_UNCHANGED, 1


def read_image(path: str, max_pixels: Optional[int] = MAX_PIXELS, min_side: Optional[int] = None) -> np.ndarray:
    """Read ``path`` with OpenCV (IMREAD_UNCHANGED) -> uint8 RGB ``[H, W, 3]``;
    :class:`UnreadableImage` if it cannot be decoded, :class:`ImageTooLarge` (before decoding)
    if its header says it has more than ``max_pixels`` pixels (0/None: no cap). ``min_side``: the
    caller only needs the short side at that many pixels, so an image above
    :data:`REDUCED_DECODE_ABOVE` pixels is decoded at a reduced size no smaller than that."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    size, n = header_pixels(path)
    refused = _refusal(size, n, max_pixels)
    if refused:
        raise ImageTooLarge(f"{path}: {refused}")
    flag, _factor = _reduced_flag(size, min_side)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # fromfile+imdecode copes with non-ASCII paths
        img = cv2.imdecode(data, flag) if data.size else None
    except (OSError, cv2.error) as exc:
        raise UnreadableImage(f"{path}: {exc}") from exc
    if img is None or img.size == 0:
        raise UnreadableImage(f"{path}: not a decodable image")
    if img.ndim == 3 and img.shape[2] >= 3:
        img = swap_red_blue(img)  # BGR(A) -> RGB(A)
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


def normalize_batch(shown: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """Displayed uint8 RGB ``[B, h, w, 3]`` (any device) -> network input float32 ``[B, 3, h, w]``
    (contiguous, on the same device): value for value :func:`normalize` of each image (the same
    float32 operations in the same order), in a few vectorised passes over the batch instead of
    a NumPy pass per image (about 10x faster on the CPU; on a GPU the batch crosses as uint8)."""
    if shown.dim() != 4 or shown.shape[-1] != 3 or shown.dtype != torch.uint8:
        raise ValueError(f"expected uint8 [B, h, w, 3] images, got {shown.dtype} {list(shown.shape)}")
    b, h, w, _ = shown.shape
    dev = shown.device
    x = torch.empty((b, 3, h, w), dtype=torch.float32, device=dev)
    x.copy_(shown.permute(0, 3, 1, 2))
    mean = torch.tensor(pp.mean, dtype=torch.float32).view(1, 3, 1, 1).to(dev)
    std = torch.tensor(pp.std, dtype=torch.float32).view(1, 3, 1, 1).to(dev)
    return x.mul_(torch.tensor(1.0 / 255.0, dtype=torch.float32)).sub_(mean).div_(std)


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
