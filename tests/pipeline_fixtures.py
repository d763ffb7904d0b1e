"""Shared helpers for the visualize pipeline tests: a tiny chain CNN in a file, a folder of small
images, a matching config, and independent oracles (brute-force top-k, theoretical RF boxes)."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np
import torch
from torch import nn

from deconvis.runs.config import VisualizeConfig, load_config

TINY_NET = '''
from torch import nn


def make():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),            # conv1 "1": 32x32, RF 3
        nn.MaxPool2d(2),                                      # 16x16
        nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),            # conv2 "4": 16x16, RF 8
        nn.MaxPool2d(2),                                      # 8x8
        nn.Conv2d(5, 3, 3), nn.ReLU(),                        # conv3 "7": 6x6, RF 18
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2),
    )
'''

SIZE = 32  # preprocessed (displayed) image side


def write_net(folder) -> str:
    path = os.path.join(str(folder), "tinynet.py")
    with open(path, "w") as f:
        f.write(TINY_NET)
    return f"{path}:make"


def write_images(folder, n: int = 12, seed: int = 0, duplicate: Tuple[int, int] = (2, 9),
                 broken: bool = False) -> List[str]:
    """``n`` smooth random colour images (sizes vary around 40 px) as PNG/JPEG-free lossless files;
    image ``duplicate[1]`` is a byte copy of ``duplicate[0]`` (an exact tie)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = 36 + (i % 3) * 4, 40 + (i % 2) * 6
        noise = rng.normal(0, 1, (h, w, 3))
        img = cv2.GaussianBlur(noise, (0, 0), 1.5)
        img = (img - img.min()) / (img.max() - img.min() + 1e-9) * 255
        img = img.astype(np.uint8)
        if duplicate and i == duplicate[1]:
            img = cv2.imread(paths[duplicate[0]], cv2.IMREAD_UNCHANGED)
        path = os.path.join(str(folder), f"img{i:02d}.png")
        cv2.imwrite(path, img)
        paths.append(path)
    if broken:
        with open(os.path.join(str(folder), "img99_broken.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n garbage")
    return paths


def tiny_config(tmp_path, **over) -> VisualizeConfig:
    spec = write_net(tmp_path)
    images = os.path.join(str(tmp_path), "imgs")
    if not os.path.isdir(images):
        write_images(images)
    values = {"model": spec, "weights": "random", "images": images, "k": 3, "batch_size": 3, "resize": SIZE,
              "crop": SIZE, "out": os.path.join(str(tmp_path), "out"), "run": "t", "progress": False,
              "checkpoint_every": 1, "min_tile": 8, "max_tile": 32, "per_sheet": 4, "device": "cpu",
              "unit_erf": False}  # the unit pages' RF + ERF images: tests/test_unit_extras.py, test_unit_pages.py
    values.update(over)
    return load_config(None, values)


def layer_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return dict(model.named_modules())


def theoretical_box(model: nn.Sequential, layer: str, y: int, x: int) -> List[int]:
    """docs/method.md section 3: r, j, start per layer of a Sequential chain; the half-open unclipped
    box of unit (y, x)."""
    r, j, start = 1, 1, 0.0
    for name, m in model.named_children():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k = m.kernel_size[0] if isinstance(m.kernel_size, tuple) else m.kernel_size
            s = m.stride[0] if isinstance(m.stride, tuple) else (m.stride or k)
            p = m.padding[0] if isinstance(m.padding, tuple) else m.padding
            d = m.dilation[0] if isinstance(m.dilation, tuple) else m.dilation
            r = r + (k - 1) * d * j
            start = start + ((k - 1) * d / 2 - p) * j
            j = j * s
        if name == layer:
            break
    half = (r - 1) / 2
    y0, x0 = start + y * j - half, start + x * j - half
    assert y0 == math.floor(y0) and x0 == math.floor(x0)
    return [int(y0), int(y0) + r, int(x0), int(x0) + r]


def brute_force_topk(model: nn.Module, images: torch.Tensor, layers: List[str], k: int):
    """{layer: [per channel [(value, image, y, x), ...] best first]} by full activations and a
    Python sort (ties: smaller image first)."""
    acts: Dict[str, torch.Tensor] = {}
    mods = layer_modules(model)
    hooks = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: acts.__setitem__(n, o.detach().clone()))
             for n in layers]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    out = {}
    for name in layers:
        a = acts[name].double().numpy()
        n, c, h, w = a.shape
        rows = []
        for ch in range(c):
            cands = []
            for i in range(n):
                flat = a[i, ch].ravel()
                p = int(np.argmax(flat))
                cands.append((float(flat[p]), i, p // w, p % w))
            cands.sort(key=lambda t: (-t[0], t[1]))
            rows.append(cands[:k])
        out[name] = (rows, a)
    return out
