"""What the Section 4 analysis subcommands (invariance, correspondence, diagnose) share: the
settings every one of them has (:class:`AnalysisConfig`), their ``run(args)`` (parse, run,
print) and the torch thread count of ``run_config``."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Iterable, Tuple

from dataclasses import dataclass

from deconvis.runs.configbase import Config, command, option, parse


@dataclass
class AnalysisConfig(Config):
    """The model, its weights, where to write, and where to compute: the first keys of every
    analysis config (a subclass redefines ``out_dir`` to give its own default folder)."""

    model: str = option("zfnet_demo", "torchvision name, module:callable, file.py:callable or zfnet_demo")
    weights: str = option("asset:zfnet_demo.pt", "checkpoint path, asset:NAME, a torchvision weights name or random")
    out_dir: str = option("outputs/analysis", "output folder")
    device: str = option("cpu", "auto, cpu, cuda or cuda:N")
    threads: int = option(0, "torch CPU threads (0: torch's default)")


def apply_threads(threads: int) -> None:
    """Use ``threads`` torch CPU threads (0: leave torch's default)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def analysis_command(name: str, config_cls: Any, run_config: Callable[[Any], Any], help: str,  # noqa: A002
                     summary: Callable[[Any], Iterable[str]], first_file: str,
                     more_files: str) -> Tuple[Callable[[argparse.Namespace], int], Callable[[Any], Any]]:
    """A subcommand's ``(run, add_parser)``: ``run(args)`` parses and validates the config, runs
    ``run_config(cfg)``, prints the lines of ``summary(result)`` and ``wrote OUT_DIR/<first_file>
    <more_files>``, and returns exit status 0; ``add_parser`` registers ``name`` (see
    :func:`deconvis.runs.configbase.command`, the config class's docstring as description)."""
    def run(args: argparse.Namespace) -> int:
        cfg = parse(config_cls, args)
        res = run_config(cfg)
        for line in summary(res):
            print(line)
        print(f"wrote {os.path.join(cfg.out_dir, first_file)}{more_files}")
        return 0

    return run, command(name, config_cls, run, help, config_cls.__doc__)
