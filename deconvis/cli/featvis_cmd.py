"""``deconvis featvis``: feature visualisation by optimisation (Olah et al. 2017).

Only parses and prints: the settings are :class:`deconvis.featvis.run.FeatvisConfig` and
:func:`deconvis.featvis.run.run_featvis` does the work. Outputs in ``out_dir`` (default
``outputs/featvis-<model>-<layer>/``): ``channel-NNNN.png`` per channel, ``sheet.png`` and
``featvis.json``.
"""
from __future__ import annotations

from typing import List

from deconvis.cli.analysis_common import analysis_command
from deconvis.featvis.optimize import FeatVis
from deconvis.featvis.run import FeatvisConfig, run_featvis


def summary(res: FeatVis) -> List[str]:
    """One line: the layer, how many channels at what size, the time, the median objective."""
    per = res.seconds / max(1, len(res.channels))
    return [f"{res.label} ({res.layer}): {len(res.channels)} channels at {res.size[0]}x{res.size[1]} px, "
            f"{res.settings['steps']} steps, {res.seconds:.1f} s ({per:.2f} s per channel); "
            f"objective median {float(res.objective.median()):.3g}"]


# run(args) and add_parser(subparsers)
run, add_parser = analysis_command(
    "featvis", FeatvisConfig, run_featvis,
    "feature visualisation: images that maximise channels of a layer (Olah et al. 2017)",
    summary, "sheet.png", ", featvis.json and channel-NNNN.png")
