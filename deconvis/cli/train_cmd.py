"""``deconvis train``: train the demo net with ZF Fig. 4 feature-evolution snapshots.

Only parses: the flags and ``--config FILE.yaml`` become a
:class:`deconvis.training.train.TrainConfig` (see :mod:`deconvis.config`), and
:func:`deconvis.training.train.train` does the work; its docstring lists the outputs.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from deconvis.cli import main as cli_main
from deconvis import config as configbase
from deconvis.training.train import TrainConfig, train

HELP = "train the demo net with feature-evolution snapshots (ZF Fig. 4)"
DESCRIPTION = ("Train zfnet_demo on an exemplar surrogate task built from scikit-image's sample photos (offline, "
               "CPU minutes), record ZF Fig. 4 feature-evolution figures, and write a checkpoint that "
               "`deconvis visualize --model zfnet_demo --weights PATH` can load.")


def run(args: argparse.Namespace) -> int:
    train(configbase.parse(TrainConfig, args), log=lambda s: print(s, flush=True))
    return 0


add_parser = configbase.command("train", TrainConfig, run, HELP, DESCRIPTION)


def main(argv: Optional[List[str]] = None) -> int:
    """Standalone entry (``scripts/train_with_snapshots.py``): same as ``deconvis train``."""
    return cli_main(["train"] + list(sys.argv[1:] if argv is None else argv))
