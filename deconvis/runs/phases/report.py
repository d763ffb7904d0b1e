"""The report: save ``results.json`` and write ``index.html`` (rank 0 only)."""
from __future__ import annotations

import logging
import os
import time

from typing import Dict, Optional

import numpy as np

from deconvis.io.images import ImageSource
from deconvis.runs import report
from deconvis.runs import unit_pages
from deconvis.runs import results as results_mod
from deconvis.runs.distributed import DistInfo
from deconvis.runs.phases.rundir import REPORT_FILE
from deconvis.runs.results import Results

log = logging.getLogger("deconvis")


def report_phase(res: Results, run_dir: str, info: DistInfo, mark_rendered: bool = True,
                 source: Optional[ImageSource] = None, filters: Optional[Dict[str, np.ndarray]] = None) -> str:
    """Mark ``res`` rendered (unless not ``mark_rendered``: a re-render keeps the status), save it
    and write the unit pages (thumbnails from ``source``; without it only those already on disk)
    (``filters``: layer-1 filters, :func:`~deconvis.runs.unit_pages.first_layer_filters`) and the report on rank 0; returns the report's path."""
    if mark_rendered:
        res.status = "rendered"
    if not info.is_main:
        return os.path.join(run_dir, REPORT_FILE)
    results_mod.save(res, run_dir)
    t = time.perf_counter()
    n = unit_pages.write_unit_pages(res, run_dir, source, filters)
    log.info("wrote %d unit pages in %.2f s", n, time.perf_counter() - t)
    return report.write_report(res, run_dir, unit_pages=True)
