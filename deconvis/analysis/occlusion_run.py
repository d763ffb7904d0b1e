"""``deconvis occlusion`` as a library call: :class:`OcclusionConfig` and :func:`run_occlusion`.

Every field of :class:`OcclusionConfig` is a YAML key (``--config configs/occlusion.yaml``) and a
flag (``--size 32``), by :mod:`deconvis.config`. For each image the run writes, under
``out_dir`` (atomically): ``<image>.png`` (ZF Fig. 7, :mod:`deconvis.analysis.occlusion_figure`)
and ``<image>.json`` (:meth:`OcclusionResult.to_json` plus model, weights, image and timing);
``occlusion.json`` lists the settings and every image's files.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from deconvis.analysis.occlusion import fill_values, occlusion
from deconvis.analysis.occlusion_figure import render_occlusion
from deconvis.config import Config, option
from deconvis.errors import DeconvisError, close_matches
from deconvis.io.atomic import write_json
from deconvis.io.images import (SKIMAGE_PHOTOS, UnreadableImage, normalize, open_images, preprocess_image, read_image,
                                skimage_photo)
from deconvis.io.models import load_model, resolve_weights, torchvision_weights, with_resize_crop
from deconvis.mirror.rules import Rule
from deconvis.render.sheets import safe_name
from deconvis.utils.device import use_device

Side = Union[int, List[int]]


def side_pair(value: Any, where: str) -> Side:
    """A square side or step from YAML or a flag: ``12`` (both axes) or ``12,8`` / ``[12, 8]``
    (height, width in pixels); returns an int or [height, width]."""
    parts = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
    ints: List[int] = []
    for p in parts:
        text = str(p).strip()
        if isinstance(p, bool) or not text.lstrip("+-").isdigit():
            break
        ints.append(int(text))
    if len(ints) != len(parts) or len(ints) not in (1, 2):
        raise DeconvisError(f"{where} must be one integer (a square) or HEIGHT,WIDTH in pixels, got {value!r}")
    return ints[0] if len(ints) == 1 else ints


@dataclass
class OcclusionConfig(Config):
    """Settings of one occlusion run (ZF Fig. 7); see :func:`deconvis.analysis.occlusion.occlusion`."""

    model: str = option("zfnet_demo", "torchvision name, package.module:callable, file.py:callable or zfnet_demo")
    weights: str = option("asset:zfnet_demo.pt", "random, a torchvision weights name from the local hub cache, "
                                                 "a checkpoint path, or asset:NAME (deconvis/assets)")
    images: List[str] = option(["skimage:chelsea"], "images: files, folders, skimage:NAME (one scikit-image "
                                                     "photo) or builtin:skimage, comma separated")
    max_images: int = option(4, "at most this many images")
    layer: Optional[str] = option(None, "layer of map (b): row, container or alias; none = the last conv layer")
    size: Side = option(32, "side of the occluding square, pixels of the network input; HEIGHT,WIDTH for a "
                            "rectangle", coerce=side_pair, metavar="N|H,W")
    stride: Side = option(8, "pixels between square positions; HEIGHT,WIDTH for different steps down and across",
                          coerce=side_pair, metavar="N|H,W")
    fill: str = option("mean", "occluder value: mean (the image's mean colour), zero (0 in the network's "
                               "input space: the training mean colour) or a number (input space)")
    target: Optional[int] = option(None, "class of map (d); none = the unoccluded top class")
    batch_size: int = option(64, "squares per incremental pass")
    rule: str = option("deconvnet", "projection rule of panel (c): deconvnet, guided or gradient")
    resize: Optional[int] = option(None, "short side before the centre crop; none = the weights' preprocessing")
    crop: Optional[int] = option(None, "centre crop side = network input size; none = the weights' preprocessing")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto")
    out_dir: str = option("outputs/occlusion", "output folder (PNG + JSON per image)")

    def validate(self) -> None:
        """Checks that need no model; one-line DeconvisError naming the key."""
        for name in ("max_images", "batch_size"):
            if getattr(self, name) < 1:
                raise DeconvisError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("size", "stride"):
            v = side_pair(getattr(self, name), name)  # also checks a value set by hand
            if min([v] if isinstance(v, int) else v) < 1:
                raise DeconvisError(f"{name} must be at least 1 pixel, got {getattr(self, name)}")
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise DeconvisError(f"{name} must be at least 1 pixel, got {v}")
        if not self.images:
            raise DeconvisError("images is empty; give image files, a folder or skimage:NAME")
        if not self.out_dir:
            raise DeconvisError("out_dir is empty; give an output folder")

        Rule.parse(self.rule)
        fill_values(torch.zeros(1, 1, 1, 1), self.fill)


def _load_images(specs: List[str], limit: int) -> List[Tuple[str, np.ndarray]]:
    """(name, uint8 RGB [H, W, 3]) for each entry: a file, skimage:NAME, or an image set (folder, builtin:...)."""
    out: List[Tuple[str, np.ndarray]] = []
    for spec in specs:
        if len(out) >= limit:
            break
        if spec.startswith("skimage:"):
            name = spec[len("skimage:"):]
            if name not in SKIMAGE_PHOTOS:
                raise DeconvisError(f"unknown scikit-image photo {name!r}" + close_matches(name, SKIMAGE_PHOTOS))
            out.append((name, skimage_photo(name)))
        elif os.path.isfile(spec):
            try:
                out.append((os.path.splitext(os.path.basename(spec))[0], read_image(spec)))
            except UnreadableImage as exc:
                raise DeconvisError(f"cannot read image {exc}") from exc
        else:
            src = open_images(spec, max_images=limit - len(out))
            out.extend((src.name(i), src.load(i)) for i in range(len(src)))
    return out[:limit]


def class_names_of(spec: str, weights: str) -> Optional[List[str]]:
    """Class names from the torchvision weights' metadata, when the weights are a torchvision enum."""
    if weights.lower() == "random" or os.path.isfile(weights):
        return None

    try:
        return list(torchvision_weights(spec, weights).meta.get("categories") or []) or None
    except DeconvisError:
        return None


def _hw(v: Side) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def run_occlusion(cfg: OcclusionConfig, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Run :func:`~deconvis.analysis.occlusion.occlusion` on every image of ``cfg``; write the
    figures and JSON under ``cfg.out_dir``; return the summary written to ``occlusion.json``."""
    cfg.checked()
    device = use_device(cfg.device)
    weights = resolve_weights(cfg.weights)
    loaded = load_model(cfg.model, weights, device=device)
    pp = with_resize_crop(loaded.preprocess, cfg.resize, cfg.crop)  # --resize/--crop over the weights' preprocessing
    names = class_names_of(cfg.model, cfg.weights)
    fill: object = cfg.fill
    records = []
    for name, rgb in _load_images(cfg.images, cfg.max_images):
        display = preprocess_image(rgb, pp)
        x = normalize(display, pp)
        t0 = time.perf_counter()
        res = occlusion(loaded.model, x, layer=cfg.layer, size=_hw(cfg.size), stride=_hw(cfg.stride), fill=fill,
                        target=cfg.target, batch_size=cfg.batch_size, class_names=names, rule=cfg.rule)
        secs = time.perf_counter() - t0
        stem = safe_name(name)
        rec = res.to_json()
        rec.update(image=name, model=cfg.model, weights=cfg.weights, seconds=round(secs, 3),
                   positions=len(res.tops_y) * len(res.tops_x), preprocess=pp.to_dict())
        write_json(os.path.join(cfg.out_dir, f"{stem}.json"), rec)
        render_occlusion(res, display, os.path.join(cfg.out_dir, f"{stem}.png"),
                         title=f"{cfg.model} on {name}: occlusion sensitivity (ZF Fig. 7)")
        log(f"{name}: {rec['positions']} positions in {secs:.2f} s; {res.layer_label} map {res.channel}; "
            f"target {res.name(res.target)} p={res.clean_probability:.3f} unoccluded, "
            f"min {float(res.probability.min()):.3f} occluded"
            + (f"; computed in full (not windowable): {', '.join(res.fallback)}" if res.fallback else ""))
        records.append({"image": name, "png": f"{stem}.png", "json": f"{stem}.json"})
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    summary: Dict[str, object] = {"settings": cfg.to_dict(), "images": records}
    write_json(os.path.join(cfg.out_dir, "occlusion.json"), summary)
    log(f"wrote {len(records)} figure(s) and JSON under {cfg.out_dir}")
    return summary


__all__ = ["OcclusionConfig", "run_occlusion"]
