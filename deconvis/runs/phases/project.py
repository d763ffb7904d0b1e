"""Projection: re-forward the winners' images, project every winner with
``DeconvNet.project_window`` and write its two tiles (``tiles/<layer>/...``); under torchrun each
rank takes whole (layer, channel) groups."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from deconvis.io.atomic import write_png
from deconvis.io.images import ImageDataset
from deconvis.render import projection
from deconvis.render import sheets as render
from deconvis.runs import distributed as dist_mod
from deconvis.runs import precision
from deconvis.runs import results as results_mod
from deconvis.runs.distributed import DistInfo
from deconvis.runs.phases.prepare import Context
from deconvis.runs.phases.rundir import tiles_done
from deconvis.runs.results import LayerResult, Results, Winner

log = logging.getLogger("deconvis")

#: during projection, results.json is re-saved at most this often (seconds) so a resume keeps tiles
SAVE_EVERY_S = 30.0
#: outputs of one auto-sized projection call may take this many bytes (DeconvNet sizes the work
#: inside a call by free memory and halves it on out-of-memory; this bounds what it returns)
AUTO_PROJECT_BYTES = {"cuda": 1 << 30}
AUTO_PROJECT_BYTES_DEFAULT = 256 << 20


def _winners(res: Results) -> Dict[Tuple[str, int, int], Tuple[LayerResult, Winner]]:
    """(layer name, channel, rank) -> (its layer, the winner) over all of ``res``."""
    return {(lr.name, u.channel, w.rank): (lr, w) for lr in res.layers for u in lr.units for w in u.winners}


def plan_projection(ctx: Context, res: Results) -> List[render.TileJob]:
    """The winners still to project (all of them after a rule change), in (layer, channel, rank)
    order. Every rank computes the same list before any rank writes a tile."""
    cfg = ctx.cfg
    if res.projection_hash != ctx.projection_hash:
        if res.projection_hash and ctx.info.is_main:
            log.info("projection rule changed (%s -> %s): re-projecting every unit", res.rule, cfg.rule)
        for _, w in _winners(res).values():
            w.box = w.box_clipped = w.tiles = None
        res.projection_hash, res.rule = ctx.projection_hash, cfg.rule
    return [render.TileJob(lr.name, u.channel, w.rank, w.image, w.y, w.x, w.activation)
            for lr in res.layers for u in lr.units for w in u.winners if not tiles_done(ctx.run_dir, w)]


def split_jobs(jobs: List[render.TileJob], info: DistInfo) -> List[render.TileJob]:
    """This rank's share of ``jobs``: whole (layer, channel) groups, dealt round-robin (so every
    rank gets channels of every layer, and the work of deep and shallow layers spreads evenly)."""
    if not info.enabled:
        return list(jobs)
    groups: Dict[Tuple[str, int], List[render.TileJob]] = {}
    for j in jobs:
        groups.setdefault((j.layer, j.channel), []).append(j)
    return [j for key in dist_mod.split_for_rank(list(groups), info) for j in groups[key]]


def project_chunk(ctx: Context) -> int:
    """Units per ``project_window`` call: ``project_batch``, or for 0/None (auto) as many as the
    largest receptive-field window of the mined layers allows within the output budget."""
    if ctx.cfg.project_batch:
        return int(ctx.cfg.project_batch)
    elem = torch.empty((), dtype=ctx.dtype).element_size()
    biggest = 1
    h, w = ctx.preprocess.crop
    for spec in ctx.specs:
        rh, rw = spec.rf_size or spec.input_size  # the tile's box, input pixels
        biggest = max(biggest, 3 * min(rh, h) * min(rw, w) * elem)
    budget = AUTO_PROJECT_BYTES.get(ctx.device.type, AUTO_PROJECT_BYTES_DEFAULT)
    return int(max(16, min(4096, budget // biggest)))


def project_phase(ctx: Context, res: Results, jobs: Optional[List[render.TileJob]] = None,
                  poll: Optional[Callable[[], None]] = None, replay: Optional[Any] = None) -> int:
    """Project ``jobs`` (default: every winner whose tiles are missing, see :func:`plan_projection`),
    writing their tiles and filling their boxes in ``res``; returns how many were projected.
    ``replay`` (a :class:`deconvis.render.projection.Replay`) receives the replay check."""
    cfg, info = ctx.cfg, ctx.info
    if jobs is None:
        jobs = plan_projection(ctx, res)
    if not jobs:
        return 0
    h, w_img = ctx.preprocess.crop
    index = _winners(res)
    log.info("projecting %d units (rule %s)", len(jobs), cfg.rule)
    last_save = [time.monotonic()]

    def sink(job: render.TileJob, rec, img, box) -> None:
        lr, wnr = index[(job.layer, job.channel, job.rank)]
        paths = render.tile_paths(lr.label, job.channel, job.rank)
        write_png(os.path.join(ctx.run_dir, paths["rec"]), rec, durable=False)  # atomic; re-creatable
        write_png(os.path.join(ctx.run_dir, paths["img"]), img, durable=False)
        clipped, _ = render.clip_box(box, h, w_img)
        wnr.box, wnr.box_clipped, wnr.tiles = list(box), list(clipped), paths
        if lr.rf is None:
            lr.rf = [box[1] - box[0], box[3] - box[2]]
        if info.is_main and time.monotonic() - last_save[0] >= SAVE_EVERY_S:  # keep results.json current
            results_mod.save(res, ctx.run_dir)
            last_save[0] = time.monotonic()
        if poll is not None:
            poll()

    return projection.project_jobs(ctx.dn, ImageDataset(ctx.source, ctx.preprocess), jobs, rule=cfg.rule,
                               batch_size=cfg.batch_size, project_batch=project_chunk(ctx), device=ctx.device,
                               dtype=ctx.dtype, sink=sink, progress=cfg.progress and info.is_main,
                               workers=precision.workers(cfg, info), replay=replay)


def projection_updates(res: Results, jobs: List[render.TileJob]) -> Dict[str, Any]:
    """What projecting ``jobs`` filled into ``res`` (boxes, tiles, RF sizes), to send to the other ranks."""
    index = _winners(res)
    units, rf = {}, {}
    for j in jobs:
        lr, w = index[(j.layer, j.channel, j.rank)]
        if w.tiles is not None:
            units[(j.layer, j.channel, j.rank)] = (w.box, w.box_clipped, w.tiles)
        if lr.rf is not None:
            rf[lr.name] = lr.rf
    return {"units": units, "rf": rf}


def apply_projection_updates(res: Results, updates: List[Dict[str, Any]]) -> None:
    """Fill every rank's :func:`projection_updates` into ``res``."""
    index = _winners(res)
    layers = {lr.name: lr for lr in res.layers}
    for upd in updates:
        for key, (box, clipped, tiles) in upd["units"].items():
            w = index[key][1]
            w.box, w.box_clipped, w.tiles = box, clipped, tiles
        for name, rf in upd["rf"].items():
            if layers[name].rf is None:
                layers[name].rf = rf
