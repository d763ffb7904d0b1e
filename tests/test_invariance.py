"""deconvis.analysis.invariance against a direct feature-distance loop (float64), the transforms
against exact pixel permutations, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deconvis.analysis.invariance import invariance, sweep_amounts, transform_input
from deconvis.errors import DeconvisError
from deconvis.io.models import Preprocess


def _toy(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # conv1 = [1]
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # conv2 = [4]
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 5),
    ).double().eval()


def test_translate_is_an_exact_shift_with_the_fill():
    x = torch.randn(3, 8, 10, dtype=torch.float64)
    y = transform_input(x, "translate", 3, "mean")
    assert torch.equal(y[:, 3:], x[:, :5].to(y.dtype)) or torch.allclose(y[:, 3:], x[:, :5], atol=1e-6)
    assert torch.all(y[:, :3] == 0)  # mean colour = 0 in normalised input
    pp = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    yb = transform_input(x, "translate", -2, "black", pp)
    torch.testing.assert_close(yb[:, :6], x[:, 2:], atol=1e-6, rtol=0)
    expect = -torch.tensor(pp.mean, dtype=torch.float64) / torch.tensor(pp.std, dtype=torch.float64)
    torch.testing.assert_close(yb[:, 6:], expect[:, None, None].expand(3, 2, 10), atol=1e-6, rtol=0)
    ye = transform_input(x, "translate", 2, "edge")
    torch.testing.assert_close(ye[:, :2], x[:, :1].expand(3, 2, 10), atol=1e-6, rtol=0)


def test_rotate_90_and_identities():
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    r = transform_input(x, "rotate", 90, "mean")
    ref = torch.from_numpy(np.rot90(x.numpy(), 1, axes=(1, 2)).copy())  # counter-clockwise
    torch.testing.assert_close(r, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(transform_input(x, "rotate", 0), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(transform_input(x, "scale", 1.0), x, atol=1e-6, rtol=0)
    # zoom 2 about the centre: the centre pixel pair stays where it was (odd size: exact centre)
    xo = torch.randn(3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(transform_input(xo, "scale", 2.0)[:, 4, 4], xo[:, 4, 4], atol=1e-6, rtol=0)


@pytest.mark.parametrize("s", [1.5, 2.0, 2.7])
def test_scale_is_a_zoom_about_the_centre_on_every_pixel(s):
    """Scale ``s`` enlarges about the centre ``((W-1)/2, (H-1)/2)``: output pixel ``p`` shows the
    input at ``c + (p - c) / s``. Checked on every pixel of a random non-square image against
    OpenCV's warp with a matrix built here (getRotationMatrix2D at angle 0, scale s), and exactly
    where that point falls on the pixel grid (no interpolation), so a zoom out (1/s) fails."""
    import cv2

    g = torch.Generator().manual_seed(int(s * 10))
    x = torch.randn(3, 13, 17, generator=g, dtype=torch.float64)
    pp = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    got = transform_input(x, "scale", s, "black", pp)
    c, h, w = x.shape
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 0.0, s)
    fill = (-np.array(pp.mean) / np.array(pp.std)).astype(np.float32)
    img = x.numpy().astype(np.float32)
    want = np.stack([cv2.warpAffine(img[k], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                    borderValue=float(fill[k])) for k in range(c)])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)
    # independent of OpenCV: output pixels whose source point is a pixel centre copy that pixel
    cy, cx = (h - 1) / 2, (w - 1) / 2
    hits = 0
    for oy in range(h):
        for ox in range(w):
            sy, sx = cy + (oy - cy) / s, cx + (ox - cx) / s
            if abs(sy - round(sy)) < 1e-9 and abs(sx - round(sx)) < 1e-9:
                hits += 1
                np.testing.assert_allclose(got[:, oy, ox].numpy(), x[:, round(sy), round(sx)].numpy(), atol=1e-6)
    assert hits >= 1 and (s != 2.0 or hits >= 20)
    # the border: a zoom in covers the whole output, so no pixel takes the fill
    assert not np.isclose(got.numpy(), fill[:, None, None], atol=1e-6).all(0).any()


def test_sweep_amounts():
    assert sweep_amounts("translate", 5, 10) == [-10, -5, 0, 5, 10]
    assert sweep_amounts("scale", 3, 1.8) == pytest.approx([1.0, 1.4, 1.8])
    assert sweep_amounts("rotate", 4, 360) == [0, 90, 180, 270]
    with pytest.raises(DeconvisError):
        sweep_amounts("rotate", 0, 360)


@torch.no_grad()
def test_curves_equal_a_direct_loop():
    m = _toy()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    amounts = {"translate": [-3, 2], "scale": [1.5], "rotate": [0, 135]}
    res = invariance(m, x, ["conv1", "7"], amounts, targets=[0, 4], fill="edge")
    chunked = invariance(m, x, ["conv1", "7"], amounts, targets=[0, 4], fill="edge", batch_size=3)
    np.testing.assert_allclose(chunked.sweep("rotate").distance["7"], res.sweep("rotate").distance["7"], rtol=1e-12)
    for t, vals in amounts.items():
        s = res.sweep(t)
        for i in range(len(x)):
            f0_low = m[:2](x[i:i + 1]).flatten()
            f0_high = m[:8](x[i:i + 1]).flatten()
            for j, a in enumerate(vals):
                xt = transform_input(x[i], t, a, "edge")[None]
                h_low = m[:2](xt)
                h_high = m[2:8](h_low)
                d_low = float(torch.linalg.norm(h_low.flatten() - f0_low))
                d_high = float(torch.linalg.norm(h_high.flatten() - f0_high))
                p = float(torch.softmax(m[8:](h_high), 1)[0, res.targets[i]])
                assert s.distance["conv1"][i, j] == pytest.approx(d_low, rel=1e-10, abs=1e-10)
                assert s.distance["7"][i, j] == pytest.approx(d_high, rel=1e-10, abs=1e-10)
                assert s.relative["conv1"][i, j] == pytest.approx(d_low / float(f0_low.norm()), rel=1e-10)
                assert s.probability[i, j] == pytest.approx(p, rel=1e-10)
    assert res.sweep("rotate").distance["conv1"][:, 0] == pytest.approx(0, abs=1e-4)
    assert res.fill == "edge" and res.to_dict()["sweeps"][0]["transform"] == "translate"


def test_default_target_is_the_top_class():
    m = _toy(1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    res = invariance(m, x, ["conv2"], {"translate": [0]})
    assert res.targets == m(x).argmax(1).tolist()


@pytest.mark.parametrize("kwargs, match", [
    ({"layers": ["conv9"]}, "conv9"),
    ({"targets": [0, 5]}, "target class 5 is out of range"),
    ({"amounts": {"shear": [1]}}, "unknown transform"),
    ({"fill": "blue"}, "fill 'blue'"),
])
def test_bad_input_is_one_line(kwargs, match):
    m = _toy()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    args = dict(layers=["conv1"], amounts={"translate": [0, 1]})
    args.update(kwargs)
    with pytest.raises(DeconvisError, match=match) as e:
        invariance(m, x, **args)
    assert "\n" not in str(e.value)


class _Residual(nn.Module):
    """A small graph (not a chain): conv stem, a residual block, global pool, linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.r2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.r1(self.stem(x))
        h = self.r2(self.c2(h) + h)
        return self.fc(self.pool(h).flatten(1))


@torch.no_grad()
def test_graph_model_against_hooks():
    m = _Residual().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    res = invariance(m, x, ["r1", "r2"], {"rotate": [0, 90]}, fill="mean")
    seen = {}
    hooks = [getattr(m, n).register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.flatten(1)))
             for n in ("r1", "r2")]
    try:
        m(x)
        base = dict(seen)
        xt = torch.stack([transform_input(x[i], "rotate", 90) for i in range(2)])
        logits = m(xt)
    finally:
        for h in hooks:
            h.remove()
    for n in ("r1", "r2"):
        np.testing.assert_allclose(res.sweep("rotate").distance[n][:, 1],
                                   (seen[n] - base[n]).norm(dim=1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(res.sweep("rotate").probability[:, 1],
                               torch.softmax(logits, 1)[[0, 1], res.targets].numpy(), rtol=1e-10)
