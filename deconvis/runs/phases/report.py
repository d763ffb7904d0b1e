"""The report: save ``results.json`` and write ``index.html`` (rank 0 only)."""
from __future__ import annotations

import os

from deconvis.runs import report
from deconvis.runs import results as results_mod
from deconvis.runs.distributed import DistInfo
from deconvis.runs.phases.rundir import REPORT_FILE
from deconvis.runs.results import Results


def report_phase(res: Results, run_dir: str, info: DistInfo, mark_rendered: bool = True) -> str:
    """Mark ``res`` rendered (unless not ``mark_rendered``: a re-render keeps the status), save it
    and write the report on rank 0; returns the report's path."""
    if mark_rendered:
        res.status = "rendered"
    if not info.is_main:
        return os.path.join(run_dir, REPORT_FILE)
    results_mod.save(res, run_dir)
    return report.write_report(res, run_dir)
