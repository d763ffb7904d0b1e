"""``deconvis train``: train the demo net with ZF Fig. 4 feature-evolution snapshots.

Only parses: the flags and ``--config FILE.yaml`` become a
:class:`deconvis.training.train.TrainConfig` (see :mod:`deconvis.runs.configbase`), and
:func:`deconvis.training.train.train` does the work; its docstring lists the outputs.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from deconvis.runs import configbase
from deconvis.training.train import TrainConfig

HELP = "train the demo net with feature-evolution snapshots (ZF Fig. 4)"
DESCRIPTION = ("Train zfnet_demo on an exemplar surrogate task built from scikit-image's sample photos (offline, "
               "CPU minutes), record ZF Fig. 4 feature-evolution figures, and write a checkpoint that "
               "`deconvis visualize --model zfnet_demo --weights PATH` can load.")


def run(args: argparse.Namespace) -> int:
    from deconvis.training.train import train

    train(configbase.parse(TrainConfig, args), log=lambda s: print(s, flush=True))
    return 0


add_parser = configbase.command("train", TrainConfig, run, HELP, DESCRIPTION)


def main(argv: Optional[List[str]] = None) -> int:
    """Standalone entry (``scripts/train_with_snapshots.py``): same as ``deconvis train``."""
    from deconvis.cli import main as cli_main

    return cli_main(["train"] + list(sys.argv[1:] if argv is None else argv))
