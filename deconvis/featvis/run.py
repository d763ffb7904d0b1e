"""Settings of feature visualisation, the ``deconvis featvis`` run, and writing its outputs: one
PNG per channel, a sheet of all of them, and ``featvis.json``, each written atomically.

:class:`FeatvisOptions` holds the optimisation settings (steps, size, learning rate, the
robustness transforms, the parametrisation): a :class:`~deconvis.config.Config`, so a run that
adds feature visualisations (unit pages) declares them by deriving from it, and
:meth:`FeatvisOptions.kwargs` passes them to :func:`visualize_channels`. :class:`FeatvisConfig`
adds the model, layer and channels of the subcommand; :func:`run_featvis` does its work.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from deconvis.analysis.common import AnalysisConfig, apply_threads, load_network
from deconvis.config import Config, check_device, option
from deconvis.errors import DeconvisError
from deconvis.featvis.optimize import FeatVis, LayerObjective, eval_mode, visualize_channels
from deconvis.io import atomic


@dataclass
class FeatvisOptions(Config):
    """How the images are optimised (Olah et al. 2017)."""

    steps: int = option(256, "optimisation steps (Adam)")
    size: Optional[int] = option(None, "image side in pixels (null: the weights' input size, e.g. 128 for the demo)")
    lr: float = option(0.05, "Adam learning rate on the Fourier spectrum")
    jitter: int = option(8, "random shift at each step, up to this many pixels")
    scale: float = option(0.1, "random zoom at each step in [1 - scale, 1 + scale]")
    rotate: float = option(10.0, "random rotation at each step in [-rotate, rotate] degrees")
    decorrelate: bool = option(True, "decorrelated colour (ImageNet colour covariance, Cholesky factor)")
    decay_power: float = option(1.0, "spectrum scale 1/f**decay_power (0: plain Fourier basis)")
    preactivation: bool = option(True, "on a ReLU layer, ascend its input (silent channels still get a gradient)")
    batch: int = option(32, "channels optimised together in one forward")
    seed: int = option(0, "seed of the initial images and of the transforms")

    def validate(self) -> None:
        for name, low in (("steps", 1), ("batch", 1), ("jitter", 0)):
            if getattr(self, name) < low:
                raise DeconvisError(f"{name} {getattr(self, name)} must be at least {low}")
        if self.size is not None and self.size < 8:
            raise DeconvisError(f"size {self.size} must be at least 8 pixels (or null for the weights' size)")
        if not 0 <= self.scale < 1:
            raise DeconvisError(f"scale {self.scale} must be in [0, 1)")
        if self.lr <= 0:
            raise DeconvisError(f"lr {self.lr} must be positive")
        if self.rotate < 0:
            raise DeconvisError(f"rotate {self.rotate} must be >= 0 degrees")

    def kwargs(self, default_size: Tuple[int, int]) -> Dict[str, Any]:
        """Keyword arguments of :func:`visualize_channels` (``size``: ``default_size`` when unset)."""
        return dict(steps=self.steps, size=(self.size, self.size) if self.size else tuple(default_size), lr=self.lr,
                    jitter=self.jitter, scale=self.scale, rotate=self.rotate, decorrelate=self.decorrelate,
                    decay_power=self.decay_power, preactivation=self.preactivation, batch=self.batch,
                    seed=self.seed)


def parse_unit(text: Optional[str], where: str = "unit") -> Optional[Tuple[int, int]]:
    """``"y,x"`` -> (y, x); None or empty -> None (the channel mean)."""
    if text is None or str(text).strip() == "":
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        y, x = int(parts[0]), int(parts[1])
    except ValueError:
        raise DeconvisError(f"{where} {text!r} must be two integers y,x (a unit of the layer's map)") from None
    if y < 0 or x < 0:
        raise DeconvisError(f"{where} {text!r} must be non-negative")
    return y, x


def slug(text: str) -> str:
    """A file-name-safe form of a model spec or layer name (``file.py:make`` -> ``file-make``)."""
    if ":" in text:
        target, _, attr = text.rpartition(":")
        text = f"{os.path.splitext(os.path.basename(target))[0]}-{attr}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[C, 3, H, W] in [0, 1] -> uint8 [C, H, W, 3]."""
    return (images.detach().to("cpu", torch.float64).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255
            ).round().astype(np.uint8)


def sheet(images: np.ndarray, columns: int = 8, gap: int = 2) -> np.ndarray:
    """uint8 [C, H, W, 3] -> one uint8 image of the C tiles in rows of ``columns``, white gaps."""
    c, h, w, _ = images.shape
    cols = max(1, min(columns, c))
    rows = (c + cols - 1) // cols
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
    for i in range(c):
        r, k = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = images[i]
    return out


def png_name(channel: int) -> str:
    """File name of a channel's image: ``channel-0017.png``."""
    return f"channel-{channel:04d}.png"


def write_featvis(out_dir: str, result: FeatVis, noise: Optional[torch.Tensor] = None,
                  extra: Optional[Dict[str, Any]] = None) -> List[str]:
    """Write ``result`` into ``out_dir``: ``channel-NNNN.png`` per channel, ``sheet.png`` and
    ``featvis.json`` (layer, unit, settings, per channel its file, final objective, the objective of
    a uniform-noise image ``noise`` [C] when given, and its per-step curve). Returns the names."""
    pixels = to_uint8(result.images)
    names = []
    for ch, img in zip(result.channels, pixels):
        atomic.write_png(os.path.join(out_dir, png_name(ch)), img)
        names.append(png_name(ch))
    atomic.write_png(os.path.join(out_dir, "sheet.png"), sheet(pixels))
    rows = []
    for i, ch in enumerate(result.channels):
        row: Dict[str, Any] = {"channel": ch, "png": png_name(ch), "objective": float(result.objective[i]),
                               "curve": [round(float(v), 6) for v in result.history[:, i]]}
        if noise is not None:
            row["noise_objective"] = float(noise[i])
        rows.append(row)
    record = {"version": 1, "layer": result.layer, "label": result.label,
              "unit": list(result.unit) if result.unit is not None else None,
              "objective": "unit" if result.unit is not None else "channel mean",
              "size": list(result.size), "seconds": round(result.seconds, 3), "settings": result.settings,
              "channels": rows, **(extra or {})}
    atomic.write_json(os.path.join(out_dir, "featvis.json"), record)
    return names + ["sheet.png", "featvis.json"]


def noise_objective(objective, channels: Sequence[int], size: Tuple[int, int], unit: Optional[Tuple[int, int]],
                    seed: int = 0) -> torch.Tensor:
    """The objective [C] of uniform-noise images (one per channel, seeded): the baseline an
    optimised image should beat."""
    gen = torch.Generator().manual_seed(int(seed) + 1)
    noise = torch.rand(len(channels), 3, size[0], size[1], generator=gen, dtype=torch.float64)
    with torch.no_grad(), eval_mode(objective.model):
        return objective.score(noise, channels, unit).to("cpu", torch.float64)


@dataclass
class FeatvisConfig(FeatvisOptions, AnalysisConfig):
    """Images that maximise channels of a layer: decorrelated Fourier parametrisation, a random
    jitter, zoom and rotation at each step, all channels of a batch in one forward. Every key is a
    YAML key (--config) and a --flag."""

    layer: str = option("conv5", "module name, container name or alias (conv5, layer3, features.10, ...)")
    channels: List[int] = option([], "channels to visualise (empty: the first `count`)")
    count: int = option(16, "with no channels given: visualise channels 0..count-1 (0: all)")
    unit: Optional[str] = option(None, "y,x: maximise that unit of the map (null: the channel mean)", metavar="Y,X")
    out_dir: str = option("", "output folder (empty: outputs/featvis-<model>-<layer>/)")

    def resolve(self, config_path: Optional[str]) -> None:
        if not self.out_dir:
            self.out_dir = os.path.join("outputs", f"featvis-{slug(self.model)}-{slug(self.layer)}")

    def validate(self) -> None:
        FeatvisOptions.validate(self)
        if not self.model:
            raise DeconvisError("model is empty; set --model (e.g. zfnet_demo, alexnet, file.py:make)")
        if not self.layer:
            raise DeconvisError("layer is empty; set --layer (e.g. conv5)")
        if self.count < 0:
            raise DeconvisError(f"count {self.count} must be >= 0 (0: all channels)")
        if any(c < 0 for c in self.channels):
            raise DeconvisError(f"channels {self.channels} must be non-negative")
        parse_unit(self.unit)
        check_device(self.device)


def run_featvis(cfg: FeatvisConfig) -> FeatVis:
    """Optimise the images of ``cfg`` and write them into ``cfg.out_dir``; returns the result."""
    apply_threads(cfg.threads)
    lm = load_network(cfg.model, cfg.weights, cfg.device)
    pp = lm.preprocess
    obj = LayerObjective(lm.model, cfg.layer, mean=pp.mean, std=pp.std)
    kwargs = cfg.kwargs(pp.crop)
    unit = parse_unit(cfg.unit)
    channels: Optional[List[int]] = list(cfg.channels) or None
    if channels is None and cfg.count:
        total = obj.check([], None, kwargs["size"])[0]
        channels = list(range(min(cfg.count, total)))
    atomic.ensure_writable_dir(cfg.out_dir)  # before the work: an unusable out_dir fails in one line
    res = visualize_channels(lm.model, cfg.layer, channels, unit=unit, objective=obj,
                             progress=lambda done, total: print(f"featvis: {done}/{total} channels", flush=True),
                             **kwargs)
    noise = noise_objective(obj, res.channels, res.size, res.unit, seed=cfg.seed)
    write_featvis(cfg.out_dir, res, noise, extra={"config": cfg.to_dict(), "model": cfg.model,
                                                  "weights": cfg.weights})
    return res
