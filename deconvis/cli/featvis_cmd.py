"""``deconvis featvis``: feature visualisation by optimisation (Olah et al. 2017).

Only parses: the flags and ``--config FILE.yaml`` become a :class:`FeatvisConfig`; the work is
:func:`deconvis.featvis.visualize_channels`, the files :func:`deconvis.featvis.run.write_featvis`.
Outputs in ``out_dir`` (default ``outputs/featvis-<model>-<layer>/``): ``channel-NNNN.png`` per
channel, ``sheet.png`` and ``featvis.json``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

from deconvis.analysis.common import AnalysisConfig, apply_threads
from deconvis.cli.analysis_common import analysis_command
from deconvis.errors import DeconvisError
from deconvis.featvis.run import FeatvisOptions, parse_unit, slug
from deconvis.config import check_device, option


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


def run_config(cfg: FeatvisConfig):
    """Optimise the images of ``cfg`` and write them; returns the FeatVis result."""
    from deconvis.analysis.common import load_network
    from deconvis.featvis.optimize import LayerObjective, visualize_channels
    from deconvis.featvis.run import noise_objective, write_featvis
    from deconvis.io.atomic import ensure_writable_dir

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
    ensure_writable_dir(cfg.out_dir)  # before the work: an unusable out_dir fails in one line
    res = visualize_channels(lm.model, cfg.layer, channels, unit=unit, objective=obj,
                             progress=lambda done, total: print(f"featvis: {done}/{total} channels", flush=True),
                             **kwargs)
    noise = noise_objective(obj, res.channels, res.size, res.unit, seed=cfg.seed)
    write_featvis(cfg.out_dir, res, noise, extra={"config": cfg.to_dict(), "model": cfg.model,
                                                  "weights": cfg.weights})
    return res


def _summary(res: Any) -> List[str]:
    per = res.seconds / max(1, len(res.channels))
    return [f"{res.label} ({res.layer}): {len(res.channels)} channels at {res.size[0]}x{res.size[1]} px, "
            f"{res.settings['steps']} steps, {res.seconds:.1f} s ({per:.2f} s per channel); "
            f"objective median {float(res.objective.median()):.3g}"]


run, add_parser = analysis_command(
    "featvis", FeatvisConfig, lambda cfg: run_config(cfg),
    "feature visualisation: images that maximise channels of a layer (Olah et al. 2017)",
    _summary, "sheet.png", ", featvis.json and channel-NNNN.png")
