"""Bottom-k (the most negative pre-activation responses) and classes by mean response, against
brute force: the minima mined by streaming, merged over shards and resumed from a checkpoint equal
a plain sort of every pre-activation (planted exact ties included); the pre-activation row the
tracer picks; the bottom units' projections against the autograd oracle in float64; the per-class
means of the channels' maxima against a brute-force mean; the labels of an ImageFolder tree."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autograd_oracle import oracle_project
from deconvis.io.sources import FolderImages
from deconvis.mining import TopK, mine
from deconvis.mining.classmeans import ClassMeans
from deconvis.mirror.deconvnet import DeconvNet


def brute_bottom(z: np.ndarray, ids, k: int):
    """Per channel, the k (min value, image, y, x) with the most negative minimum over positions
    (the first minimum in row-major order), ties to the smaller image: plain Python."""
    n, c, h, w = z.shape
    rows = []
    for ch in range(c):
        cands = []
        for i in range(n):
            best, by, bx = math.inf, 0, 0
            for y in range(h):
                for x in range(w):
                    if z[i, ch, y, x] < best:
                        best, by, bx = float(z[i, ch, y, x]), y, x
            cands.append((best, int(ids[i]), by, bx))
        cands.sort(key=lambda t: (t[0], t[1]))
        rows.append(cands[:k])
    return rows


def bottom_rows(topk: TopK, layer: str):
    w = topk.bottom_winners(layer)
    return [[(float(w["values"][c, r]), int(w["images"][c, r]), int(w["ys"][c, r]), int(w["xs"][c, r]))
             for r in range(w["values"].shape[1]) if w["valid"][c, r]] for c in range(w["values"].shape[0])]


def planted(n: int, c: int = 3, h: int = 4, w: int = 5, seed: int = 0) -> torch.Tensor:
    """Pre-activations [n, c, h, w] from a few integer levels (exact ties between images and
    between positions of one image), with image 5 a copy of image 1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-4, 3, (n, c, h, w), generator=g).double() * 0.5
    z[5] = z[1]
    return z


def feed(topk: TopK, z: torch.Tensor, ids: torch.Tensor, batch: int) -> None:
    for s in range(0, len(ids), batch):
        zz = z[s:s + batch]
        topk.update({"relu": F.relu(zz), "conv": zz}, ids[s:s + batch])
        topk.seen += int(zz.shape[0])


@pytest.mark.parametrize("batch,k", [(1, 4), (3, 7), (16, 30)])
def test_streamed_minima_equal_a_sort_of_every_preactivation(batch, k):
    z = planted(16)
    ids = torch.arange(16) * 3 + 1  # global ids need not be positions
    topk = TopK(["relu"], 2, bottom_k=k, bottom_of={"relu": "conv"})
    feed(topk, z, ids, batch)
    want = brute_bottom(z.numpy(), ids.tolist(), k)
    assert bottom_rows(topk, "relu") == want
    assert any(r[0][0] == r[1][0] for r in want)  # the plant worked: equal values among the winners


def test_merge_of_shards_and_a_resumed_checkpoint_equal_one_pass():
    z = planted(20, seed=1)
    ids = torch.arange(20)
    one = TopK(["relu"], 3, bottom_k=6, bottom_of={"relu": "conv"})
    feed(one, z, ids, 4)
    # three shards as torchrun ranks would mine them, merged as gather_topk does (bare TopK + state)
    parts = []
    for sl in (slice(0, 7), slice(7, 8), slice(8, 20)):
        t = TopK(["relu"], 3, bottom_k=6, bottom_of={"relu": "conv"})
        feed(t, z[sl], ids[sl], 3)
        parts.append(t.state_dict())
    merged = TopK(["relu"], 3)
    for st in reversed(parts):
        merged.merge(TopK(["relu"], 3).load_state_dict(st))
    assert bottom_rows(merged, "relu") == bottom_rows(one, "relu") == brute_bottom(z.numpy(), ids.tolist(), 6)
    # stop after 9 images, checkpoint, resume in a fresh state (weights_only round trip)
    import io
    first = TopK(["relu"], 3, bottom_k=6, bottom_of={"relu": "conv"})
    feed(first, z[:9], ids[:9], 4)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    again = TopK(["relu"], 3, bottom_k=6, bottom_of={"relu": "conv"}).load_state_dict(
        torch.load(buf, weights_only=True))
    feed(again, z[9:], ids[9:], 4)
    assert bottom_rows(again, "relu") == bottom_rows(one, "relu")
    assert again.winners("relu")["values"].equal(one.winners("relu")["values"])  # the top-k untouched


def test_bottom_k_off_and_shared_preactivations():
    off = TopK(["relu"], 3, bottom_k=0, bottom_of={"relu": "conv"})
    assert off.bottom is None and off.state_dict()["bottom"] is None and off.bottom_winners("relu") is None
    # a conv layer mined beside its own ReLU: one state of the minima, kept by the first layer
    both = TopK(["conv", "relu"], 2, bottom_k=2, bottom_of={"conv": "conv", "relu": "conv"})
    assert both.bottom_of == {"conv": "conv"} and both.bottom.layers == ["conv"]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 3, 3)).double().eval()


class _Gap(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return F.relu(self.conv(x) + 1.0).amax(dim=(2, 3))


def test_the_preactivation_row_is_the_rectifications_input_or_the_layer_itself():
    net = _net()
    net[4].running_var.uniform_(0.5, 2.0)
    g = DeconvNet(net).graph
    assert g.preactivation("1") == "0"          # ReLU after a conv (in place)
    assert g.preactivation("5") == "4"          # ReLU after BN: the BN output
    assert g.preactivation("6") == "6"          # a conv with no rectification: its own minima
    assert g.preactivation("2") is None         # a max-pool of rectified maps
    f = DeconvNet(_Gap()).graph
    relu = next(n for n in f.layer_names if n.endswith("relu"))
    assert f.preactivation(relu) == next(n for n in f.layer_names if n.endswith("add"))  # functional ReLU


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
def test_bottom_units_project_like_the_autograd_oracle_seeded_with_their_negative_value(rule):
    net = _net()
    with torch.no_grad():
        net[4].running_mean.uniform_(-0.5, 0.5)
        net[4].running_var.uniform_(0.5, 2.0)
    torch.manual_seed(1)
    images = torch.randn(6, 3, 14, 14, dtype=torch.float64)
    dn = DeconvNet(net)
    for layer, node in (("5", "4"), ("1", "0")):
        assert dn.graph.preactivation(layer) == node
        topk = TopK([layer], 2, bottom_k=3, bottom_of={layer: node})
        mine(lambda x: dn.activations(x, [layer, node]), [(images[:4], torch.arange(4)), (images[4:], torch.arange(4, 6))],
             topk, progress=False)
        w = topk.bottom_winners(layer)
        units = torch.stack([w["images"].flatten(), torch.arange(w["values"].shape[0]).repeat_interleave(3),
                             w["ys"].flatten(), w["xs"].flatten()], 1)
        acts = dn.forward(images)
        seeds = acts[node][units[:, 0], units[:, 1], units[:, 2], units[:, 3]]
        assert torch.equal(seeds, w["values"].flatten()) and bool((seeds < 0).all())
        want = oracle_project(net, images, node, units, rule)
        got = dn.project(node, units, rule=rule)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        rec, boxes = dn.project_window(node, units, rule=rule)  # the pipeline's path, pasted back
        full = torch.zeros_like(want)
        for m, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
            cy0, cx0 = max(y0, 0), max(x0, 0)
            cy1, cx1 = min(y1, 14), min(x1, 14)
            full[m, :, cy0:cy1, cx0:cx1] = rec[m, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        torch.testing.assert_close(full, want, rtol=1e-10, atol=1e-12)
        assert float(want.abs().sum()) > 0


def brute_class_means(vals: np.ndarray, labels, n_classes: int):
    n, c = vals.shape
    means = np.full((c, n_classes), np.nan)
    counts = np.zeros((c, n_classes), dtype=int)
    for ch in range(c):
        for j in range(n_classes):
            xs = [vals[i, ch] for i in range(n) if labels[i] == j and np.isfinite(vals[i, ch])]
            counts[ch, j] = len(xs)
            if xs:
                means[ch, j] = sum(xs) / len(xs)
    return means, counts


def test_class_means_of_the_maxima_equal_a_brute_force_mean_over_shards():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(30, 4, 3, 3, generator=g, dtype=torch.float64)
    a[7, 2, 1, 1] = float("nan")                       # a non-finite maximum is left out
    labels = torch.randint(0, 4, (30,), generator=g)
    labels[labels == 3] = 2                            # class 3 has no images
    labels[4] = -1                                     # an unlabelled image
    vals = a.flatten(2).max(2).values.numpy()
    want, counts = brute_class_means(vals, labels.tolist(), 4)
    parts = []
    for sl in (slice(0, 11), slice(11, 30)):
        t = TopK(["l"], 2)
        t.set_labels(labels.tolist(), 4)
        for s in range(sl.start, sl.stop, 4):
            e = min(s + 4, sl.stop)
            t.update({"l": a[s:e]}, torch.arange(s, e))
        parts.append(t)
    merged = TopK(["l"], 2).load_state_dict(parts[0].state_dict()).merge(parts[1])
    cm = merged.classes["l"]
    np.testing.assert_allclose(cm.means().numpy(), want, rtol=1e-12, equal_nan=True)
    assert cm.counts.numpy().tolist() == counts.tolist()
    top = cm.summary(top=3)
    for ch in range(4):
        order = sorted((j for j in range(4) if counts[ch, j]), key=lambda j: (-want[ch, j], j))[:3]
        assert [r[0] for r in top[ch]] == order
        assert [r[2] for r in top[ch]] == [int(counts[ch, j]) for j in order]
        assert [r[1] for r in top[ch]] == pytest.approx([want[ch, j] for j in order], rel=1e-12)
    assert ClassMeans.from_state_dict(cm.state_dict()).summary() == cm.summary()


def test_an_imagefolder_tree_has_labels_a_flat_folder_none(tmp_path):
    import cv2
    img = np.full((8, 8, 3), 100, np.uint8)
    for rel in ("b/x.png", "a/y.png", "a/sub/z.png", "c/w.png"):
        os.makedirs(os.path.dirname(tmp_path / "tree" / rel), exist_ok=True)
        cv2.imwrite(str(tmp_path / "tree" / rel), img)
        os.makedirs(tmp_path / "flat", exist_ok=True)
        cv2.imwrite(str(tmp_path / "flat" / os.path.basename(rel)), img)
    tree = FolderImages(str(tmp_path / "tree"))
    names, labels = tree.labels()
    assert names == ["a", "b", "c"]
    assert [names[j] for j in labels] == [tree.name(i).split("/")[0] for i in range(len(tree))]
    assert FolderImages(str(tmp_path / "flat")).labels() is None
    cv2.imwrite(str(tmp_path / "tree" / "loose.png"), img)  # an image outside every class folder
    assert FolderImages(str(tmp_path / "tree")).labels() is None
