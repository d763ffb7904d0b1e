"""The exemplar surrogate data: offline, deterministic per seed, geometrically right."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from deconvis.errors import DeconvisError
from deconvis.training.surrogate import (Augment, ExemplarDataset, Seed, colour_jitter, load_photo, load_photos,
                                render_seed)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_photos_load_offline(no_network):
    photos = load_photos(("astronaut", "camera", "coffee", "no_such_image", "brick"))
    names = [n for n, _ in photos]
    assert names == ["astronaut", "camera", "coffee", "brick"]  # unknown one skipped
    for _, p in photos:
        assert p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3
    cam = dict(photos)["camera"]  # grey -> 3 equal channels
    assert np.array_equal(cam[..., 0], cam[..., 2])
    ds = ExemplarDataset(num_classes=6, samples_per_class=2, size=32, seed=1)
    assert len(ds.photo_names) >= 10
    with pytest.raises(DeconvisError, match="no image"):
        load_photo("definitely_not_a_photo")


def test_deterministic_per_seed_and_epoch():
    a = ExemplarDataset(num_classes=8, samples_per_class=3, size=32, seed=5)
    b = ExemplarDataset(num_classes=8, samples_per_class=3, size=32, seed=5)
    c = ExemplarDataset(num_classes=8, samples_per_class=3, size=32, seed=6)
    assert a.seeds == b.seeds and a.seeds != c.seeds
    idx = [0, 7, 13, 23]
    xa, ya = a.batch(idx, epoch=2)
    torch.manual_seed(123)
    np.random.seed(9)  # global RNGs play no part
    xb, yb = b.batch(list(reversed(idx)), epoch=2)
    assert torch.equal(xa, xb.flip(0)) and torch.equal(ya, yb.flip(0))
    assert ya.tolist() == [i % 8 for i in idx]
    xe, _ = a.batch(idx, epoch=3)
    assert not torch.equal(xa, xe)  # new epoch: new transformations
    a.set_epoch(2)
    x0, y0 = a[7]
    assert torch.equal(x0, xa[1]) and y0 == 7
    assert x0.shape == (3, 32, 32) and x0.dtype == torch.float32
    # same class, different samples differ (random transformations)
    assert not torch.equal(a[0][0], a[8][0])


def test_render_seed_geometry_matches_numpy_crops():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    size = 11
    c = (size - 1) / 2
    seed = Seed(photo=0, cy=12 + c, cx=20 + c, side=size)  # exactly the crop [12:23, 20:31]
    crop = photo[12:23, 20:31]
    assert np.array_equal(render_seed(photo, seed, size), crop)
    assert np.array_equal(render_seed(photo, seed, size, flip=True), crop[:, ::-1])
    rot = render_seed(photo, seed, size, angle_deg=90.0)
    assert np.array_equal(rot, np.rot90(crop, k=-1)) or np.array_equal(rot, np.rot90(crop, k=1))
    # translation by a fraction of the side moves the window by that many pixels
    shifted = render_seed(photo, seed, size, tx=2 / size)
    assert np.array_equal(shifted, photo[12:23, 22:33])
    # zoom x2 at half the output size samples every other pixel... via a half-size output
    half = render_seed(photo, Seed(0, 12 + 5.0, 20 + 5.0, 11.0), 6)
    assert half.shape == (6, 6, 3)


def test_colour_jitter_range_and_identity():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(9, 9, 3), dtype=np.uint8)
    same = Augment(contrast=(1.0, 1.0), brightness=0.0, saturation=(1.0, 1.0), hue=0.0, gamma=(1.0, 1.0), grey=0.0)
    out = colour_jitter(img, np.random.default_rng(2), same)
    assert np.allclose(out, img / 255.0, atol=1e-6)
    out = colour_jitter(img, np.random.default_rng(2), Augment())
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    assert not np.allclose(out, img / 255.0, atol=1e-3)


def test_probe_images_fixed_and_bad_arguments():
    ds = ExemplarDataset(num_classes=10, samples_per_class=2, size=24, seed=0)
    p1 = ds.probe_images(4)
    ds.set_epoch(7)
    p2 = ds.probe_images(4)
    assert p1.shape == (4, 3, 24, 24) and torch.equal(p1, p2)  # untransformed seeds: epoch-free
    back = ds.denormalise(p1)
    assert back.min() >= 0 and back.max() <= 1
    for kw in ({"num_classes": 1}, {"samples_per_class": 0}, {"size": 4}):
        with pytest.raises(DeconvisError):
            ExemplarDataset(**{"num_classes": 4, "samples_per_class": 1, "size": 16, **kw})
    with pytest.raises(IndexError):
        ds.sample(len(ds))
