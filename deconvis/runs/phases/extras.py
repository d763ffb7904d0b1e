"""The unit pages' optional extras, computed after rendering on rank 0 (:mod:`deconvis.runs.unit_erf`,
:mod:`deconvis.runs.unit_evolution`, :mod:`deconvis.runs.unit_featvis`): each part runs when its
setting asks for it and its record in ``results.json`` (``unit_extras``) is not already current
(same winners and settings, files on disk); a part switched off is dropped from the results."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from deconvis.runs.results import Results
from deconvis.runs.unit_erf import erf_phase
from deconvis.runs.unit_evolution import checkpoint_files, evolution_phase
from deconvis.runs.unit_featvis import featvis_phase

log = logging.getLogger("deconvis")

#: per part, the layer-level keys it writes into ``LayerResult.unit_extras``
LAYER_KEYS = {"erf": ("erf", "erf_mass95"), "evolution": ("evolution",), "featvis": ("featvis", "featvis_objective")}


def _key(res: Results, settings: Any) -> str:
    data = json.dumps({"mining": res.mining_hash, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _files(res: Results, part: str) -> List[Optional[str]]:
    out: List[Optional[str]] = []
    for lr in res.layers:
        v = (lr.unit_extras or {}).get(part)
        out.extend(v.get("file", []) if isinstance(v, dict) else (v or []))
    return out


def _current(res: Results, run_dir: str, part: str, key: str) -> bool:
    if (res.unit_extras.get(part) or {}).get("key") != key:
        return False
    if any(part not in (lr.unit_extras or {}) for lr in res.layers):
        return False
    return all(f is None or os.path.isfile(os.path.join(run_dir, f)) for f in _files(res, part))


def _drop(res: Results, part: str) -> None:
    res.unit_extras.pop(part, None)
    for lr in res.layers:
        if lr.unit_extras:
            for k in LAYER_KEYS[part]:
                lr.unit_extras.pop(k, None)
            if not lr.unit_extras:
                lr.unit_extras = None


def check_extras(cfg: Any, config_dir: Optional[str] = None) -> None:
    """Checks that need files, before any mining: every ``checkpoints`` entry exists (DeconvisError
    otherwise)."""
    if cfg.checkpoints:
        checkpoint_files(cfg.checkpoints, config_dir)


def extras_phase(ctx: Any, res: Results, run_dir: str, config_dir: Optional[str] = None) -> Dict[str, float]:
    """Compute the extras the run's settings ask for (``unit_erf``, ``checkpoints``,
    ``featvis_steps``); returns the seconds each part took (0 when current)."""
    cfg = ctx.cfg
    parts: List[Tuple[str, bool, Any, Callable[[], Dict[str, Any]]]] = [
        ("erf", bool(cfg.unit_erf), "v1", lambda: erf_phase(ctx, res, run_dir)),
        ("evolution", bool(cfg.checkpoints),
         lambda: [[p, os.path.getmtime(p)] for p in checkpoint_files(cfg.checkpoints, config_dir)]
         + [cfg.evolution_images, cfg.rule],
         lambda: evolution_phase(ctx, res, run_dir, config_dir)),
        ("featvis", cfg.featvis_steps > 0, [cfg.featvis_steps, cfg.seed], lambda: featvis_phase(ctx, res, run_dir)),
    ]
    seconds: Dict[str, float] = {}
    for part, wanted, settings, compute in parts:
        if not wanted:
            _drop(res, part)
            continue
        key = _key(res, settings() if callable(settings) else settings)
        if _current(res, run_dir, part, key):
            seconds[part] = 0.0
            continue
        _drop(res, part)
        t = time.perf_counter()
        record = compute()
        seconds[part] = time.perf_counter() - t
        res.unit_extras[part] = {**record, "key": key, "seconds": round(seconds[part], 3)}
        n = sum(len(lr.units) for lr in res.layers)
        log.info("unit pages: %s for %d channels in %.2f s (%.1f ms per channel)", part, n, seconds[part],
                 1000 * seconds[part] / max(n, 1))
    return seconds
