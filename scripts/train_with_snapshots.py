#!/usr/bin/env python
"""Train deconvis's demo net with ZF Fig. 4 feature-evolution snapshots.

A thin wrapper over ``deconvis train`` (same flags; see ``--help``). Regenerate the shipped
checkpoint with::

    python scripts/train_with_snapshots.py --config configs/train_demo.yaml \\
        --checkpoint deconvis/assets/zfnet_demo.pt
"""
import sys

from deconvis.cli.train_cmd import main

if __name__ == "__main__":
    sys.exit(main())
