"""Each channel across training snapshots or checkpoints (ZF Fig. 4 for one unit): unit pages,
``units/evolution/<layer>/<channel>.jpg``.

The weights come from the run's ``checkpoints`` (checkpoint files, or the folder a ``deconvis
train`` run wrote, whose ``snapshot_weights/`` holds one checkpoint per snapshot epoch). At each,
the feature-evolution callback of training (:class:`deconvis.training.snapshots.SnapshotCallback`,
the code that draws ZF Fig. 4 per layer) finds every mined channel's strongest activation over the
first ``evolution_images`` images of the run's set and projects it with that checkpoint's weights
and the run's rule; each channel's row of that figure (reconstruction beside the image patch, one
column per checkpoint) is its image, drawn by :func:`deconvis.training.evolution.evolution_figure`.
"""
from __future__ import annotations

import glob
import logging
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import torch

from deconvis.errors import DeconvisError
from deconvis.io.atomic import write_image
from deconvis.io.images import ImageDataset
from deconvis.io.models import load_model
from deconvis.render.sheets import safe_name
from deconvis.runs.results import Results
from deconvis.training.evolution import evolution_figure
from deconvis.training.snapshots import SNAPSHOT_WEIGHTS_DIR, SnapshotCallback

log = logging.getLogger("deconvis")

#: the figures: ``units/evolution/<layer>/<channel>.jpg``, relative to the run folder
EVOLUTION_DIR = "units/evolution"
#: side of a reconstruction / patch tile in the figures, pixels
EVO_TILE = 48


def evolution_path(label: str, channel: int) -> str:
    """The figure of ``channel`` of the layer labelled ``label``, relative to the run folder."""
    return f"{EVOLUTION_DIR}/{safe_name(label)}/{int(channel):04d}.jpg"


def checkpoint_files(entries: Sequence[str], config_dir: Optional[str] = None) -> List[str]:
    """``checkpoints`` entries as checkpoint files, in order: a file is itself; a folder gives its
    ``snapshot_weights/*.pt`` (a ``deconvis train`` output folder) or else its own ``*.pt``, sorted
    by name. Relative paths are tried as given, then next to the config file."""
    out: List[str] = []
    for e in entries:
        path = e
        if not os.path.exists(path) and config_dir and not os.path.isabs(e):
            path = os.path.join(config_dir, e)
        if os.path.isfile(path):
            out.append(path)
        elif os.path.isdir(path):
            sub = os.path.join(path, SNAPSHOT_WEIGHTS_DIR)
            files = sorted(glob.glob(os.path.join(sub if os.path.isdir(sub) else path, "*.pt")))
            if not files:
                raise DeconvisError(f"checkpoints: folder {e!r} holds no *.pt checkpoints (nor {SNAPSHOT_WEIGHTS_DIR}/); "
                                    "train with snapshot_weights on, or list checkpoint files")
            out.extend(files)
        else:
            raise DeconvisError(f"checkpoints: {e!r} does not exist; give checkpoint files or a deconvis train "
                                "output folder")
    return out


def checkpoint_label(path: str) -> str:
    """A column label: ``epoch_005.pt`` -> ``epoch 5``, ``step_000120.pt`` -> ``step 120``, else the file's stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    m = re.fullmatch(r"(epoch|step)_?0*(\d+)", stem)
    return f"{m.group(1)} {m.group(2)}" if m else stem


def probe_images(ctx: Any, n: int) -> tuple:
    """The first ``n`` readable images of the run's set as network input float32 [n', 3, H, W] and
    their global ids."""
    data = ImageDataset(ctx.source, ctx.preprocess)
    xs, ids = [], []
    for i in range(min(n, len(ctx.source))):
        x, gid = data[i]
        if gid < 0:
            continue
        xs.append(x)
        ids.append(gid)
    if not xs:
        raise DeconvisError("checkpoints: none of the first images of the set is readable")
    return torch.stack(xs), ids


def evolution_phase(ctx: Any, res: Results, run_dir: str, config_dir: Optional[str] = None) -> Dict[str, Any]:
    """Follow every mined channel across the run's ``checkpoints``; record per layer in
    ``unit_extras["evolution"]`` the figure paths and, per channel and checkpoint, the strongest
    activation, its image id and position. Returns the record for ``res.unit_extras["evolution"]``."""
    cfg = ctx.cfg
    files = checkpoint_files(cfg.checkpoints, config_dir)
    labels = [checkpoint_label(p) for p in files]
    probe, ids = probe_images(ctx, cfg.evolution_images)
    pp = ctx.preprocess
    layers = [lr.name for lr in res.layers]
    feats = {lr.name: [u.channel for u in lr.units] for lr in res.layers}
    cb: Optional[SnapshotCallback] = None
    for j, path in enumerate(files):
        model = load_model(cfg.model, path, ctx.device).model.to(ctx.dtype)
        if cb is None:
            cb = SnapshotCallback(model, probe.to(ctx.dtype), layers, features_per_layer=feats, select="first",
                                  epochs="all", out_dir=None, rule=cfg.rule, tile_size=EVO_TILE, mean=list(pp.mean),
                                  std=list(pp.std), batch_size=int(cfg.batch_size), resume=False)
        col = cb.snapshot(epoch=j + 1, model=model)
        col.label = labels[j]
        log.info("evolution: %s (%s) in %.1f s", labels[j], path, col.seconds)
    assert cb is not None
    for lr in res.layers:
        ex = lr.unit_extras = dict(lr.unit_extras or {})
        rec = {"file": [], "value": [], "image": [], "y": [], "x": []}
        for ci, u in enumerate(lr.units):
            fig = evolution_figure([c.rec[lr.name][ci:ci + 1].numpy() for c in cb.columns],
                                   [c.patch[lr.name][ci:ci + 1].numpy() for c in cb.columns],
                                   col_labels=labels, row_labels=None, title=None)
            rel = evolution_path(lr.label, u.channel)
            write_image(os.path.join(run_dir, rel), fig, durable=False)
            rec["file"].append(rel)
            rec["value"].append([round(float(c.value[lr.name][ci]), 6) for c in cb.columns])
            rec["image"].append([ids[int(c.units[lr.name][ci, 0])] for c in cb.columns])
            rec["y"].append([int(c.units[lr.name][ci, 2]) for c in cb.columns])
            rec["x"].append([int(c.units[lr.name][ci, 3]) for c in cb.columns])
        ex["evolution"] = rec
    return {"checkpoints": [{"label": lab, "weights": p} for lab, p in zip(labels, files)], "images": len(ids),
            "rule": cfg.rule, "tile": EVO_TILE}
