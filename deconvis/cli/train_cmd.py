"""``deconvis train``: train the demo net with ZF Fig. 4 feature-evolution snapshots.

Only parses: the flags and ``--config FILE.yaml`` become a
:class:`deconvis.training.train.TrainConfig` (see :mod:`deconvis.runs.configbase`), and
:func:`deconvis.training.train.train` does the work; its docstring lists the outputs.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from deconvis.runs import configbase
from deconvis.training.train import TrainConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = configbase.add_parser(
        subparsers, "train", TrainConfig,
        help="train the demo net with feature-evolution snapshots (ZF Fig. 4)",
        description="Train zfnet_demo on an exemplar surrogate task built from scikit-image's sample "
                    "photos (offline, CPU minutes), record ZF Fig. 4 feature-evolution figures, and write "
                    "a checkpoint that `deconvis visualize --model zfnet_demo --weights PATH` can load.")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from deconvis.training.train import train

    train(configbase.parse(TrainConfig, args), log=lambda s: print(s, flush=True))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Standalone entry (``scripts/train_with_snapshots.py``): same as ``deconvis train``."""
    from deconvis.cli import main as cli_main

    return cli_main(["train"] + list(sys.argv[1:] if argv is None else argv))
