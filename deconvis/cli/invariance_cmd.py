"""``deconvis invariance``: feature distance and true-class probability under vertical
translation, scale and rotation (ZF 2014 Fig. 5).

Only parses and prints: the settings are :class:`deconvis.analysis.invariance_run.InvarianceConfig`
and :func:`deconvis.analysis.invariance_run.run_invariance` does the work (outputs listed there).
"""
from __future__ import annotations

from typing import List

from deconvis.analysis.invariance import InvarianceResult
from deconvis.analysis.invariance_run import InvarianceConfig, run_invariance
from deconvis.cli.analysis_common import analysis_command


def sweep_lines(res: InvarianceResult) -> List[str]:
    """One line per sweep: the largest relative distance per layer, the smallest true-class probability."""
    lines = []
    for s in res.sweeps:
        worst = {l: float(s.relative[l].max()) for l in res.layers}
        lines.append(f"{s.transform}: max relative distance " + ", ".join(f"{l} {v:.3f}" for l, v in worst.items())
                     + f"; p(true class) min {float(s.probability.min()):.3f}")
    return lines


# run(args) and add_parser(subparsers)
run, add_parser = analysis_command(
    "invariance", InvarianceConfig, run_invariance,
    "feature distance and class probability under translation, scale, rotation (ZF Fig. 5)",
    sweep_lines, "invariance.json", " and invariance.png")
