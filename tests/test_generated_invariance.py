"""Invariance curves (deconvis.analysis.invariance, ZF Fig. 5) on generated networks
(tests/netgen.py), float64, against an independent computation built here: the affine matrices
written from their definitions (translate down by t; zoom by s about the centre; rotate
counter-clockwise about the centre), the warp by OpenCV's ``cv2.warpAffine`` with the border of
each fill, features from forward hooks on the model itself, and the softmax of its logits.

The warp runs on float32 arrays: OpenCV's float32 bilinear warp is exact to float32 rounding,
while its float64 warp quantises sub-pixel positions to 1/32 pixel (0.02 off on unit-variance
noise for a 0.37 px shift, OpenCV 5.1). Hence the 1e-6 relative tolerance."""
from __future__ import annotations

import math
import random

import cv2
import numpy as np
import pytest
import torch

import netgen
from deconvis.analysis.invariance import invariance
from deconvis.io.models import Preprocess

DRAWS, SLOW_DRAWS = 60, 600
PP = Preprocess(mean=(0.45, 0.5, 0.55), std=(0.2, 0.25, 0.3))


def matrix(transform: str, amount: float, h: int, w: int) -> np.ndarray:
    """2x3 source -> destination map of pixel centres (x right, y down), centre ((w-1)/2, (h-1)/2)."""
    cx, cy = (w - 1) / 2, (h - 1) / 2
    if transform == "translate":           # y' = y + t
        return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, amount]])
    if transform == "scale":               # p' = c + s (p - c)
        return np.array([[amount, 0.0, cx - amount * cx], [0.0, amount, cy - amount * cy]])
    a = math.radians(amount)               # counter-clockwise on screen (y down): x' = c + R(p - c)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, s, cx - c * cx - s * cy], [-s, c, cy + s * cx - c * cy]])


def warp(x: torch.Tensor, transform: str, amount: float, fill: str) -> torch.Tensor:
    """[C, H, W] float64 -> warped [C, H, W] (bilinear), uncovered pixels per ``fill``."""
    c, h, w = x.shape
    m = matrix(transform, amount, h, w)
    if fill in ("mean", "black"):
        border = cv2.BORDER_CONSTANT
        value = [0.0] * c if fill == "mean" else [(0.0 - PP.mean[k]) / PP.std[k] for k in range(c)]
    else:
        border = cv2.BORDER_REPLICATE if fill == "edge" else cv2.BORDER_REFLECT_101
        value = [0.0] * c
    out = [cv2.warpAffine(x[k].numpy().astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=border, borderValue=value[k]) for k in range(c)]
    return torch.from_numpy(np.stack(out)).to(x.dtype)


def features(model, x: torch.Tensor, modules):
    """{module: output [N, ...] cloned at its call} and the logits, by forward hooks."""
    out = {}
    hooks = [model.get_submodule(m).register_forward_hook(lambda mod, i, o, m=m: out.__setitem__(m, o.clone()))
             for m in modules]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for hk in hooks:
            hk.remove()
    return out, logits


def check_invariance(net: netgen.GenNet) -> None:
    rng = random.Random(net.seed)
    x = net.images(2, seed=net.seed)
    layers = list(dict.fromkeys([rng.choice(net.probes[:max(1, len(net.probes) // 2)]), rng.choice(net.probes)]))
    fill = rng.choice(["mean", "black", "edge", "reflect"])
    amounts = {"translate": [rng.uniform(-8, 8), float(rng.randint(-5, 5))],
               "scale": [1.0, rng.uniform(1.05, 1.8)],
               "rotate": [rng.uniform(0, 360), 90.0]}
    targets = [rng.randrange(net.classes) for _ in range(len(x))]
    res = invariance(net.model, x, layers, amounts, targets=targets, fill=fill, pp=PP)
    base, _ = features(net.model, x, layers)
    for t, vals in amounts.items():
        sweep = res.sweep(t)
        assert sweep.amounts == vals
        for i in range(len(x)):
            batch = torch.stack([warp(x[i], t, a, fill) for a in vals])
            feats, logits = features(net.model, batch, layers)
            prob = torch.softmax(logits, 1)[:, targets[i]].numpy()
            np.testing.assert_allclose(sweep.probability[i], prob, rtol=1e-6, atol=1e-9,
                                       err_msg=f"{t} {fill} probability\n{net}")
            for layer in layers:
                f = feats[layer].reshape(len(vals), -1)
                f0 = base[layer][i].reshape(1, -1)
                d = (f - f0).norm(dim=1).numpy()
                np.testing.assert_allclose(sweep.distance[layer][i], d, rtol=1e-6, atol=1e-9,
                                           err_msg=f"{t} {fill} distance at {layer}\n{net}")
                np.testing.assert_allclose(sweep.relative[layer][i], d / max(float(f0.norm()), 1e-300),
                                           rtol=1e-6, atol=1e-9, err_msg=f"{t} {fill} relative at {layer}")


def nets_with_heads():
    return netgen.nets(head=True)


def test_invariance_matches_an_independent_warp_on_generated_nets():
    netgen.check_nets("invariance", check_invariance, DRAWS, nets_with_heads())


@pytest.mark.slow
def test_invariance_matches_an_independent_warp_on_many_generated_nets():
    netgen.check_nets("invariance-slow", check_invariance, SLOW_DRAWS, nets_with_heads())
