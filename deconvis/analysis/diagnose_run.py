"""The architecture diagnosis as a run (ZF 2014 Sec. 4.1, Fig. 6): its settings
(:class:`DiagnoseConfig`, the YAML keys and flags of ``deconvis diagnose`` and
``visualize --analyses diagnose``) and :func:`run_diagnose`.

Outputs in ``out_dir``: ``diagnose.json``, ``diagnose.md`` (tables) and ``diagnose.png``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

from deconvis.analysis.common import AnalysisConfig, apply_threads, jsonable, load_network
from deconvis.analysis.diagnose import DiagnoseResult, conv_modules, diagnose, image_set_batches
from deconvis.analysis.diagnose_plot import plot_diagnose
from deconvis.config import option
from deconvis.errors import DeconvisError
from deconvis.io import atomic


@dataclass
class DiagnoseConfig(AnalysisConfig):
    """Architecture diagnosis (ZF 2014 Fig. 6): dead filters, dominating filters, layer-1 spectra,
    layer-2 aliasing. Every key is a YAML key (--config) and a --flag."""

    images: str = option("builtin:skimage-crops", "image set: folder, torchvision:NAME:ROOT, builtin:skimage(-crops)")
    max_images: int = option(0, "use at most this many images (0: all)")
    resize: int = option(0, "short side before the centre crop, pixels (0: the weights' preprocessing)")
    crop: int = option(0, "centre crop, pixels (0: the weights' preprocessing)")
    layers: List[str] = option([], "rectified layers checked for dead channels (empty: every conv layer)")
    dominating_factor: float = option(3.0, "a filter dominates when its RMS exceeds this times the layer median")
    fft_size: int = option(32, "first-layer filters zero-padded to this many FFT points per axis")
    band_low: float = option(0.125, "low/mid band edge, cycles/pixel")
    band_high: float = option(0.25, "mid/high band edge, cycles/pixel")
    alias_layer: str = option("auto", "layer whose projections are checked for aliasing (auto: the second conv "
                                      "layer; none: skip)")
    alias_images: int = option(32, "images searched for each channel's strongest unit to project")
    alias_halfwidth: int = option(1, "lattice neighbourhood, FFT bins (Chebyshev radius)")
    alias_stride: int = option(0, "lattice period, pixels (0: the first conv's stride, ZF's definition)")
    batch_size: int = option(32, "images per forward")
    out_dir: str = option("outputs/diagnose", "output folder")

    def validate(self) -> None:
        for k in ("max_images", "resize", "crop", "alias_halfwidth", "alias_stride"):
            if getattr(self, k) < 0:
                raise DeconvisError(f"{k} {getattr(self, k)} must be >= 0")
        for k in ("fft_size", "alias_images", "batch_size"):
            if getattr(self, k) < 1:
                raise DeconvisError(f"{k} {getattr(self, k)} must be >= 1")
        if self.dominating_factor <= 0:
            raise DeconvisError(f"dominating_factor {self.dominating_factor} must be positive")
        if not 0 < self.band_low < self.band_high:
            raise DeconvisError(f"band edges must satisfy 0 < band_low < band_high, got {self.band_low}, {self.band_high}")


def run_diagnose(cfg: DiagnoseConfig) -> DiagnoseResult:
    """Run the diagnosis of ``cfg`` and write its outputs; returns the DiagnoseResult."""
    apply_threads(cfg.threads)
    lm = load_network(cfg.model, cfg.weights, cfg.device)
    pp = lm.preprocess
    batches = image_set_batches(cfg.images, cfg.resize or pp.resize, cfg.crop or pp.crop[0], cfg.batch_size,
                                max_images=cfg.max_images or None, mean=pp.mean, std=pp.std)
    alias = None if cfg.alias_layer.lower() in ("none", "") else cfg.alias_layer
    res = diagnose(lm.model, batches, cfg.layers or None, cfg.dominating_factor, cfg.fft_size,
                   (cfg.band_low, cfg.band_high), alias, cfg.alias_images, cfg.alias_halfwidth, cfg.batch_size,
                   cfg.alias_stride)
    atomic.write_json(os.path.join(cfg.out_dir, "diagnose.json"), jsonable(dict(res.to_dict(), config=cfg.to_dict())))
    atomic.write_text(os.path.join(cfg.out_dir, "diagnose.md"), res.markdown())
    first = conv_modules(lm.model)[0][1]
    plot_diagnose(res, first.weight, os.path.join(cfg.out_dir, "diagnose.png"),
                  title=f"{cfg.model} ({cfg.weights}): architecture diagnosis (ZF Fig. 6)")
    return res


__all__ = ["DiagnoseConfig", "run_diagnose"]
