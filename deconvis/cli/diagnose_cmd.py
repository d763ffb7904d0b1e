"""``deconvis diagnose``: dead and dominating filters, first-layer frequency content and
second-layer aliasing (ZF 2014 Sec. 4.1, Fig. 6).

Only parses and prints: the settings are :class:`deconvis.analysis.diagnose_run.DiagnoseConfig`
and :func:`deconvis.analysis.diagnose_run.run_diagnose` does the work (outputs listed there).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from deconvis.analysis.diagnose_run import DiagnoseConfig, run_diagnose
from deconvis.cli import main as cli_main
from deconvis.cli.analysis_common import analysis_command

# run(args) and add_parser(subparsers)
run, add_parser = analysis_command(
    "diagnose", DiagnoseConfig, run_diagnose,
    "dead/dominating filters, layer-1 spectra, layer-2 aliasing (ZF Fig. 6)",
    lambda res: [res.markdown()], "diagnose.json", ", diagnose.md and diagnose.png")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m deconvis.cli.diagnose_cmd [WEIGHTS] [FLAGS]``: the same as ``deconvis diagnose
    [--weights WEIGHTS] [FLAGS]`` (was ``python -m deconvis.analysis.diagnose``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not args[0].startswith("-"):
        args = ["--weights", args[0]] + args[1:]
    return cli_main(["diagnose"] + args)


if __name__ == "__main__":
    raise SystemExit(main())
