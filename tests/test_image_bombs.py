"""Decompression bombs and very large images: the header's size is checked before any decoding,
images above ``max_pixels`` are skipped (logged, named) and never decoded, and large images that
pass are decoded reduced where the preprocessing allows (never in full).

Oracles: the header size written by the test; the full decode followed by the same preprocessing
(for the reduced decode, up to the resampling difference of the reduced JPEG decoder)."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

import pipeline_fixtures as fx
from deconvis.io import pixels
from deconvis.io.images import FolderImages, ImageDataset, ImageTooLarge, UnreadableImage, open_images
from deconvis.io.models import Preprocess
from deconvis.runs import pipeline


@pytest.fixture
def decodes(monkeypatch):
    """Every ``cv2.imdecode`` call: (flag, decoded shape)."""
    calls = []
    real = cv2.imdecode

    def spy(data, flag):
        img = real(data, flag)
        calls.append((flag, None if img is None else img.shape))
        return img

    monkeypatch.setattr(cv2, "imdecode", spy)
    return calls


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 50), max(2, w // 50), 3)).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def test_an_image_above_the_cap_is_refused_from_its_header_and_never_decoded(tmp_path, decodes):
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), np.zeros((300, 200, 3), np.uint8))  # 60000 pixels, a few hundred bytes
    assert pixels.header_pixels(str(big)) == ((300, 200), 60000)
    with pytest.raises(ImageTooLarge, match=r"big.png: 200x300 = 0.1 megapixels, above --max-pixels 50000 .*raise "
                                           r"--max-pixels"):
        pixels.read_image(str(big), max_pixels=50000)
    assert decodes == []  # the header alone decided
    assert pixels.read_image(str(big), max_pixels=60000).shape == (300, 200, 3)  # at the cap: read
    assert pixels.read_image(str(big), max_pixels=0).shape == (300, 200, 3)      # 0: no cap
    # through the dataset: skipped like an unreadable image, and the source says why
    src = FolderImages(str(tmp_path), max_pixels=50000)
    x, i = ImageDataset(src, Preprocess(resize=8, crop=(8, 8)))[0]
    assert i == -1 and "above --max-pixels 50000" in src.refusal(0) and len(decodes) == 2
    # default cap: Pillow's bomb limit
    assert pixels.MAX_PIXELS == 178_956_970 and open_images(str(tmp_path)).max_pixels == pixels.MAX_PIXELS


def _png_header(path, w: int, h: int) -> None:
    """A PNG that declares ``w x h`` RGB pixels and holds one empty IDAT chunk (a few dozen bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_a_30000_px_square_png_is_refused_at_the_default_cap(tmp_path, decodes):
    """The issue's bomb: 30000 x 30000 = 900 megapixels declared in a tiny file."""
    path = str(tmp_path / "bomb.png")
    _png_header(path, 30000, 30000)
    assert os.path.getsize(path) < 100
    with pytest.raises(ImageTooLarge, match=r"bomb.png: 900.0 megapixels, above --max-pixels 178956970"):
        pixels.read_image(path)
    assert decodes == []


def test_a_file_pillow_cannot_parse_still_goes_to_opencv(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert pixels.header_pixels(str(bad)) == (None, None)
    with pytest.raises(UnreadableImage, match="not a decodable image"):
        pixels.read_image(str(bad))


def test_a_large_image_is_decoded_reduced_when_the_preprocessing_allows(tmp_path, decodes, monkeypatch):
    """Above REDUCED_DECODE_ABOVE pixels (lowered here) a JPEG needed at short side 64 is decoded
    at 1/8 (1000 px // 8 = 125 >= 64) or 1/4, and its displayed image is close to the one from
    the full decode; a small one, or one whose short side would fall below the target, is not."""
    monkeypatch.setattr(pixels, "REDUCED_DECODE_ABOVE", 100_000)
    path = str(tmp_path / "large.jpg")
    cv2.imwrite(path, _smooth(1000, 1200), [cv2.IMWRITE_JPEG_QUALITY, 95])
    pp = Preprocess(resize=64, crop=(64, 64))
    reduced = pixels.preprocess_image(pixels.read_image(path, min_side=64), pp)
    assert decodes[-1] == (cv2.IMREAD_REDUCED_COLOR_8, (125, 150, 3))
    full = pixels.preprocess_image(pixels.read_image(path), pp)
    assert decodes[-1][0] == cv2.IMREAD_UNCHANGED and decodes[-1][1][:2] == (1000, 1200)
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 4  # the same picture
    pixels.read_image(path, min_side=200)
    assert decodes[-1] == (cv2.IMREAD_REDUCED_COLOR_4, (250, 300, 3))  # 1000 // 8 < 200 <= 1000 // 4
    pixels.read_image(path, min_side=600)
    assert decodes[-1][0] == cv2.IMREAD_UNCHANGED  # no reduction keeps the short side >= 600
    monkeypatch.setattr(pixels, "REDUCED_DECODE_ABOVE", 2_000_000)
    pixels.read_image(path, min_side=64)
    assert decodes[-1][0] == cv2.IMREAD_UNCHANGED  # not large: decoded as always
    # the dataset asks for its resize target
    ImageDataset(FolderImages(str(tmp_path)), pp)[0]
    assert decodes[-1][0] == cv2.IMREAD_UNCHANGED
    monkeypatch.setattr(pixels, "REDUCED_DECODE_ABOVE", 100_000)
    ImageDataset(FolderImages(str(tmp_path)), pp)[0]
    assert decodes[-1][0] == cv2.IMREAD_REDUCED_COLOR_8


def test_the_pipeline_skips_and_names_a_bomb_and_max_pixels_lets_it_in(tmp_path, decodes):
    images = tmp_path / "imgs"
    fx.write_images(images)
    cv2.imwrite(str(images / "zz_bomb.png"), np.zeros((120, 100, 3), np.uint8))  # 12000 px; the others ~1800
    out = pipeline.run(fx.tiny_config(tmp_path, max_pixels=10000))
    assert [s["path"] for s in out.results.images["skipped"]] == [str(images / "zz_bomb.png")]
    assert out.results.mining_identity["max_pixels"] == 10000
    assert not any(shape is not None and shape[:2] == (120, 100) for _, shape in decodes)  # never decoded
    text = open(os.path.join(out.run_dir, "run.log")).read()
    assert "skipped unreadable image 12: " in text and "zz_bomb.png (100x120 = 0.0 megapixels, above --max-pixels " \
        "10000" in text
    out = pipeline.run(fx.tiny_config(tmp_path, run="raised", max_pixels=20000))
    assert out.results.images["skipped"] == [] and out.results.images["readable"] == 13
    default = pipeline.run(fx.tiny_config(tmp_path, run="default"))
    assert "max_pixels" not in default.results.mining_identity  # runs at the default keep their hash
