"""Image sets, decoding, preprocessing and the Dataset/DataLoader."""
from __future__ import annotations

import os
import re

import cv2
import numpy as np
import pytest
import torch

from deconvis.io.images import (SKIMAGE_PHOTOS, FolderImages, ImageDataset, Normalized, SkimageImages, denormalize,
                           make_loader, normalize, normalize_batch, open_images, parse_images_spec, photo_crops, preprocess_image, read_image,
                           resized_size, to_rgb8)
from deconvis.errors import DeconvisError
from deconvis.io.models import Preprocess


def _write(path, img_bgr_or_grey):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), img_bgr_or_grey)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB
    _write(root / "b_red.png", rgb[:, :, ::-1].copy())                       # written as BGR
    _write(root / "a_grey.png", np.full((5, 7), 77, np.uint8))
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 1] = 150
    bgra[..., 3] = 10
    _write(root / "sub" / "c_rgba.png", bgra)
    _write(root / "sub" / "deeper" / "d16.png", np.full((3, 3), 65535, np.uint16))
    _write(root / "e.jpg", np.full((9, 9, 3), 100, np.uint8))
    _write(root / "f.bmp", np.full((9, 9, 3), 30, np.uint8))
    _write(root / "g.tif", np.full((9, 9, 3), 60, np.uint8))
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.txt").write_text("ignored")
    (root / ".hidden.png").write_bytes(b"")
    return root


def test_folder_lists_images_recursively_sorted(folder):
    src = FolderImages(str(folder))
    assert [src.name(i) for i in range(len(src))] == [
        "a_grey.png", "b_red.png", "broken.jpg", "e.jpg", "f.bmp", "g.tif",
        os.path.join("sub", "c_rgba.png"), os.path.join("sub", "deeper", "d16.png")]
    assert src.path(1) == os.path.join(str(folder), "b_red.png")


def test_decoding_conversions(folder):
    red = read_image(str(folder / "b_red.png"))
    assert red.shape == (6, 8, 3) and red.dtype == np.uint8
    assert red[0, 0].tolist() == [200, 0, 0]            # BGR -> RGB
    assert read_image(str(folder / "a_grey.png"))[2, 3].tolist() == [77, 77, 77]
    assert read_image(str(folder / "sub" / "c_rgba.png"))[0, 0].tolist() == [0, 150, 0]  # alpha dropped
    assert read_image(str(folder / "sub" / "deeper" / "d16.png"))[0, 0].tolist() == [255, 255, 255]
    from deconvis.io.images import UnreadableImage

    with pytest.raises(UnreadableImage):
        read_image(str(folder / "broken.jpg"))


def test_to_rgb8_variants():
    assert to_rgb8(np.array([[True, False]]))[0].tolist() == [[255] * 3, [0] * 3]
    assert to_rgb8(np.array([[0.5]]))[0, 0].tolist() == [128] * 3
    assert to_rgb8(np.full((1, 1), 32768, np.uint16))[0, 0, 0] == 128
    assert to_rgb8(np.zeros((2, 2, 1), np.uint8)).shape == (2, 2, 3)
    with pytest.raises(ValueError):
        to_rgb8(np.zeros((2, 2, 5), np.uint8))


def test_unreadable_image_gives_negative_index(folder):
    pp = Preprocess(resize=8, crop=(8, 8))
    ds = ImageDataset(FolderImages(str(folder)), pp)
    x, i = ds[2]
    assert i == -3 and x.shape == (3, 8, 8)
    x, i = ds[1]
    assert i == 1 and x.dtype == torch.float32
    ids = torch.cat([b[1] for b in make_loader(ds, batch_size=3)])
    assert ids.tolist() == [0, 1, -3, 3, 4, 5, 6, 7]
    ids2 = torch.cat([b[1] for b in make_loader(ds, batch_size=3, workers=2)])
    assert ids2.tolist() == ids.tolist()
    started = ImageDataset(FolderImages(str(folder)), pp, start=5)
    assert len(started) == 3 and started[0][1] == 5


def test_resize_and_crop_match_torchvision():
    from torchvision.transforms import functional as TF
    from torchvision.transforms.v2.functional._geometry import _compute_resized_output_size

    for h, w in [(300, 451), (451, 300), (100, 100), (37, 91)]:
        assert list(resized_size(h, w, 64)) == _compute_resized_output_size((h, w), [64])
    # centre-crop geometry: on an image that needs no resize, the crop equals torchvision's
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 57, 3), dtype=np.uint8)
    pp = Preprocess(resize=40, crop=(31, 33))
    ours = preprocess_image(img, pp)
    theirs = TF.center_crop(torch.from_numpy(img).permute(2, 0, 1), [31, 33]).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, theirs)
    # crop larger than the resized image: zero padding as torchvision
    small = preprocess_image(img, Preprocess(resize=20, crop=(32, 32)))
    theirs = TF.center_crop(torch.from_numpy(preprocess_image(img, Preprocess(resize=20, crop=(20, 28))))
                            .permute(2, 0, 1), [32, 32]).permute(1, 2, 0).numpy()
    assert np.array_equal(small, theirs)


def test_normalize_denormalize_roundtrip():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    pp = Preprocess(resize=9, crop=(9, 11))
    x = normalize(img, pp)
    assert x.shape == (3, 9, 11)
    want = (torch.from_numpy(img).permute(2, 0, 1).double() / 255 - torch.tensor(pp.mean).double()[:, None, None]) \
        / torch.tensor(pp.std).double()[:, None, None]
    assert torch.allclose(x.double(), want, atol=1e-6)
    assert np.array_equal(denormalize(x, pp), img)
    assert np.array_equal(denormalize(x[None], pp)[0], img)


def test_builtin_skimage_loads_offline():
    src = open_images("builtin:skimage")
    assert len(src) == len(SKIMAGE_PHOTOS) >= 15
    for i in range(len(src)):
        img = src.load(i)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 150
    assert src.name(0) == "skimage:astronaut"


def test_builtin_skimage_crops_is_deterministic_and_sized():
    a, b = SkimageImages(crops=True), open_images("builtin:skimage-crops")
    assert 100 <= len(a) <= 300
    assert [a.name(i) for i in range(len(a))] == [b.name(i) for i in range(len(b))]
    assert len({a.name(i) for i in range(len(a))}) == len(a)
    crop = a.load(5)
    assert crop.shape[0] == crop.shape[1] and np.array_equal(crop, b.load(5))


def test_photo_crops_geometry():
    boxes = photo_crops(300, 451)
    assert boxes[0] == ("", (0, 300, 0, 451))
    assert len(boxes) == 1 + 4 + 9
    for _, (y0, y1, x0, x1) in boxes:
        assert 0 <= y0 < y1 <= 300 and 0 <= x0 < x1 <= 451
    sides = sorted({y1 - y0 for _, (y0, y1, _, _) in boxes[1:]})
    assert sides == [105, 180]
    # corners are reached
    assert ("@0.60[1,1]", (120, 300, 271, 451)) in boxes


def test_open_images_errors(tmp_path, folder):
    with pytest.raises(DeconvisError, match="does not exist"):
        open_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeconvisError, match="holds no images"):
        open_images(str(tmp_path / "empty"))
    with pytest.raises(DeconvisError, match="is a file"):
        open_images(str(folder / "e.jpg"))
    with pytest.raises(DeconvisError, match="did you mean: skimage-crops"):
        open_images("builtin:skimage-crop")
    with pytest.raises(DeconvisError, match="unknown key"):
        parse_images_spec({"type": "folder", "path": "x", "pth": "y"})
    with pytest.raises(DeconvisError, match="type"):
        parse_images_spec({"type": "zip"})


def test_relative_folder_resolves_against_base_dir(tmp_path, folder):
    src = open_images("imgs", base_dir=str(tmp_path))
    assert len(src) == 8


def test_max_images_takes_the_first(folder):
    src = open_images(str(folder), max_images=3)
    assert len(src) == 3 and src.name(2) == "broken.jpg"
    with pytest.raises(IndexError):
        src.load(3)
    assert len(open_images({"type": "folder", "path": str(folder)}, max_images=100)) == 8


def test_torchvision_missing_dataset_says_where(tmp_path):
    root = tmp_path / "cifar"
    with pytest.raises(DeconvisError, match=r"never downloads.*" + re.escape(str(root))):
        open_images(f"torchvision:CIFAR10:{root}:test")
    with pytest.raises(DeconvisError, match="did you mean: CIFAR10"):
        open_images(f"torchvision:CIFAR1O:{root}")
    spec = parse_images_spec(f"torchvision:CIFAR10:{root}:test")
    assert spec == {"type": "torchvision", "name": "CIFAR10", "root": str(root), "split": "test"}


def test_torchvision_imagefolder(tmp_path):
    for cls in ("cats", "dogs"):
        for j in range(2):
            _write(tmp_path / "tv" / cls / f"{j}.png", np.full((6, 6, 3), 40 * j + (cls == "dogs") * 100, np.uint8))
    src = open_images({"type": "torchvision", "name": "ImageFolder", "root": str(tmp_path / "tv")})
    assert len(src) == 4
    assert src.name(2).endswith("0.png") and src.path(2).endswith(os.path.join("dogs", "0.png"))
    assert src.load(3)[0, 0].tolist() == [140] * 3


@pytest.mark.parametrize("mean,std", [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.1, 0.7, 0.33), (0.9, 0.05, 1.7))])
def test_normalize_batch_is_normalize_of_each_image_bit_for_bit(mean, std):
    rng = np.random.default_rng(7)
    pp = Preprocess(resize=13, crop=(13, 17), mean=mean, std=std)
    imgs = rng.integers(0, 256, (5, 13, 17, 3), dtype=np.uint8)
    got = normalize_batch(torch.from_numpy(imgs), pp)
    want = torch.stack([normalize(im, pp) for im in imgs])
    assert got.dtype == torch.float32 and got.shape == (5, 3, 13, 17) and got.is_contiguous()
    assert torch.equal(got, want)  # the same float32 operations in the same order: no rounding apart
    # a strided batch (every other image) and a single image
    assert torch.equal(normalize_batch(torch.from_numpy(imgs)[::2], pp), want[::2])
    assert torch.equal(normalize_batch(torch.from_numpy(imgs[:1]), pp), want[:1])
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(torch.zeros(2, 3, 4, 4), pp)


def test_displayed_dataset_through_normalized_gives_the_float_batches(folder):
    pp = Preprocess(resize=8, crop=(8, 8), mean=(0.3, 0.5, 0.2), std=(0.2, 0.4, 0.3))
    src = FolderImages(str(folder))
    shown, i = ImageDataset(src, pp, displayed=True)[1]
    assert shown.dtype == torch.uint8 and shown.shape == (8, 8, 3) and i == 1
    bad, i = ImageDataset(src, pp, displayed=True)[2]
    assert i == -3 and bad.shape == (8, 8, 3)
    plain = list(make_loader(ImageDataset(src, pp), batch_size=3))
    for read_ahead in (False, True):  # (True: the loader read on a thread, deconvis.io.prefetch)
        norm = Normalized(make_loader(ImageDataset(src, pp, displayed=True), batch_size=3), pp, read_ahead=read_ahead)
        assert len(norm) == len(plain)
        got = list(norm)
        assert len(got) == len(plain)
        for (x, ids), (y, ids2) in zip(plain, got):
            assert torch.equal(ids, ids2)
            ok = ids >= 0  # (an unreadable image's pixels are placeholders, skipped by every reader)
            assert torch.equal(x[ok], y[ok])
