"""Thin command-line interface over the deconvis Python API.

Each subcommand lives in its own module here, exposing ``add_parser(subparsers)`` that
registers it and sets ``func(args) -> int``. User errors (:class:`DeconvisError`) print one
line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from deconvis.errors import DeconvisError

# module name under deconvis.cli for each subcommand, in help order
SUBCOMMANDS = ["visualize", "train", "rf", "erf", "occlusion", "invariance", "correspondence", "diagnose",
               "featvis", "explore"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deconvis",
        description="See what each unit of a CNN responds to (Zeiler & Fergus 2014).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"deconvis.cli.{name}_cmd")
        except ModuleNotFoundError as exc:  # subcommand not built in this checkout
            if exc.name != f"deconvis.cli.{name}_cmd":
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DeconvisError as exc:
        print(f"deconvis: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deconvis: interrupted", file=sys.stderr)
        return 130
