"""The projection phase's checks in a ``visualize`` run: the replay check's verdict, and tiles a
rank must see before it renders.

* Replay (:class:`deconvis.render.projection.Replay`): every rank counts how many re-forwarded
  winners disagree with their mined activation; the counts add up over ranks and over resumed
  runs in ``results.json`` (``stats.replay``), are logged, and fail the run when they exceed
  ``replay_max_mismatch`` (a resumed run with the same tiles fails again: the tiles stay suspect
  until ``--fresh``).
* Tiles: ``results.json`` lists a tile only once some rank wrote it; a rank whose view of a shared
  filesystem lags (NFS attribute caches) waits for it (:func:`wait_for_tiles`) rather than render an
  empty cell, and a tile still missing after ``timeout_s`` is an error naming it.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Collection, Dict, Iterable, List, Optional

from deconvis.errors import DeconvisError
from deconvis.runs.phases.rundir import tile_files
from deconvis.runs.results import finite_json
from deconvis.render.projection import Replay  # noqa: F401 - re-exported for the pipeline

log = logging.getLogger("deconvis")

#: how long a rank waits for a tile another rank listed (seconds): above typical NFS cache times
TILE_WAIT_S = 120.0


def new_replay(res: Any, rtol: float) -> Replay:
    """An empty :class:`Replay` for ``res`` (a ``Results``): tolerance ``rtol`` relative to each
    layer's strongest mined activation at least."""
    scale = {lr.name: max([abs(w.activation) for u in lr.units for w in u.winners] or [0.0]) for lr in res.layers}
    return Replay(rtol=rtol, scale=scale)


def add_replay(stats: Dict[str, Any], parts: Iterable[Replay], rtol: float) -> Dict[str, Any]:
    """Fold this run's replay counts (one :class:`Replay` per rank) into ``stats["replay"]``
    (cumulative over resumed runs); returns that entry."""
    total = Replay(rtol=rtol)
    for p in parts:
        total.merge(p)
    old = stats.get("replay") or {}
    entry = {"rtol": rtol, "checked": int(old.get("checked", 0)) + total.checked,
             "mismatches": int(old.get("mismatches", 0)) + total.mismatches,
             "worst_relative": max(float(old.get("worst_relative") or 0.0), total.worst),
             "examples": (list(old.get("examples", [])) + [list(e) for e in total.examples])[:5]}
    stats["replay"] = entry = finite_json(entry)  # never a non-finite number in JSON (a NaN recomputed)
    return entry


def replay_verdict(entry: Dict[str, Any], max_mismatch: Optional[int], is_main: bool = True) -> None:
    """Log the replay counts; a :class:`DeconvisError` when they exceed ``max_mismatch`` (None:
    never)."""
    n, checked = int(entry["mismatches"]), int(entry["checked"])
    if n and is_main:
        ex = "; ".join(f"{layer} channel {c} image {i}: mined {a!r}, now {b!r}" for layer, c, i, a, b in entry["examples"][:3])
        log.warning("replay check: %d of %d projected winners differ from their mined activation (relative "
                    "tolerance %g; e.g. %s)", n, checked, entry["rtol"], ex)
    elif checked and is_main:
        log.info("replay check: %d projected winners match their mined activation", checked)
    if max_mismatch is not None and n > max_mismatch:
        raise DeconvisError(f"replay check: {n} of {checked} projected winners differ from their mined activation "
                            f"(more than replay_max_mismatch={max_mismatch}): the model or the image set changed "
                            "since mining; re-run with --fresh (see run.log for examples)")


def wait_for_tiles(run_dir: str, layers: Iterable[Any], names: Optional[Collection[str]] = None,
                   timeout_s: float = TILE_WAIT_S, poll_s: float = 0.5,
                   exists: Callable[[str], bool] = os.path.isfile, now: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> None:
    """Wait until every tile the ``layers`` (``LayerResult``; only those in ``names`` if given) list
    exists under ``run_dir``; a :class:`DeconvisError` naming the first missing one after ``timeout_s``."""
    missing: List[str] = [os.path.join(run_dir, p) for lr in layers if names is None or lr.name in names
                          for u in lr.units for p in tile_files(u)]
    start = now()
    while True:
        missing = [p for p in missing if not exists(p)]
        if not missing:
            return
        if now() - start >= timeout_s:
            raise DeconvisError(f"{len(missing)} tile(s) listed in results.json are missing after {timeout_s:g} s, "
                                f"e.g. {missing[0]}: another rank wrote them to a folder this rank does not see "
                                "(is --out on a shared filesystem?) or they were deleted; re-run to re-project them")
        sleep(poll_s)
