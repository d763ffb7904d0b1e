"""Atomic file writes: write to a temporary file in the target's folder, then ``os.replace``.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
half-written file, even when the process is killed mid-write. Parent folders are created.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np
from deconvis.errors import DeconvisError
from deconvis.io.rgb import swap_red_blue


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()  # mkstemp makes 0600 files; give results the usual permissions


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike[str]") -> Iterator[str]:
    """Yield a temporary path next to ``path``; on normal exit move it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, _MODE)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_bytes(path: "str | os.PathLike[str]", data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically.

    The rename makes the write atomic for readers and against the process being killed;
    ``durable`` also fsyncs the data before the rename so that it survives a power loss
    (a few ms per file: skip it for many small, re-creatable files such as tiles)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())


def write_text(path: "str | os.PathLike[str]", text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: "str | os.PathLike[str]", obj: Any, indent: int = 1) -> None:
    """Write ``obj`` as JSON (UTF-8, no NaN/Infinity) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def write_png(path: "str | os.PathLike[str]", rgb: np.ndarray, durable: bool = True) -> None:
    """Write an RGB (``[H, W, 3]``) or grey (``[H, W]``) uint8 image as PNG atomically (OpenCV)."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    img = np.ascontiguousarray(rgb)
    if img.dtype != np.uint8:
        raise TypeError(f"write_png needs uint8 pixels, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3:
        img = swap_red_blue(img)  # RGB -> BGR for OpenCV
    elif img.ndim != 2:
        raise ValueError(f"write_png needs [H, W, 3] or [H, W], got shape {tuple(rgb.shape)}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise OSError(f"OpenCV could not encode {path} as PNG")
    write_bytes(path, buf.tobytes(), durable=durable)


#: JPEG quality of lossy tiles and sheets, with full-resolution colour (4:4:4): at 92 the mean pixel
#: error on image patches and sheets is about 1 level of 255 (99th percentile 5 to 12), 8 % fewer
#: bytes than 93 for 0.05 to 0.15 levels more; chroma subsampling, progressive or optimised-Huffman
#: coding measured worse per byte or per CPU second (BENCHMARKS.md, "image formats")
JPEG_QUALITY = 92
#: zlib level of PNGs: 3 with the default strategy is smaller and faster than OpenCV's default (1, RLE)
PNG_LEVEL = 3


def encode_image(rgb: np.ndarray, ext: str) -> bytes:
    """An RGB (``[H, W, 3]``) or grey (``[H, W]``) uint8 image encoded as ``ext`` (``png``: lossless,
    zlib level :data:`PNG_LEVEL`; ``jpg``: quality :data:`JPEG_QUALITY`, 4:4:4)."""
    import cv2  # start-up time: OpenCV loads only when an image is encoded

    img = np.asarray(rgb)
    if img.dtype != np.uint8:
        raise TypeError(f"encode_image needs uint8 pixels, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3:
        img = swap_red_blue(img)  # RGB -> BGR for OpenCV
    elif img.ndim != 2:
        raise ValueError(f"encode_image needs [H, W, 3] or [H, W], got shape {tuple(img.shape)}")
    ext = ext.lower().lstrip(".")
    if ext == "png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL]
    elif ext in ("jpg", "jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                  cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    else:
        raise ValueError(f"encode_image: unknown format {ext!r} (png or jpg)")
    ok, buf = cv2.imencode("." + ext, np.ascontiguousarray(img), params)
    if not ok:
        raise OSError(f"OpenCV could not encode a {tuple(img.shape)} image as {ext}")
    return buf.tobytes()


def write_image(path: "str | os.PathLike[str]", rgb: np.ndarray, durable: bool = True) -> None:
    """Write an RGB or grey uint8 image atomically, as PNG or JPEG by ``path``'s extension
    (:func:`encode_image`)."""
    write_bytes(path, encode_image(rgb, os.path.splitext(os.fspath(path))[1]), durable=durable)


def save_torch(obj: Any, path: "str | os.PathLike[str]") -> None:
    """``torch.save(obj, path)`` atomically (keep ``obj`` to plain tensors/containers so it loads
    with ``weights_only=True``)."""
    import torch  # start-up time: the text and JSON writers need no torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def ensure_writable_dir(path: "str | os.PathLike[str]", what: str = "output folder") -> str:
    """Create folder ``path`` (and its parents) if needed and check that files can be written
    in it; a one-line DeconvisError naming the path and the reason otherwise (a parent that is a
    regular file, no permission, a read-only file system). Returns ``path``."""
    path = os.fspath(path)
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):  # the first part of the path that exists
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise DeconvisError(f"cannot create {what} {path}: {probe} is a file, not a folder; choose another "
                            "output folder (--out)")
    try:
        os.makedirs(path, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".deconvis-write-test.", dir=path)
        os.close(fd)
        os.remove(tmp)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DeconvisError(f"cannot write to {what} {path}: {reason}; choose another output folder (--out) "
                            "or fix its permissions") from None
    return path
