"""``deconvis rf``: print a network's receptive-field table (docs/method.md section 3)."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import List, Tuple

from deconvis import config as configbase
from deconvis.config import Config, option
from deconvis.errors import DeconvisError
from deconvis.graph.rf import receptive_fields, resolve_layer
from deconvis.io.models import build_model

HELP = "receptive-field table: size, jump and centre of every layer's units"
DESCRIPTION = ("Print each layer's receptive field (rf), jump and start (centre of unit (0, 0)) in input pixels, "
               "height and width, for a model traced with torch.fx. Flags override the --config file.")


def parse_size(text: str) -> Tuple[int, int]:
    """``"224"`` -> (224, 224); ``"224,160"`` or ``"224x160"`` -> (224, 160) (height, width)."""
    parts = [p.strip() for p in str(text).replace("x", ",").replace("X", ",").split(",")]
    try:
        vals = [int(p) for p in parts if p]
    except ValueError:
        vals = []
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1 or len([p for p in parts if p]) != len(parts):
        raise DeconvisError(f"--input-size {text!r} must be H or H,W in pixels (positive integers), e.g. 224 or 224,160")
    return (vals[0], vals[1])


@dataclass
class RFConfig(Config):
    """Settings of ``deconvis rf``."""

    model: str = option("", "torchvision name (alexnet, vgg16, resnet50, ...), package.module:callable or file.py:callable")
    input_size: str = option("224", "input size in pixels: H or H,W", metavar="H[,W]")
    in_channels: int = option(3, "input channels")
    layer: List[str] = option([], "show only these layers (module name, container name or alias such as conv5); "
                                  "comma separated or repeated")
    json: bool = option(False, "print a JSON list of rows: name, kind, out, rf, jump, start")

    def validate(self) -> None:
        if not self.model:
            raise DeconvisError("model is empty; set --model (e.g. alexnet, resnet50, file.py:make)")
        parse_size(self.input_size)
        if self.in_channels < 1:
            raise DeconvisError(f"--in-channels {self.in_channels} must be at least 1")


def run(args: argparse.Namespace) -> int:
    args = configbase.parse(RFConfig, args)
    size = parse_size(args.input_size)
    model = build_model(args.model)
    table = receptive_fields(model, size, in_channels=args.in_channels)
    rows = list(table)
    if args.layer:
        names: List[str] = []
        for name in args.layer:
            row = resolve_layer(model, table, name)
            if row not in names:
                names.append(row)
        rows = [table[n] for n in names]
    if args.json:
        print("[\n" + ",\n".join(" " + json.dumps(r.to_record()) for r in rows) + "\n]")
    else:
        print(f"{args.model}: receptive fields for a {size[0]}x{size[1]} input")
        print(table.format(rows))
    return 0


add_parser = configbase.command("rf", RFConfig, run, HELP, DESCRIPTION)
