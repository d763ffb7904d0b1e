"""``deconvis correspondence``: how consistently masking the same part changes the features
across images (ZF 2014 Table 1).

Only parses and prints: the settings are
:class:`deconvis.analysis.correspondence_run.CorrespondenceConfig` and
:func:`deconvis.analysis.correspondence_run.run_correspondence` does the work (outputs listed there).
"""
from __future__ import annotations

from deconvis.analysis.correspondence_run import CorrespondenceConfig, run_correspondence
from deconvis.cli.analysis_common import analysis_command

# run(args) and add_parser(subparsers)
run, add_parser = analysis_command(
    "correspondence", CorrespondenceConfig, run_correspondence,
    "part correspondence: sign-Hamming consistency of feature changes (ZF Table 1)",
    lambda res: [res.markdown()], "correspondence.json", ", correspondence.md and correspondence.png")
