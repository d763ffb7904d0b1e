"""The part-correspondence analysis as a run (ZF 2014 Table 1): its settings
(:class:`CorrespondenceConfig`, the YAML keys and flags of ``deconvis correspondence`` and
``visualize --analyses correspondence``), the part-box images as network inputs
(:func:`part_inputs`) and :func:`run_correspondence`.

Outputs in ``out_dir``: ``correspondence.json`` (table, H tables of the parts, boxes in input
pixels), ``correspondence.md`` (the table) and ``correspondence.png`` (bars per layer).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from deconvis.analysis.common import AnalysisConfig, apply_threads, check_fill, jsonable, load_network, read_photo, to_input
from deconvis.analysis.correspondence import (CorrespondenceResult, PartBox, correspondence, input_box,
                                              load_part_boxes, plot_correspondence)
from deconvis.config import option
from deconvis.errors import DeconvisError
from deconvis.io import atomic
from deconvis.io.models import Preprocess, asset_path

#: the offline demo part boxes shipped in deconvis/assets
DEMO_PARTS = "asset:face_parts.yaml"


@dataclass
class CorrespondenceConfig(AnalysisConfig):
    """Part correspondence (ZF 2014 Table 1): Delta_l for masked parts vs random boxes of the same
    size. Every key is a YAML key (--config) and a --flag."""

    parts: str = option(DEMO_PARTS, "YAML/JSON list of {image, part, box[, crop]} records (boxes [y0, y1, x0, x1] "
                                    "half-open photo pixels); asset:face_parts.yaml is the offline demo set")
    layers: List[str] = option(["conv5", "fc6"], "layers to compare (ZF: 5 and 7)")
    random_trials: int = option(5, "random-box trials per part (0: no random rows)")
    seed: int = option(0, "seed of the random boxes")
    fill: str = option("mean", "masked pixels: mean (normalisation mean colour) or black")
    out_dir: str = option("outputs/correspondence", "output folder")

    def validate(self) -> None:
        if not self.layers:
            raise DeconvisError("layers: name at least one layer, e.g. conv5")
        if self.random_trials < 0:
            raise DeconvisError(f"random_trials {self.random_trials} must be >= 0")
        check_fill(self.fill, ("mean", "black"))


def parts_path(spec: str) -> str:
    """``asset:NAME`` -> the file shipped in deconvis/assets; other paths unchanged."""
    if spec.startswith("asset:"):
        return asset_path(spec[len("asset:"):])
    return spec


def run_correspondence(cfg: CorrespondenceConfig) -> CorrespondenceResult:
    """Run the analysis of ``cfg`` and write its outputs; returns the CorrespondenceResult."""
    apply_threads(cfg.threads)
    path = parts_path(cfg.parts)
    records = load_part_boxes(path)
    lm = load_network(cfg.model, cfg.weights, cfg.device)
    pp = lm.preprocess
    keys, inputs, boxes = part_inputs(records, path, pp)
    res = correspondence(lm.model, inputs, boxes, cfg.layers, cfg.random_trials, cfg.seed,
                         cfg.fill, pp, names=keys)
    atomic.write_json(os.path.join(cfg.out_dir, "correspondence.json"), jsonable(dict(res.to_dict(), config=cfg.to_dict())))
    atomic.write_text(os.path.join(cfg.out_dir, "correspondence.md"), res.markdown())
    plot_correspondence(res, os.path.join(cfg.out_dir, "correspondence.png"))
    return res


def part_inputs(records: Sequence[PartBox], path: str,
                pp: Preprocess) -> Tuple[List[str], Tensor, Dict[str, List[Optional[Tuple[int, int, int, int]]]]]:
    """The images of part-box ``records`` (read from ``path``: relative image paths are tried
    against its folder) as network inputs: (image keys, inputs [n, 3, H, W], {part: input-pixel box
    per image or None}) for :func:`deconvis.analysis.correspondence.correspondence`."""
    keys = list(dict.fromkeys(r.key for r in records))
    photos, inputs = {}, []
    for k in keys:
        r = next(r for r in records if r.key == k)
        if r.image not in photos:
            photos[r.image] = read_photo(r.image, base_dir=os.path.dirname(os.path.abspath(path)))
        ph = photos[r.image]
        y0, y1, x0, x1 = r.crop if r.crop is not None else (0, ph.shape[0], 0, ph.shape[1])
        if not (0 <= y0 < y1 <= ph.shape[0] and 0 <= x0 < x1 <= ph.shape[1]):
            raise DeconvisError(f"{path}: crop {[y0, y1, x0, x1]} of {r.image} is outside the "
                                f"{ph.shape[0]}x{ph.shape[1]} photo")
        inputs.append(to_input(ph[y0:y1, x0:x1], pp)[1])
    parts = list(dict.fromkeys(r.part for r in records))
    boxes: Dict[str, List[Optional[Tuple[int, int, int, int]]]] = {p: [None] * len(keys) for p in parts}
    for r in records:
        ph = photos[r.image]
        boxes[r.part][keys.index(r.key)] = input_box(r.box, ph.shape[:2], r.crop, pp,
                                                     where=f"{path}: {r.part} box of {r.key}")
    return keys, torch.stack(inputs), boxes


__all__ = ["DEMO_PARTS", "CorrespondenceConfig", "parts_path", "part_inputs", "run_correspondence"]
