#!/usr/bin/env python
"""Thin wrapper: ``python scripts/visualize_layers.py ARGS`` == ``deconvis visualize ARGS``."""
import sys

from deconvis.cli import main

if __name__ == "__main__":
    sys.exit(main(["visualize", *sys.argv[1:]]))
