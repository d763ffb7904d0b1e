"""``deconvis explore``: the live explorer, a local web app on 127.0.0.1.

Only parses and calls: the settings are :class:`deconvis.explore.server.ExploreConfig` and
:func:`deconvis.explore.server.serve` does the work. ``deconvis explore RUN_DIR`` is
``--run RUN_DIR``.
"""
from __future__ import annotations

import argparse
from typing import Any

from deconvis import config as configbase
from deconvis.errors import DeconvisError
from deconvis.explore.server import ExploreConfig, serve

HELP = "live explorer: a layer's maps, a unit's projections and its top-9 in the browser"
DESCRIPTION = ("Start a local web app on 127.0.0.1 over a run folder (deconvis explore outputs/demo) or a model "
               "(--model/--weights): pick or upload an image, see every channel of a layer, click a unit for "
               "its deconvnet, guided and gradient projections and RF box, beside the channel's top-9. "
               "Needs the extra: pip install 'deconvis[explore]'. Flags override the --config file.")


def run(args: argparse.Namespace) -> int:
    pos = getattr(args, "run_dir", None)
    if pos:
        if args.run not in (None, pos):
            raise DeconvisError(f"two run folders given ({pos!r} and --run {args.run!r}); give one")
        args.run = pos
    serve(configbase.parse(ExploreConfig, args))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = configbase.add_parser(subparsers, "explore", ExploreConfig, HELP, DESCRIPTION)
    parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR", default=None,
                        help="run folder written by deconvis visualize (the same as --run)")
    parser.set_defaults(func=run)
    return parser
