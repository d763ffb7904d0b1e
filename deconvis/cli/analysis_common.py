"""What the Section 4 analysis subcommands (invariance, correspondence, diagnose) share: their
``run(args)`` (parse, run, print). Their settings and work live in ``deconvis.analysis``
(:class:`deconvis.analysis.common.AnalysisConfig` and the ``*_run`` modules)."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Iterable, Tuple

from deconvis.config import command, parse


def analysis_command(name: str, config_cls: Any, run_config: Callable[[Any], Any], help: str,  # noqa: A002
                     summary: Callable[[Any], Iterable[str]], first_file: str,
                     more_files: str) -> Tuple[Callable[[argparse.Namespace], int], Callable[[Any], Any]]:
    """A subcommand's ``(run, add_parser)``: ``run(args)`` parses and validates the config, runs
    ``run_config(cfg)``, prints the lines of ``summary(result)`` and ``wrote OUT_DIR/<first_file>
    <more_files>``, and returns exit status 0; ``add_parser`` registers ``name`` (see
    :func:`deconvis.config.command`, the config class's docstring as description)."""
    def run(args: argparse.Namespace) -> int:
        cfg = parse(config_cls, args)
        res = run_config(cfg)
        for line in summary(res):
            print(line)
        print(f"wrote {os.path.join(cfg.out_dir, first_file)}{more_files}")
        return 0

    return run, command(name, config_cls, run, help, config_cls.__doc__)
