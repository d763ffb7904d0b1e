"""``deconvis erf``: effective receptive field of a layer's centre unit (docs/method.md section 4)."""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Optional

from deconvis.cli.rf_cmd import parse_size
from deconvis import config as configbase
from deconvis.config import Config, option
from deconvis.errors import DeconvisError
from deconvis.graph.erf import effective_receptive_field, path_count, write_heatmap, write_npy
from deconvis.graph.rf import receptive_fields, resolve_layer
from deconvis.io.atomic import ensure_writable_dir
from deconvis.io.models import load_model

HELP = "effective receptive field map of a layer's centre unit"
DESCRIPTION = ("Average |d unit / d input| of a layer's centre unit over random N(0, 1) images; writes erf.npy and "
               "erf.png (theoretical receptive field drawn as a box), optionally the path-count map, and prints "
               "the share of the theoretical RF holding 95% of the ERF mass. Flags override the --config file.")


def _slug(text: str) -> str:
    if ":" in text:
        target, _, attr = text.rpartition(":")
        text = f"{os.path.splitext(os.path.basename(target))[0]}-{attr}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


@dataclass
class ERFConfig(Config):
    """Settings of ``deconvis erf``."""

    model: str = option("", "torchvision name, package.module:callable or file.py:callable")
    layer: str = option("", "module name, container name or alias (conv5, conv5_3, ...)")
    input_size: str = option("224", "input size in pixels: H or H,W", metavar="H[,W]")
    weights: str = option("random", "'random', a torchvision weights name from the local hub cache, or a checkpoint")
    images: int = option(16, "random images to average")
    seed: int = option(0, "seed of the random images")
    batch: int = option(8, "images per backward pass")
    channel: Optional[int] = option(None, "seed one channel of the unit (unset: all)")
    path_count: bool = option(False, "also write the contribution-count map (unit weights, no nonlinearity)")
    out: str = option("", "output folder (empty: outputs/erf-<model>-<layer>/)", metavar="DIR")

    def validate(self) -> None:
        if not self.model:
            raise DeconvisError("model is empty; set --model (e.g. alexnet, file.py:make)")
        if not self.layer:
            raise DeconvisError("layer is empty; set --layer (e.g. conv5)")
        parse_size(self.input_size)
        for name in ("images", "batch"):
            if getattr(self, name) < 1:
                raise DeconvisError(f"--{name} {getattr(self, name)} must be at least 1")


def run(args: argparse.Namespace) -> int:
    args = configbase.parse(ERFConfig, args)
    size = parse_size(args.input_size)
    if args.images < 1:
        raise DeconvisError(f"--images {args.images} must be at least 1")
    out = args.out or os.path.join("outputs", f"erf-{_slug(args.model)}-{_slug(args.layer)}")
    loaded = load_model(args.model, args.weights, device="cpu")
    # the layer is resolved before the folder is made: a wrong --layer leaves no empty folder behind
    resolve_layer(loaded.model, receptive_fields(loaded.model, size), args.layer)
    ensure_writable_dir(out)  # before the work: an unusable --out fails in one line
    erf = effective_receptive_field(loaded.model, args.layer, size, n_random=args.images, seed=args.seed,
                                    batch=args.batch, channel=args.channel)
    write_npy(os.path.join(out, "erf.npy"), erf.map)
    write_heatmap(os.path.join(out, "erf.png"), erf.map, erf.clipped_box)
    written = ["erf.npy", "erf.png"]
    if args.path_count:
        pc = path_count(loaded.model, erf.layer, size, channel=args.channel or 0, unit=erf.unit)
        write_npy(os.path.join(out, "path_count.npy"), pc)
        write_heatmap(os.path.join(out, "path_count.png"), pc, erf.clipped_box)
        written += ["path_count.npy", "path_count.png"]
    y0, y1, x0, x1 = erf.rf_box
    frac = erf.mass_fraction(0.95)
    print(f"{args.model} {erf.layer} unit {erf.unit}: theoretical RF {y1 - y0}x{x1 - x0} px, box "
          f"y [{y0}, {y1}) x [{x0}, {x1}); {erf.n_images} random images")
    if frac != frac:  # NaN
        print("95% mass fraction: undefined (the ERF map is all zero: no gradient reaches the input)")
    else:
        print(f"95% mass fraction: {frac:.4f} (95% of the ERF mass lies in {100 * frac:.1f}% of the "
              "theoretical RF area inside the image)")
    print(f"wrote {', '.join(os.path.join(out, w) for w in written)}")
    return 0


add_parser = configbase.command("erf", ERFConfig, run, HELP, DESCRIPTION)
