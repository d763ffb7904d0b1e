"""deconvis.analysis.correspondence: sign-Hamming tables against hand computation and an explicit
loop on a toy net; box mapping; the shipped demo boxes; bad input."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
from torch import nn

from deconvis.analysis.correspondence import (correspondence, delta_stats, input_box, load_part_boxes,
                                              parse_part_boxes, random_box, sign_hamming)
from deconvis.errors import DeconvisError
from deconvis.io.models import Preprocess

ASSET = os.path.join(os.path.dirname(__file__), "..", "deconvis", "assets", "face_parts.yaml")


def test_hand_computed_hamming_table():
    eps = torch.tensor([[1.0, -1.0, 0.0, 2.0],
                        [1.0, 1.0, 0.0, -1.0],
                        [-1.0, -1.0, 0.0, 1.0]])
    # signs differ: (0,1) at coords 1, 3 -> 2/4; (0,2) at coord 0 -> 1/4; (1,2) at 0, 1, 3 -> 3/4
    expect = np.array([[0, 0.5, 0.25], [0.5, 0, 0.75], [0.25, 0.75, 0]])
    H = sign_hamming(eps)
    np.testing.assert_allclose(H, expect)
    st = delta_stats([H])
    assert st.mean == pytest.approx(0.5)                    # (0.5 + 0.25 + 0.75) / 3
    assert st.std_pairs == pytest.approx(np.std([0.5, 0.25, 0.75]))
    assert st.std_images == pytest.approx(np.std([0.375, 0.625, 0.5]))
    # ZF's form: sum over ordered pairs i != j / (n (n-1)) equals the mean over i < j
    assert H.sum() / 6 == pytest.approx(st.mean)
    # a 0 change is a sign of its own: 0 vs +1 differs, 0 vs 0 does not
    np.testing.assert_allclose(sign_hamming(torch.tensor([[0.0, 0.0], [0.0, 3.0]])), [[0, 0.5], [0.5, 0]])


def _toy() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7)).double()


@torch.no_grad()
def test_delta_equals_an_explicit_loop():
    m = _toy()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    boxes = {"eye": [(2, 5, 3, 7), (1, 4, 1, 5), None, (6, 9, 6, 10)], "nose": [(0, 3, 0, 3)] * 4}
    res = correspondence(m, x, boxes, ["conv2", "6"], random_trials=2, seed=1, fill="mean")
    assert list(res.table) == ["eye", "nose", "random(eye)", "random(nose)"]
    for part, bs in boxes.items():
        idx = [i for i, b in enumerate(bs) if b is not None]
        for layer, sub in (("conv2", m[:5]), ("6", m)):
            eps = []
            for i in idx:
                xm = x[i].clone()
                y0, y1, x0, x1 = bs[i]
                xm[:, y0:y1, x0:x1] = 0.0
                eps.append((sub(x[i:i + 1]) - sub(xm[None])).flatten().numpy())
            hs = []
            for a, b in itertools.combinations(range(len(idx)), 2):
                sa, sb = np.sign(eps[a]), np.sign(eps[b])
                hs.append(sum(1 for u, v in zip(sa, sb) if u != v) / len(sa))
            assert res.table[part][layer].mean == pytest.approx(np.mean(hs), abs=1e-12)
            assert res.table[part][layer].std_pairs == pytest.approx(np.std(hs), abs=1e-12)
            assert res.table[part][layer].n_images == len(idx)
    assert len(res.hamming["eye"]["conv2"]) == 3


def _overlaps(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


@torch.no_grad()
def test_random_control_boxes_are_off_the_part_and_are_the_boxes_used():
    """The control rows mask boxes of the part's size inside the image that share no pixel with
    the part, a new place per image and trial; the boxes reported are the ones masked (their
    Delta equals an explicit loop over them)."""
    m = _toy()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    boxes = {"eye": [(2, 5, 3, 7), (1, 4, 1, 5), (6, 9, 6, 10)]}
    res = correspondence(m, x, boxes, ["conv2"], random_trials=6, seed=2, fill="mean")
    placed = res.random_boxes["eye"]
    assert list(placed) == res.images and all(len(v) == 6 for v in placed.values())
    for i, name in enumerate(res.images):
        y0, y1, x0, x1 = boxes["eye"][i]
        for rb in placed[name]:
            assert (rb[1] - rb[0], rb[3] - rb[2]) == (y1 - y0, x1 - x0)  # the part's size
            assert 0 <= rb[0] and rb[1] <= 12 and 0 <= rb[2] and rb[3] <= 12  # inside the image
            assert not _overlaps(rb, boxes["eye"][i]), (name, rb)
        assert len({tuple(b) for b in placed[name]}) > 1  # a new place per trial
    assert res.to_dict()["random_boxes_input_pixels"] == {"eye": placed}
    sub, hs = m[:5], []
    for t in range(6):
        eps = []
        for i, name in enumerate(res.images):
            y0, y1, x0, x1 = placed[name][t]
            xm = x[i].clone()
            xm[:, y0:y1, x0:x1] = 0.0
            eps.append(np.sign((sub(x[i:i + 1]) - sub(xm[None])).flatten().numpy()))
        hs += [float(np.mean(eps[a] != eps[b])) for a, b in itertools.combinations(range(3), 2)]
    assert res.table["random(eye)"]["conv2"].mean == pytest.approx(np.mean(hs), abs=1e-12)


def test_random_box_is_uniform_over_the_places_off_the_part():
    rng = np.random.default_rng(0)
    part, size = (3, 6, 2, 6), (9, 10)  # 3x4 part; 7x7 places of which those off the part count
    free = [(y, x) for y in range(7) for x in range(7) if not _overlaps((y, y + 3, x, x + 4), part)]
    counts = {p: 0 for p in free}
    n = 200 * len(free)
    for _ in range(n):
        b = random_box(rng, part, size)
        counts[(b[0], b[2])] += 1  # KeyError: a box on (or over) the part
    expected = n / len(free)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert min(counts.values()) > 0 and chi2 < 2.5 * len(free)  # dof = len(free) - 1; very loose
    assert random_box(rng, (0, 9, 0, 6), size) is None  # a box off a 9x6 part of a 9x10 image: none fits
    with pytest.raises(DeconvisError, match="no place .* for a random box"):
        correspondence(_toy(), torch.randn(2, 3, 12, 12, dtype=torch.float64),
                       {"face": [(0, 12, 1, 11), (0, 12, 0, 10)]}, ["conv1"], random_trials=1)


def test_box_mapping_through_resize_and_crop():
    pp = Preprocess(resize=50, crop=(40, 40))
    # 100x200 photo -> 50x100 -> centre crop rows 5..45, cols 30..70
    assert input_box((20, 40, 80, 100), (100, 200), None, pp) == (5, 15, 10, 20)
    # same photo through a crop [0, 100, 50, 150] (100x100 -> 50x50 -> rows/cols 5..45)
    assert input_box((20, 40, 80, 100), (100, 200), (0, 100, 50, 150), pp) == (5, 15, 10, 20)
    with pytest.raises(DeconvisError, match="outside the image"):
        input_box((90, 120, 0, 10), (100, 200), None, pp)
    with pytest.raises(DeconvisError, match="outside the network input"):
        input_box((0, 4, 0, 4), (100, 200), None, pp)


def test_demo_boxes_parse_and_fit_their_photos():
    from deconvis.analysis.common import read_photo
    from deconvis.training.demo_model import DEMO_INPUT_SIZE, DEMO_RESIZE

    recs = load_part_boxes(ASSET)
    assert {r.part for r in recs} == {"left_eye", "right_eye", "nose", "mouth"}
    assert len({r.key for r in recs}) == 5
    pp = Preprocess(resize=DEMO_RESIZE, crop=DEMO_INPUT_SIZE)
    shapes = {}
    for r in recs:
        if r.image not in shapes:
            shapes[r.image] = read_photo(r.image).shape[:2]
        y0, y1, x0, x1 = input_box(r.box, shapes[r.image], r.crop, pp)
        assert 0 <= y0 < y1 <= 128 and 0 <= x0 < x1 <= 128


@pytest.mark.parametrize("records, match", [
    ([{"image": "a.png", "part": "eye"}], "needs keys image, part, box"),
    ([{"image": "a.png", "part": "eye", "box": [5, 2, 0, 3]}], "is empty"),
    ([{"image": "a.png", "part": "eye", "box": [0, 1, 2]}], r"\[y0, y1, x0, x1\]"),
    ([{"image": "a.png", "part": "eye", "box": [0, 1, 2, 3], "colour": 1}], "unknown keys"),
    ([], "non-empty list"),
])
def test_bad_records(records, match):
    with pytest.raises(DeconvisError, match=match):
        parse_part_boxes(records)


def test_bad_boxes_and_layers():
    m = _toy()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with pytest.raises(DeconvisError, match="outside the 12x12 input") as e:
        correspondence(m, x, {"eye": [(0, 3, 0, 3), (10, 14, 0, 3)]}, ["conv1"])
    assert "\n" not in str(e.value)
    with pytest.raises(DeconvisError, match="at least 2"):
        correspondence(m, x, {"eye": [(0, 3, 0, 3), None]}, ["conv1"])
    with pytest.raises(DeconvisError, match="conv7"):
        correspondence(m, x, {"eye": [(0, 3, 0, 3)] * 2}, ["conv7"])
