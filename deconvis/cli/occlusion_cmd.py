"""``deconvis occlusion``: occlusion sensitivity maps (ZF Fig. 7), exact and incremental.

Only parses: the flags and ``--config FILE.yaml`` become an
:class:`deconvis.analysis.occlusion_run.OcclusionConfig`, and
:func:`deconvis.analysis.occlusion_run.run_occlusion` does the work.
"""
from __future__ import annotations

import argparse
from typing import Any

from deconvis.analysis.occlusion_run import OcclusionConfig, run_occlusion
from deconvis import config as configbase


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = configbase.add_parser(
        subparsers, "occlusion", OcclusionConfig,
        help="occlusion sensitivity: a grey square slid over the image (ZF Fig. 7)",
        description="Slide a square over each image; per position record the total activation of the "
                    "strongest map of a layer, the true-class probability and the most probable class, "
                    "recomputing only what the square changes (exact). Writes a PNG and a JSON per image.")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    run_occlusion(configbase.parse(OcclusionConfig, args), log=lambda s: print(s, flush=True))
    return 0
