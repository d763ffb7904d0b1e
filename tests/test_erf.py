"""Effective receptive field and path counts (deconvis.graph.erf, docs/method.md section 4).

Oracles: plain autograd on the model through a forward hook (ERF map), the theoretical RF box
(support), and path counts enumerated by hand / by explicit 1-D path enumeration."""
from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from deconvis.graph.erf import (SumPool2d, centre_unit, effective_receptive_field, heatmap_image, path_count,
                          write_heatmap, write_npy)
from deconvis.errors import DeconvisError
from deconvis.graph.rf import receptive_fields


def small_net(dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3)).to(dtype)


def hook_gradient(model, module, images, unit, channel=None):
    """Oracle: mean over images of sum_c |d y / d x| for unit (y, x) of ``module``'s output."""
    out = {}
    h = module.register_forward_hook(lambda m, i, o: out.__setitem__("y", o))
    model.eval()
    x = images.clone().requires_grad_(True)
    try:
        model(x)
    finally:
        h.remove()
    y = out["y"][:, :, unit[0], unit[1]]
    y = y[:, channel] if channel is not None else y
    (g,) = torch.autograd.grad(y.sum(), x)
    return g.abs().sum(1).mean(0).numpy()


def test_erf_equals_autograd_and_lives_in_the_box():
    net = small_net()
    with torch.no_grad():  # non-trivial BN statistics
        net[4].running_mean.uniform_(-1, 1)
        net[4].running_var.uniform_(0.5, 2)
    images = torch.randn(5, 3, 20, 18, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    erf = effective_receptive_field(net, "6", images=images, batch=2)
    table = receptive_fields(net, (20, 18))
    assert erf.unit == centre_unit(table["6"], (20, 18))
    assert erf.map.dtype == np.float64 and erf.map.shape == (20, 18) and erf.n_images == 5
    np.testing.assert_allclose(erf.map, hook_gradient(net, net[6], images, erf.unit), rtol=1e-12, atol=1e-15)
    y0, y1, x0, x1 = erf.clipped_box
    # by hand (docs/method.md section 3): conv3 p1 -> r 3; pool 2 -> r 4, j 2, start 0.5;
    # conv3 p1 -> r 8, start 0.5; conv3 p0 -> r 12, start 2.5: unit (y, x) sees [2y-3, 2y+9) x [2x-3, 2x+9)
    uy, ux = erf.unit
    assert erf.rf_box == (2 * uy - 3, 2 * uy + 9, 2 * ux - 3, 2 * ux + 9)
    assert erf.clipped_box == (max(2 * uy - 3, 0), min(2 * uy + 9, 20), max(2 * ux - 3, 0), min(2 * ux + 9, 18))
    outside = erf.map.copy()
    outside[y0:y1, x0:x1] = 0
    assert not outside.any() and erf.map[y0:y1, x0:x1].sum() > 0
    one = effective_receptive_field(net, "6", images=images, channel=2)
    np.testing.assert_allclose(one.map, hook_gradient(net, net[6], images, erf.unit, channel=2), rtol=1e-12)


@pytest.mark.parametrize("size,expected", [((12, 9), (2, 1)), ((14, 10), (3, 2)), ((7, 30), (1, 7))])
def test_centre_unit_is_nearest_to_image_centre(size, expected):
    net = nn.Sequential(nn.Conv2d(3, 2, 3, stride=2))            # centres 1, 3, 5, ...
    row = receptive_fields(net, size)["0"]
    u = centre_unit(row, size)
    mid = ((size[0] - 1) / 2, (size[1] - 1) / 2)
    c = row.centre(*u)
    for y, x in itertools.product(range(row.out[0]), range(row.out[1])):
        cy, cx = row.centre(y, x)
        assert abs(cy - mid[0]) >= abs(c[0] - mid[0]) and abs(cx - mid[1]) >= abs(c[1] - mid[1])
    assert u == expected                                         # ties (5 vs 7 at 5.5 ...) -> lower index


def test_random_images_are_seeded_and_model_untouched():
    net = small_net(torch.float32)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a = effective_receptive_field(net, "3", 16, n_random=3, seed=5)
    b = effective_receptive_field(net, "3", 16, n_random=3, seed=5)
    c = effective_receptive_field(net, "3", 16, n_random=3, seed=6)
    np.testing.assert_array_equal(a.map, b.map)
    assert not np.array_equal(a.map, c.map)
    assert net.training and all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    path_count(net, "3", 16)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mass_fraction_monotone_and_bounded():
    erf = effective_receptive_field(small_net(), "6", 24, n_random=4)
    qs = [0.1, 0.3, 0.5, 0.8, 0.95, 0.99, 1.0]
    fr = [erf.mass_fraction(q) for q in qs]
    assert all(a <= b for a, b in zip(fr, fr[1:])) and 0 < fr[0] and fr[-1] <= 1.0
    y0, y1, x0, x1 = erf.clipped_box
    assert fr[-1] == pytest.approx(np.count_nonzero(erf.map) / ((y1 - y0) * (x1 - x0)))
    with pytest.raises(DeconvisError):
        erf.mass_fraction(0.0)
    # a map with all mass on one pixel needs exactly one pixel for any q
    erf.map = np.zeros_like(erf.map)
    erf.map[y0, x0] = 3.0
    assert erf.mass_fraction(0.95) == pytest.approx(1 / ((y1 - y0) * (x1 - x0)))


@pytest.mark.parametrize("negative", [False, True])
def test_mass_fraction_against_counting_the_largest_values(negative):
    # random maps, mostly zeros as an ERF pasted from its RF window (and, for a general map, some
    # negative values), against the fewest largest values that reach q of the total, counted by hand
    rng = np.random.default_rng(11)
    erf = effective_receptive_field(small_net(), "6", 24, n_random=2)
    y0, y1, x0, x1 = erf.clipped_box
    for trial in range(5):
        m = np.zeros_like(erf.map)
        m[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) ** 3 * (rng.random((y1 - y0, x1 - x0)) < 0.7)
        if negative:
            m[y0, x0:x1] -= 0.01
        erf.map = m
        vals = sorted(m.ravel().tolist(), reverse=True)
        total = sum(vals)
        for q in (0.2, 0.5, 0.95):
            run, k = 0.0, 0
            while run < q * total * (1 - 1e-12):
                run += vals[k]
                k += 1
            assert erf.mass_fraction(q) * ((y1 - y0) * (x1 - x0)) == pytest.approx(k), (trial, q)


def test_path_count_two_3x3_convs():
    net = nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(), nn.Conv2d(1, 1, 3))
    pc = path_count(net, "2", 9, in_channels=1)                   # 5x5 output, centre unit (2, 2)
    tri = np.array([1, 2, 3, 2, 1], float)
    expected = np.zeros((9, 9))
    expected[2:7, 2:7] = np.outer(tri, tri)
    np.testing.assert_array_equal(pc, expected)


def _paths_1d(n, top, specs):
    """Number of paths from each input position to unit ``top`` through 1-D layers
    (kind, k, s, p) by explicit enumeration of taps (padding taps lead nowhere)."""
    sizes = [n]
    for kind, k, s, p in specs:
        sizes.append((sizes[-1] + 2 * p - k) // s + 1)
    counts = {top: 1}
    for (kind, k, s, p), n_in in zip(reversed(specs), reversed(sizes[:-1])):
        nxt = {}
        for u, c in counts.items():
            for i in range(k):
                t = u * s - p + i
                if 0 <= t < n_in:
                    nxt[t] = nxt.get(t, 0) + c
        counts = nxt
    out = np.zeros(n)
    for t, c in counts.items():
        out[t] = c
    return out


def test_path_count_with_pools_and_channels():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 1, 3),
                        nn.AvgPool2d(2, padding=1))
    size = (14, 12)
    pc = path_count(net, "4", size, in_channels=2, unit=(1, 0))
    specs = [("conv", 3, 1, 1), ("pool", 2, 2, 0), ("conv", 3, 1, 0), ("pool", 2, 2, 1)]
    # 2 input channels x 3 middle channels x 1 output channel of all-ones weights
    expected = 2 * 3 * np.outer(_paths_1d(14, 1, specs), _paths_1d(12, 0, specs))
    np.testing.assert_array_equal(pc, expected)


def test_sum_pool_geometry_matches_max_pool():
    gen = torch.Generator().manual_seed(0)
    for k, s, p, d, ceil in [(3, 2, 1, 1, True), (2, 2, 0, 1, True), (3, 2, 1, 2, False), (3, 3, 1, 2, True)]:
        x = torch.rand(1, 2, 11, 10, generator=gen, dtype=torch.float64)
        want = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)(x).shape
        y = SumPool2d((k, k), (s, s), (p, p), (d, d), ceil)(x)
        assert y.shape == want
        # window (0, 0) sums the input pixels at -p + i*d that exist
        idx = [i * d - p for i in range(k) if 0 <= i * d - p]
        assert y[0, 0, 0, 0].item() == pytest.approx(x[0, 0][np.ix_(idx, idx)].sum().item())


def test_layer_names_aliases_and_errors():
    net = small_net(torch.float32)
    e = effective_receptive_field(net, "conv2", 16, n_random=2)  # DeconvNet alias -> rectified conv2
    assert e.layer == "5"
    with pytest.raises(DeconvisError, match="did you mean"):
        effective_receptive_field(net, "conv22", 16, n_random=1)
    with pytest.raises(DeconvisError, match="does not match"):
        effective_receptive_field(net, "3", 12, images=torch.randn(1, 3, 16, 16))
    with pytest.raises(DeconvisError, match="out of range"):
        effective_receptive_field(net, "3", 16, n_random=1, channel=99)
    with pytest.raises(DeconvisError, match="too small"):
        effective_receptive_field(net, "6", 3, n_random=1)


def test_erf_on_resnet_block_and_fc():
    import torchvision

    m = torchvision.models.resnet18()
    e = effective_receptive_field(m, "layer1", 48, n_random=2)
    assert e.layer == "layer1.1.relu#2" and e.unit == (6, 6)
    y0, y1, x0, x1 = e.clipped_box
    mask = np.zeros(e.map.shape, bool)
    mask[y0:y1, x0:x1] = True
    assert not e.map[~mask].any() and e.map[mask].sum() > 0
    fc = effective_receptive_field(m, "fc", 48, n_random=1, channel=3)
    assert fc.clipped_box == (0, 48, 0, 48) and (fc.map > 0).mean() > 0.5


def test_heatmap_png(tmp_path):
    vals = np.zeros((20, 30))
    vals[5:10, 8:20] = np.linspace(0, 1, 60).reshape(5, 12)
    img = heatmap_image(vals, box=(4, 12, 6, 22), min_side=120)
    assert img.shape == (80, 120, 3) and img.dtype == np.uint8
    assert tuple(img[4 * 4, 6 * 4 + 5]) == (0, 255, 0)               # top edge of the box, green
    path = tmp_path / "sub" / "erf.png"
    write_heatmap(path, vals, box=(4, 12, 6, 22), min_side=120)
    back = cv2.imread(str(path))[:, :, ::-1]
    np.testing.assert_array_equal(back, img)
    write_npy(tmp_path / "erf.npy", vals)
    np.testing.assert_array_equal(np.load(tmp_path / "erf.npy"), vals)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erf.npy", "sub"]   # no temp files left
