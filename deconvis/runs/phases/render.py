"""Rendering: each layer's grid sheets ``layer_<label>_pNNN.jpg`` (``.png`` with ``lossless``, and for
layers whose small tiles the sheets enlarge: :func:`deconvis.render.sheets.sheet_format`) from the
saved sprites, skipping layers whose sheets are current (same winners, tiles and layout)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Callable, Collection, List, Optional

from deconvis.render import sheets as render
from deconvis.runs.config import VisualizeConfig
from deconvis.runs.phases.rundir import tile_files
from deconvis.runs.results import LayerResult, Results

log = logging.getLogger("deconvis")


def sheets_hash(res: Results, lr: LayerResult, cfg: VisualizeConfig) -> str:
    """Identity of a layer's sheets: its winners and tiles, k, and the sheet layout."""
    winners = [(u.channel, u.sprite, [(w.rank, w.image, w.activation, w.tiles is not None) for w in u.winners])
               for u in lr.units]
    data = {"projection": res.projection_hash, "winners": winners, "rf": lr.rf, "k": res.k,
            "render": [cfg.per_sheet, cfg.sheet_columns, cfg.min_tile, cfg.max_tile, sheet_ext(cfg, lr)], "v": 3}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def sheet_ext(cfg: VisualizeConfig, lr: Optional[LayerResult] = None) -> str:
    """The format of ``lr``'s sheets: ``png`` with ``lossless`` or where the sheets enlarge the
    layer's tiles (:func:`deconvis.render.sheets.sheet_format`), else ``jpg``."""
    rf = lr.rf if lr is not None else None
    return render.sheet_format(rf, cfg.min_tile, cfg.max_tile, bool(getattr(cfg, "lossless", False)))


def render_phase(res: Results, run_dir: str, cfg: VisualizeConfig, force: bool = False,
                 layers: Optional[Collection[str]] = None, poll: Optional[Callable[[], None]] = None) -> List[str]:
    """Write each layer's sheets (skipping layers whose sheets are current unless ``force``);
    only the layers named in ``layers`` if given (one rank's share). ``poll`` runs between layers."""
    written: List[str] = []
    n_images = res.images.get("readable", res.images.get("count"))
    for lr in res.layers:
        if layers is not None and lr.name not in layers:
            continue
        if poll is not None:
            poll()
        h = sheets_hash(res, lr, cfg)
        current = lr.sheets_hash == h and lr.sheets and all(os.path.isfile(os.path.join(run_dir, s)) for s in lr.sheets)
        if current and not force:
            continue
        missing = sum(len(u.winners) for u in lr.units if not tile_files(u))
        if missing:
            log.warning("layer %s: %d units have no tiles; they show as empty cells", lr.label, missing)
        sheets = render.render_layer(lr, run_dir, k=res.k, per_sheet=cfg.per_sheet, columns=cfg.sheet_columns,
                                     min_tile=cfg.min_tile, max_tile=cfg.max_tile, n_images=n_images,
                                     ext=sheet_ext(cfg, lr))
        for old in set(lr.sheets) - set(sheets):  # pages of an earlier, longer layout
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, old))
        lr.sheets, lr.sheets_hash = sheets, h
        written.extend(sheets)
    return written
