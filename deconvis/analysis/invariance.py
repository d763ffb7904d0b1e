"""Invariance of features and output to image transformations (Zeiler & Fergus 2014, Fig. 5).

Each image is transformed over a sweep of amounts: vertical translation (pixels, positive =
down), scale (zoom ratio about the centre, >= 1 by default) and rotation (degrees,
counter-clockwise, about the centre). For each amount we record, at a low and a high layer, the
Euclidean distance ``||f(T x) - f(x)||_2`` between the feature vectors (the whole activation,
flattened) of the transformed and the original image, that distance divided by ``||f(x)||_2``,
and the probability of the true class. One forward batch per image and transform sweep.

Transforms act on the network input ``[3, H, W]`` (after preprocessing) with bilinear
interpolation (OpenCV ``warpAffine``); pixels the transformed image does not cover are filled by
``fill``: ``mean`` (the normalisation mean colour, 0 in input space; default), ``black``,
``edge`` (replicate the border pixel) or ``reflect`` (mirror without repeating the edge).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from deconvis.analysis.common import (check_fill, check_targets, fill_value, flat, output_layer, pyplot, resolve_layers,
                                      save_figure, softmax_prob)
from deconvis.errors import DeconvisError
from deconvis.io.models import Preprocess
from deconvis.mirror.deconvnet import DeconvNet

TRANSFORMS = ("translate", "scale", "rotate")
UNITS = {"translate": "pixels", "scale": "ratio", "rotate": "degrees"}


@dataclass
class Sweep:
    """One transform's curves. Arrays are [n_images, n_amounts] (float64)."""

    transform: str
    unit: str
    amounts: List[float]
    distance: Dict[str, np.ndarray]          # layer -> ||f(Tx) - f(x)||_2
    relative: Dict[str, np.ndarray]          # layer -> distance / ||f(x)||_2
    probability: np.ndarray                  # p(true class | Tx)

    def to_dict(self) -> Dict[str, object]:
        return {"transform": self.transform, "unit": self.unit, "amounts": list(self.amounts),
                "distance": {k: v.tolist() for k, v in self.distance.items()},
                "relative": {k: v.tolist() for k, v in self.relative.items()},
                "probability": self.probability.tolist()}


@dataclass
class InvarianceResult:
    """Curves of every sweep for ``images`` (names), their ``targets`` (class ids) and ``layers``."""

    images: List[str]
    targets: List[int]
    layers: List[str]
    fill: str
    input_size: List[int]
    sweeps: List[Sweep] = field(default_factory=list)

    def sweep(self, transform: str) -> Sweep:
        for s in self.sweeps:
            if s.transform == transform:
                return s
        raise KeyError(transform)

    def to_dict(self) -> Dict[str, object]:
        return {"images": self.images, "targets": self.targets, "layers": self.layers, "fill": self.fill,
                "fill_meaning": FILL_MEANING[self.fill], "input_size": self.input_size,
                "distance": "Euclidean distance between flattened activations of the transformed and the "
                            "original image; relative = divided by the original's norm",
                "sweeps": [s.to_dict() for s in self.sweeps]}


FILL_MEANING = {
    "mean": "uncovered pixels set to the normalisation mean colour (0 in network input space)",
    "black": "uncovered pixels set to black (pixel value 0)",
    "edge": "uncovered pixels copy the nearest border pixel",
    "reflect": "uncovered pixels mirror the image about its border (edge pixel not repeated)",
}


def affine_matrix(transform: str, amount: float, height: int, width: int) -> np.ndarray:
    """2x3 matrix (OpenCV convention: source -> destination pixel coordinates) of ``transform`` by
    ``amount`` on an image of ``height`` x ``width`` pixels; centre ``((W-1)/2, (H-1)/2)``."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    if transform == "translate":
        return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, float(amount)]])
    if transform == "scale":
        s = float(amount)
        if s <= 0:
            raise DeconvisError(f"scale ratio {amount} must be positive")
        return np.array([[s, 0.0, (1 - s) * cx], [0.0, s, (1 - s) * cy]])
    if transform == "rotate":
        return cv2.getRotationMatrix2D((cx, cy), float(amount), 1.0)
    raise DeconvisError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")


def transform_input(x: Tensor, transform: str, amount: float, fill: str = "mean",
                    pp: Optional[Preprocess] = None) -> Tensor:
    """Network input ``x`` [3, H, W] transformed (bilinear), uncovered pixels filled by ``fill``
    (see module doc; ``pp`` gives mean/std for ``black``). Same dtype as ``x``."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    check_fill(fill)
    c, h, w = x.shape
    m = affine_matrix(transform, amount, h, w)
    img = x.detach().cpu().double().permute(1, 2, 0).numpy().astype(np.float32)
    border = {"edge": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT_101}.get(fill, cv2.BORDER_CONSTANT)
    chans = []
    const = fill_value(fill, pp or Preprocess()) if fill in ("mean", "black") else torch.zeros(c)
    for k in range(c):  # per channel: OpenCV's borderValue has at most 4 entries
        chans.append(cv2.warpAffine(np.ascontiguousarray(img[:, :, k]), m, (w, h), flags=cv2.INTER_LINEAR,
                                    borderMode=border, borderValue=float(const[k % len(const)])))
    return torch.from_numpy(np.stack(chans, 0)).to(dtype=x.dtype, device=x.device)


def sweep_amounts(transform: str, steps: int, limit: float) -> List[float]:
    """The amounts of a sweep: translate ``[-limit, limit]`` pixels, scale ``[1, limit]``, rotate
    ``[0, 360)`` degrees; ``steps`` evenly spaced values (rotation excludes 360)."""
    if steps < 1:
        raise DeconvisError(f"{transform} steps must be at least 1, got {steps}")
    if transform == "translate":
        return [float(v) for v in np.linspace(-limit, limit, steps)] if steps > 1 else [0.0]
    if transform == "scale":
        return [float(v) for v in np.linspace(1.0, limit, steps)] if steps > 1 else [1.0]
    if transform == "rotate":
        return [360.0 * i / steps for i in range(steps)]
    raise DeconvisError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")


@torch.no_grad()
def invariance(model: nn.Module, inputs: Tensor, layers: Sequence[str], amounts: Dict[str, Sequence[float]],
               targets: Optional[Sequence[int]] = None, fill: str = "mean", pp: Optional[Preprocess] = None,
               names: Optional[Sequence[str]] = None, batch_size: int = 0) -> InvarianceResult:
    """ZF Fig. 5 curves for ``inputs`` [N, 3, H, W] (normalised network input).

    ``layers``: the layers to compare (e.g. ``[conv1, fc6]``); ``amounts``: {transform: values}
    (see :func:`sweep_amounts`); ``targets``: true class per image (default: the top class of the
    untransformed image). Each sweep (all images x amounts) is one forward batch, split into
    ``batch_size`` images when > 0 (to bound memory on large nets). The model is left unchanged
    (eval-mode forward through :class:`~deconvis.mirror.deconvnet.DeconvNet`).
    """
    if inputs.dim() != 4:
        raise DeconvisError(f"inputs must be [N, 3, H, W], got shape {list(inputs.shape)}")
    check_fill(fill)
    for t in amounts:
        if t not in TRANSFORMS:
            raise DeconvisError(f"unknown transform {t!r}; choose among {', '.join(TRANSFORMS)}")
    dn = DeconvNet(model)
    rows = resolve_layers(dn, layers)
    out = output_layer(dn, inputs)
    want = list(dict.fromkeys(rows + [out]))
    clean = dn.activations(inputs, want)
    logits = clean[out]
    if targets is None:
        targets = [int(i) for i in logits.argmax(1)]
    targets = check_targets(targets, logits.shape[1])
    if len(targets) != len(inputs):
        raise DeconvisError(f"{len(targets)} targets for {len(inputs)} images; give one class per image")
    base = {l: flat(clean[r]) for l, r in zip(layers, rows)}
    result = InvarianceResult(images=list(names or [f"image{i}" for i in range(len(inputs))]), targets=targets,
                              layers=list(layers), fill=fill, input_size=list(inputs.shape[-2:]))
    n = len(inputs)
    for t, vals in amounts.items():
        vals = [float(v) for v in vals]
        batch = torch.stack([transform_input(inputs[i], t, a, fill, pp) for i in range(n) for a in vals])
        step = int(batch_size) if batch_size and batch_size > 0 else len(batch)
        parts = [dn.activations(batch[s:s + step], want) for s in range(0, len(batch), step)]
        acts = {r: torch.cat([p[r] for p in parts]) for r in want}  # one batch per sweep unless batch_size
        dist, rel = {}, {}
        for l, r in zip(layers, rows):
            f = flat(acts[r]).reshape(n, len(vals), -1)
            d = (f - base[l][:, None]).norm(dim=2).cpu().numpy()
            dist[l] = d
            rel[l] = d / np.maximum(base[l].norm(dim=1).cpu().numpy(), 1e-300)[:, None]
        tgt = torch.tensor(targets).repeat_interleave(len(vals))
        prob = softmax_prob(acts[out], tgt).reshape(n, len(vals))
        result.sweeps.append(Sweep(t, UNITS[t], vals, dist, rel, prob))
    return result


def plot_invariance(res: InvarianceResult, path: str, dpi: int = 70) -> None:
    """ZF Fig. 5 layout: one row per transform; columns: distance at each layer (raw), the same
    divided by the original norm, and the true-class probability; one line per image."""
    plt = pyplot()
    nl = len(res.layers)
    cols = 2 * nl + 1
    fig, axes = plt.subplots(len(res.sweeps), cols, figsize=(3.0 * cols, 2.5 * len(res.sweeps)), squeeze=False)
    for r, s in enumerate(res.sweeps):
        x = np.asarray(s.amounts)
        panels = [(s.distance[l], f"{l}: distance") for l in res.layers] + \
                 [(s.relative[l], f"{l}: distance / |f(x)|") for l in res.layers] + \
                 [(s.probability, "p(true class)")]
        for c, (y, title) in enumerate(panels):
            ax = axes[r, c]
            for i, name in enumerate(res.images):
                ax.plot(x, y[i], marker=".", lw=1, label=name)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(f"{s.transform} ({s.unit})", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if c == cols - 1:
                ax.set_ylim(-0.02, 1.02)
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.suptitle(f"Invariance (ZF Fig. 5); border fill: {res.fill}", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=0.9, hspace=0.55, wspace=0.3)
    save_figure(fig, path, dpi=dpi)
