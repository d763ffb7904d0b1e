"""The ZF Fig. 2 pipeline: mine the top-k -> project them -> render sheets -> write the report.

``run(cfg)`` does all four phases into ``<out>/<run>/``:

1. **mine** -- stream the image set once through ``DeconvNet.activations`` (under
   ``torch.inference_mode``, optionally autocast ``amp`` and ``channels_last``) and keep the k
   strongest images per channel (:mod:`deconvis.mining`); checkpointed every
   ``checkpoint_every`` batches to ``mining_state.pt`` and resumed from it. Where the time went
   (loading/decoding, forward, top-k update) is logged and kept in ``results.json`` stats;
2. **project** -- re-forward the winners' images and project every winner with
   ``DeconvNet.project_window`` (batches sized by free memory unless ``project_batch`` is set);
   writes one sprite per channel (``tiles/<layer>/c<channel>.<png|jpg>``, on a background thread);
3. **render** -- compose per-layer sheets ``layer_<label>_pNNN.jpg`` (``.png`` with ``lossless``) from the sprites
   (in a one-process run the projection's writer thread has composed them already, as the
   channels completed, and this finds them current);
   then the Section 4 analyses of ``analyses`` (rank 0; :mod:`deconvis.runs.phases.analyses`);
4. **report** -- ``index.html`` to browse it all.

Many processes (``torchrun --nproc_per_node=N [--nnodes ...] -m deconvis visualize ...``): each
rank mines its shard of the images (:class:`deconvis.runs.distributed.ShardSampler`) with its own
checkpoint ``mining_state.rank{r}-of{w}.pt``; the ranks' top-k merge exactly
(:func:`deconvis.runs.distributed.gather_topk`: the winners equal a one-process run's, given the same
activations -- a CPU forward's last float bits depend on its thread count); projection is
split over (layer, channel) and rendering over layers, each rank writing its own tiles and
sheets; rank 0 writes ``results.json`` and the report after the others are done. ``--out`` must
be a folder every rank sees (a shared filesystem across nodes): this is checked at the start.
Every phase runs inside :func:`deconvis.runs.distributed.phase`, so a failure on one rank ends every
rank with the same error, within about a second plus one batch; a rank that crashed or hangs is
given up on after ``dist_timeout`` seconds without progress (work rank 0 does alone -- clearing,
planning, the analyses, the report -- runs under a heartbeat, see
:func:`deconvis.runs.distributed.heartbeat`). Rank 0 decides whether the run resumes and sends
the results it loaded (:func:`deconvis.runs.ranks.resume_decision`). Each rank logs to its own
file (``run.log`` for rank 0, ``run.rank{r}.log``). Only rank 0 shows progress bars.

Resuming: everything is written atomically and a restarted run with the same config skips what
is done -- a finished mining (``results.json``), channels whose sprite is on disk (every rank's
``projection.rank<r>.json`` lists them while projecting), sheets whose inputs did not change. A run folder holding a run with a different mining configuration is an error (pass
``fresh`` to discard it); so is a mining checkpoint written by a different number of processes
(restart with that number, or ``fresh``). Each rank resumes from its own checkpoint at the item
of its shard where it stopped, so nothing is counted twice. ``render_only`` re-renders sheets and
the report from ``results.json`` and the saved tiles without loading the model or the images.

This module is the orchestrator only: each phase is a module of :mod:`deconvis.runs.phases`, and
what the ranks exchange is :mod:`deconvis.runs.ranks`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from deconvis.errors import DeconvisError
from deconvis.io.atomic import ensure_writable_dir
from deconvis.io.models import resolve_weights
from deconvis import mining
from deconvis.runs import lock as run_lock
from deconvis.runs import distributed as dist_mod
from deconvis.runs import precision
from deconvis.runs import projection as projection_mod
from deconvis.runs import ranks
from deconvis.runs import results as results_mod
from deconvis.runs.config import VisualizeConfig
from deconvis.runs.distributed import DistInfo
from deconvis.runs.phases import bottom
from deconvis.runs.phases.analyses import analyses_phase, check_analyses
from deconvis.runs.phases.extras import check_extras, extras_phase
from deconvis.runs.phases.mine import build_results, check_mined, mine_phase, mining_forward
from deconvis.runs.phases.prepare import Context, amp_dtype, prepare
from deconvis.runs.phases.project import (plan_projection, project_chunk, project_phase, read_progress,
                                          remove_progress, split_jobs)
from deconvis.runs.phases.render import render_phase
from deconvis.runs.phases.report import report_phase
from deconvis.runs.phases.rundir import (REPORT_FILE, STATE_FILE, check_state_world, clear_run,
                                         channel_done, load_results, run_log, state_filename)
from deconvis.runs.results import Results
from deconvis.runs.unit_pages import first_layer_filters
from deconvis.utils.device import resolve_device, tf32

log = logging.getLogger("deconvis")

#: the run (``run``, ``Outcome``) and, for tools and benchmarks, the phases it is made of
__all__ = ["Outcome", "run", "Context", "prepare", "resolve_weights", "amp_dtype", "mine_phase", "mining_forward",
           "build_results", "check_mined", "plan_projection", "split_jobs", "project_chunk", "project_phase",
           "render_phase", "analyses_phase", "report_phase", "state_filename", "STATE_FILE", "REPORT_FILE"]


@dataclass
class Outcome:
    """What a run did: where, over how many images, and how long each phase took (seconds)."""

    run_dir: str
    results: Results
    n_images: int
    mined: bool = False
    projected: int = 0
    sheets: List[str] = field(default_factory=list)
    report: str = ""
    seconds: Dict[str, float] = field(default_factory=dict)
    mining: Optional[mining.MiningTimes] = None  # this rank's mining time split (None: not mined)
    rank: int = 0
    world: int = 1


def run(cfg: VisualizeConfig, config_dir: Optional[str] = None) -> Outcome:
    """Run (or resume, or re-render) the top-k visualisation described by ``cfg``.

    Under ``torchrun`` (or with a process group set up by the caller) every process calls this
    with the same ``cfg``; each returns an :class:`Outcome` with the same results, and rank 0
    writes ``results.json`` and the report."""
    cfg.checked()
    run_dir = os.path.join(cfg.out, cfg.run)
    if cfg.render_only and not os.path.isfile(os.path.join(run_dir, results_mod.FILENAME)):
        raise DeconvisError(f"--render-only: {os.path.join(run_dir, results_mod.FILENAME)} does not exist; "
                            "run without --render-only first (check --out and --run)")
    ensure_writable_dir(run_dir, "run folder")
    if cfg.render_only:  # one process does it: no model, no images, nothing to share
        rank = ranks.env_rank()
        if rank != 0:
            return Outcome(run_dir=run_dir, results=results_mod.load(run_dir), n_images=0, rank=rank)
        with run_log(run_dir), run_lock.hold(run_dir):
            log.info("visualize: run %s -> %s", cfg.run, os.path.abspath(run_dir))
            return _render_only(cfg, run_dir)
    with dist_mod.session(resolve_device(cfg.device), cfg.dist_timeout) as info:
        with run_log(run_dir, info), run_lock.hold(run_dir, info), tf32(False):  # full fp32 unless mining allows TF32
            return _run(cfg, run_dir, config_dir, info)


def _setup(cfg: VisualizeConfig, run_dir: str, config_dir: Optional[str], info: DistInfo):
    """Phases setup + prepare: (context, the results of an earlier run to continue, or None)."""
    with dist_mod.phase(info, "setup", solo=True):
        if cfg.fresh and info.is_main:
            log.info("--fresh: discarding earlier results in %s", run_dir)
            clear_run(run_dir)
        token = ranks.share_token(run_dir, info)
    token = ranks.exchange_token(token, info)
    res = None
    with dist_mod.phase(info, "prepare"):
        ranks.check_shared(run_dir, token, info)
        ctx = prepare(cfg, run_dir, config_dir, info)
        check_analyses(cfg, config_dir)
        check_extras(cfg, config_dir)
        if info.is_main:  # rank 0 decides whether to resume, from its view of the folder
            res = load_results(run_dir, ctx.identity)
            if res is None:
                check_state_world(run_dir, info)
    res = ranks.resume_decision(res, info)
    if res is not None:
        res.config = cfg.to_dict()
    ranks.check_same_run(ctx, res)
    return ctx, res


def _mine(ctx: Context, poll, seconds: Dict[str, float]):
    """Phase mine (+ merge over ranks): (results, this rank's time split)."""
    info, t = ctx.info, time.perf_counter()
    with dist_mod.phase(info, "mining"):
        topk, times = mine_phase(ctx, poll=poll)
    secs = time.perf_counter() - t
    log.info("mining time split (%d images, %.1f s): %s", times.images, secs, times.summary())
    rank_stats = {"rank": info.rank, "images": topk.seen, "seconds": round(secs, 3), "split": times.to_dict()}
    topk, all_stats = ranks.merge_mining(topk, rank_stats, info)
    doubt = None
    if precision.reranks(ctx.cfg):  # amp: the fp32 winners among each channel's candidate pool
        with dist_mod.phase(info, "fp32 re-rank"):
            part = precision.rerank_part(ctx, topk, poll)
        topk, doubt = precision.rerank_finish(ctx, dist_mod.gather_topk(part, info), topk)
    seconds["mine"] = time.perf_counter() - t
    with dist_mod.phase(info, "results", solo=True):
        check_mined(ctx, topk)
        ranks.main_log(info, "mined %d images in %.1f s (%.1f images/s)%s", topk.seen, seconds["mine"],
                       topk.seen / max(seconds["mine"], 1e-9), f" on {info.world} processes" if info.enabled else "")
        res = build_results(ctx, topk)
        res.stats = {"mining_seconds": round(seconds["mine"], 3), "images": topk.seen, "world": info.world,
                     "mining_split": times.to_dict(), "precision": precision.record(ctx, doubt),
                     "nonfinite": precision.report_nonfinite(ctx, topk)}
        if info.enabled:
            res.stats["ranks"] = all_stats
        if info.is_main:
            results_mod.save(res, ctx.run_dir)
    return res, times


def _project(ctx: Context, res: Results, poll) -> int:
    """Phase project (the top-k, then the bottom-k: :mod:`deconvis.runs.phases.bottom`), split over
    ranks; returns how many units all ranks projected."""
    info = ctx.info
    low = bottom.shadow(res)  # before the top's plan: it sees the same projection hash as res
    with dist_mod.phase(info, "projection plan", solo=True):  # rank 0 plans from its view of the folder; every rank takes it
        progress = read_progress(ctx.run_dir, ctx.projection_hash) if info.is_main else []  # every rank's finished channels
        jobs = plan_projection(ctx, res, progress) if info.is_main else []
        progress_b = read_progress(ctx.run_dir, ctx.projection_hash, bottom.PREFIX) if info.is_main and low else []
        jobs_b = bottom.plan(ctx, low, progress_b) if info.is_main else []
    progress, jobs, progress_b, jobs_b = dist_mod.from_main((progress, jobs, progress_b, jobs_b), info,
                                                            "the projection plan")
    if not info.is_main:
        plan_projection(ctx, res, progress)  # the same reset and restored channels as on rank 0 (its job list is unused)
        bottom.plan(ctx, low, progress_b)
    mine, mine_b = split_jobs(jobs, info), split_jobs(jobs_b, info)
    replay = projection_mod.new_replay(res, precision.replay_rtol(ctx))
    replay_b = projection_mod.new_replay(low, precision.bottom_replay_rtol(ctx)) if low is not None else None
    if jobs and info.enabled:
        ranks.main_log(info, "projecting %d units (rule %s) on %d processes", len(jobs), ctx.cfg.rule, info.world)
    # one process: the top-k's last sprites and sheets are written while the bottom-k projects
    finish: Optional[List[Callable[[], None]]] = [] if not info.enabled and mine_b else None
    try:
        with dist_mod.phase(info, "projection"):
            n = project_phase(ctx, res, mine, poll=poll, replay=replay, defer=finish) if mine else 0
        if jobs_b:
            ranks.main_log(info, "projecting the bottom-k: %d units", len(jobs_b))
        with dist_mod.phase(info, "bottom-k projection"):
            n_b = bottom.project(ctx, low, mine_b, poll=poll, replay=replay_b)
    except BaseException:
        for f in finish or []:  # the top-k's progress is saved; the error to report is the one above
            with contextlib.suppress(Exception):
                f()
        raise
    for f in finish or []:
        f()
    if replay_b is not None:
        replay.merge(replay_b)
    projection_mod.add_replay(res.stats, dist_mod.all_gather_objects(replay, info, "the replay check"), replay.rtol)
    total = ranks.merge_projection(res, mine, n, info)
    return total + (ranks.merge_projection(low, mine_b, n_b, info) if low is not None else 0)


def _run(cfg: VisualizeConfig, run_dir: str, config_dir: Optional[str], info: DistInfo) -> Outcome:
    poll = dist_mod.failure_watch(info)
    ranks.main_log(info, "visualize: run %s -> %s%s", cfg.run, os.path.abspath(run_dir),
                   f" on {info.world} processes" if info.enabled else "")
    t0 = time.perf_counter()
    ctx, res = _setup(cfg, run_dir, config_dir, info)
    seconds: Dict[str, float] = {"prepare": time.perf_counter() - t0}
    ranks.main_log(info, "model %s (weights %s) on %s; %d layers: %s; %d images from %s; input %dx%d%s",
                   cfg.model, cfg.weights, ctx.device, len(ctx.specs), ", ".join(s.label for s in ctx.specs),
                   len(ctx.source), ctx.source.spec, *ctx.preprocess.crop,
                   f"; amp {cfg.amp}" if cfg.amp != "none" else "")
    times: Optional[mining.MiningTimes] = None
    mined = res is None
    if res is None:
        res, times = _mine(ctx, poll, seconds)

    t = time.perf_counter()
    n_proj = _project(ctx, res, poll)
    seconds["project"] = time.perf_counter() - t
    res.status = "projected"
    with dist_mod.phase(info, "projection save", solo=True):
        if n_proj:
            ranks.main_log(info, "projected %d units in %.1f s", n_proj, seconds["project"])
        if info.is_main:
            results_mod.save(res, run_dir)
            remove_progress(run_dir)  # results.json lists every rank's channels now
    projection_mod.replay_verdict(res.stats["replay"], cfg.replay_max_mismatch, info.is_main)  # alike on every rank

    t = time.perf_counter()
    my_layers = dist_mod.split_for_rank([lr.name for lr in res.layers], info)
    with dist_mod.phase(info, "rendering"):
        if info.enabled:  # tiles other ranks listed: wait until this rank sees them, never render a blank
            projection_mod.wait_for_tiles(run_dir, res.layers, set(my_layers))
        render_phase(res, run_dir, cfg, layers=set(my_layers), poll=poll)
    ranks.merge_sheets(res, my_layers, info)
    t_an = time.perf_counter()
    with dist_mod.phase(info, "analyses", solo=True):  # rank 0; the others wait (--analyses)
        if info.is_main:
            analyses_phase(ctx, res, config_dir, poll=poll)
    t_an = time.perf_counter() - t_an
    t_ex = time.perf_counter()
    with dist_mod.phase(info, "unit extras", solo=True):  # rank 0: RF + ERF, checkpoints, featvis of the unit pages
        if info.is_main:
            extras_phase(ctx, res, run_dir, config_dir)
    seconds["unit_extras"] = time.perf_counter() - t_ex
    with dist_mod.phase(info, "report", solo=True):
        report_path = report_phase(res, run_dir, info, source=ctx.source,
                                   filters=first_layer_filters(ctx.loaded.model, ctx.specs))
    seconds["render"] = time.perf_counter() - t - t_an - seconds["unit_extras"]
    if cfg.analyses:
        seconds["analyses"] = t_an
    ranks.main_log(info, "wrote %d sheets and %s in %.1f s", sum(len(lr.sheets) for lr in res.layers), report_path,
                   seconds["render"])
    return Outcome(run_dir=run_dir, results=res, n_images=int(res.images.get("count", 0)), mined=mined,
                   projected=n_proj, sheets=[s for lr in res.layers for s in lr.sheets], report=report_path,
                   seconds=seconds, mining=times, rank=info.rank, world=info.world)


def _render_only(cfg: VisualizeConfig, run_dir: str) -> Outcome:
    t = time.perf_counter()
    res = results_mod.load(run_dir)
    missing = sum(len(u.winners) for lr in res.layers for u in lr.units if not channel_done(run_dir, u))
    if missing:
        log.warning("%d units have no saved tiles (the run was interrupted before projecting them): they show as "
                    "empty cells; run without --render-only to finish", missing)
    render_phase(res, run_dir, cfg, force=True)
    report_path = report_phase(res, run_dir, DistInfo(), mark_rendered=False)
    secs = time.perf_counter() - t
    log.info("re-rendered %s in %.1f s", run_dir, secs)
    return Outcome(run_dir=run_dir, results=res, n_images=int(res.images.get("count", 0)),
                   sheets=[s for lr in res.layers for s in lr.sheets], report=report_path,
                   seconds={"render": secs})
