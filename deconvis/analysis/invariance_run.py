"""The invariance analysis as a run (ZF 2014 Fig. 5): its settings (:class:`InvarianceConfig`,
the YAML keys and flags of ``deconvis invariance`` and ``visualize --analyses invariance``) and
:func:`run_invariance`, which loads the network and photos, sweeps and writes the outputs.

Outputs in ``out_dir``: ``invariance.json`` (every curve, the fill, the amounts) and
``invariance.png`` (one row per transform).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List

import torch

from deconvis.analysis.common import (AnalysisConfig, apply_threads, check_fill, jsonable, load_network,
                                      read_photo, to_input)
from deconvis.analysis.invariance import TRANSFORMS, InvarianceResult, invariance, plot_invariance, sweep_amounts
from deconvis.config import option
from deconvis.errors import DeconvisError
from deconvis.io import atomic


@dataclass
class InvarianceConfig(AnalysisConfig):
    """Invariance of features and output to translation, scale and rotation (ZF 2014 Fig. 5).
    Every key is a YAML key (--config) and a --flag."""

    images: List[str] = option(["skimage:chelsea", "skimage:coffee", "skimage:astronaut", "skimage:rocket",
                                "skimage:motorcycle"], "image files or skimage:NAME photos")
    targets: List[int] = option([], "true class per image (empty: the top class of the untransformed image)")
    layers: List[str] = option(["conv1", "fc6"], "a low and a high layer (aliases or module names)")
    transforms: List[str] = option(["translate", "scale", "rotate"], "sweeps to run: translate, scale, rotate")
    translate_frac: float = option(0.268, "vertical shift range +-this fraction of the input height "
                                          "(ZF: 60 px of 224 = 0.268)")
    translate_steps: int = option(13, "translation amounts")
    scale_max: float = option(1.8, "largest zoom ratio (sweep from 1; ZF: 1.8)")
    scale_steps: int = option(9, "scale amounts")
    rotate_steps: int = option(36, "rotation amounts over [0, 360) degrees (36 = every 10 degrees, ZF)")
    fill: str = option("mean", "uncovered border: mean (normalisation mean colour), black, edge or reflect")
    batch_size: int = option(0, "images per forward (0: each sweep, all images x amounts, in one batch)")
    out_dir: str = option("outputs/invariance", "output folder")

    def validate(self) -> None:
        if not self.images:
            raise DeconvisError("images: give at least one image (file path or skimage:NAME)")
        if self.targets and len(self.targets) != len(self.images):
            raise DeconvisError(f"targets: {len(self.targets)} classes for {len(self.images)} images; "
                                "give one per image or none")
        for t in self.transforms:
            if t not in TRANSFORMS:
                raise DeconvisError(f"transforms: unknown {t!r}; choose among {', '.join(TRANSFORMS)}")
        if self.batch_size < 0:
            raise DeconvisError(f"batch_size {self.batch_size} must be >= 0 (0: one batch per sweep)")
        for k in ("translate_steps", "scale_steps", "rotate_steps"):
            if getattr(self, k) < 1:
                raise DeconvisError(f"{k} must be at least 1, got {getattr(self, k)}")
        if not 0 <= self.translate_frac <= 1:
            raise DeconvisError(f"translate_frac {self.translate_frac} must be in [0, 1]")
        if self.scale_max <= 0:
            raise DeconvisError(f"scale_max {self.scale_max} must be positive")
        check_fill(self.fill)


def sweeps(cfg: InvarianceConfig, height: int) -> Dict[str, List[float]]:
    """{transform: amounts} of ``cfg`` for inputs ``height`` pixels tall (translation in pixels)."""
    limits = {"translate": round(cfg.translate_frac * height), "scale": cfg.scale_max, "rotate": 360.0}
    steps = {"translate": cfg.translate_steps, "scale": cfg.scale_steps, "rotate": cfg.rotate_steps}
    return {t: sweep_amounts(t, steps[t], limits[t]) for t in cfg.transforms}


def run_invariance(cfg: InvarianceConfig) -> InvarianceResult:
    """Run the analysis of ``cfg`` and write its outputs; returns the InvarianceResult."""
    apply_threads(cfg.threads)
    lm = load_network(cfg.model, cfg.weights, cfg.device)
    x = torch.stack([to_input(read_photo(s), lm.preprocess)[1] for s in cfg.images])
    amounts = sweeps(cfg, x.shape[-2])
    res = invariance(lm.model, x, cfg.layers, amounts, targets=cfg.targets or None, fill=cfg.fill,
                     pp=lm.preprocess, names=cfg.images, batch_size=cfg.batch_size)
    record = dict(res.to_dict(), config=cfg.to_dict())
    atomic.write_json(os.path.join(cfg.out_dir, "invariance.json"), jsonable(record))
    plot_invariance(res, os.path.join(cfg.out_dir, "invariance.png"))
    return res


__all__ = ["InvarianceConfig", "run_invariance", "sweeps"]
