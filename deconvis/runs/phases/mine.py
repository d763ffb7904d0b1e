"""Mining: stream this rank's shard of the images once and keep the k strongest images of every
channel (:mod:`deconvis.mining`), checkpointed every ``checkpoint_seconds`` (or
``checkpoint_every`` batches) and resumed;
then the merged winners as a :class:`~deconvis.runs.results.Results` (not yet projected)."""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from deconvis import mining
from deconvis.errors import DeconvisError
from deconvis.io.atomic import save_torch
from deconvis.io.images import ImageDataset, Normalized, make_loader
from deconvis.runs import distributed as dist_mod
from deconvis.runs import precision
from deconvis.runs.phases.prepare import Context, autocast
from deconvis.runs.phases.rundir import check_state, load_state, state_blob, state_filename
from deconvis.runs.results import BOTTOM_SUFFIX, ChannelResult, LayerResult, Results, Winner
from deconvis.utils.device import tf32

log = logging.getLogger("deconvis")


def mining_forward(ctx: Context) -> Callable[[torch.Tensor], Dict[str, torch.Tensor]]:
    """``images -> {layer: activation}`` for mining: autocast ``amp``, ``channels_last`` and the
    TF32 policy ``tf32`` (off unless asked)."""
    dn, channels_last = ctx.dn, ctx.cfg.channels_last
    layers = ctx.layers + [n for n in dict.fromkeys(bottom_of(ctx).values()) if n not in ctx.layers]  # + pre-activations

    def forward(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with tf32(ctx.cfg.tf32), autocast(ctx):
            return dn.activations(x, layers)

    return forward


def bottom_of(ctx: Context) -> Dict[str, str]:
    """Mined layer -> the row of its pre-activation, whose minima are its bottom-k
    (:meth:`deconvis.graph.trace.TracedGraph.preactivation`); empty with ``bottom_k: 0``."""
    if not ctx.cfg.bottom_count:
        return {}
    out = {}
    for layer in ctx.layers:
        node = ctx.dn.graph.preactivation(layer)
        if node is not None:
            out[layer] = node
    return out


def new_topk(ctx: Context) -> mining.TopK:
    """The empty mining state of the run: the top-k (or the amp candidate pool, where an fp16
    overflow competes, to be re-ranked in fp32), the bottom-k of the pre-activations, and the
    image set's class labels when it has them."""
    cfg = ctx.cfg
    topk = mining.TopK(ctx.layers, precision.mining_k(cfg), ctx.device, inf_wins=precision.reranks(cfg),
                       bottom_k=cfg.bottom_count, bottom_of=bottom_of(ctx))
    lab = ctx.source.labels()
    if lab is not None:
        topk.set_labels(lab[1], len(lab[0]))
    return topk


def _resume(ctx: Context, path: str, topk: mining.TopK) -> bool:
    """Load this rank's checkpoint into ``topk`` if there is one; whether mining is complete."""
    if not os.path.isfile(path):
        return False
    blob = load_state(path)
    check_state(blob, path, ctx.run_dir, ctx.identity, ctx.info)
    topk.load_state_dict(blob["topk"])
    if blob.get("complete"):
        log.info("mining already complete (%d images), loaded %s", topk.seen, path)
        return True
    n_shard = dist_mod.shard_size(len(ctx.source), ctx.info.rank, ctx.info.world)
    log.info("resuming mining at item %d of %d%s from %s", topk.seen, n_shard,
             f" (this rank's shard of {len(ctx.source)})" if ctx.info.enabled else "", path)
    return False


def mine_phase(ctx: Context, poll: Optional[Callable[[], None]] = None) -> Tuple[mining.TopK, mining.MiningTimes]:
    """Mine this rank's shard of the images (all of them for one process), resuming from this
    rank's checkpoint; returns the rank's complete state and where its time went. ``poll`` runs
    after every batch (to stop early when another rank failed)."""
    cfg, info = ctx.cfg, ctx.info
    path = os.path.join(ctx.run_dir, state_filename(info))
    topk = new_topk(ctx)
    times = mining.MiningTimes()
    if not cfg.fresh and _resume(ctx, path, topk):  # --fresh: never read a checkpoint (rank 0 deleted them;
        return topk, times                          # another node may still see them through its cache)

    def checkpoint(t: mining.TopK) -> None:
        save_torch(state_blob(ctx.identity, info, t.state_dict(), complete=False), path)

    def on_batch(n: int) -> None:
        if cfg.profile:
            ld, fw, up = times.per_batch[-1]
            log.info("batch %d: load %.1f ms, forward %.1f ms, top-k %.1f ms", n, 1e3 * ld, 1e3 * fw, 1e3 * up)
        if poll is not None:
            poll()

    sampler = dist_mod.ShardSampler(len(ctx.source), info.rank, info.world, start=topk.seen)
    workers = precision.workers(cfg, info)
    # uint8 batches, normalised whole on the device (deconvis.io.images.Normalized)
    loader = make_loader(ImageDataset(ctx.source, ctx.preprocess, displayed=True), cfg.batch_size, workers,
                         pin_memory=ctx.device.type == "cuda", sampler=sampler,
                         prefetch_factor=cfg.prefetch_factor, persistent_workers=workers > 0)
    # no worker processes: a thread decodes the next batches meanwhile (deconvis.io.prefetch)
    batches = Normalized(loader, ctx.preprocess, ctx.device, read_ahead=workers == 0)
    model = ctx.loaded.model
    n_skipped_before = len(topk.skipped)
    try:
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        mining.mine(mining_forward(ctx), batches, topk, channels=cfg.channels, dtype=ctx.dtype,
                    checkpoint_every=cfg.checkpoint_every, on_checkpoint=checkpoint,
                    checkpoint_seconds=cfg.checkpoint_seconds,
                    total=dist_mod.shard_size(len(ctx.source), info.rank, info.world),
                    progress=cfg.progress and info.is_main, times=times, profile=cfg.profile, on_batch=on_batch,
                    batch_size=cfg.batch_size)
    finally:
        if cfg.channels_last:  # projections run on the usual layout
            model.to(memory_format=torch.contiguous_format)
        del batches, loader  # ends persistent workers
    for i in topk.skipped[n_skipped_before:]:  # a refusal is re-read from the header (cheap, no decode)
        why = ctx.source.refusal(i)
        log.warning("skipped unreadable image %d: %s%s", i, ctx.source.path(i), f" ({why})" if why else "")
    save_torch(state_blob(ctx.identity, info, topk.state_dict(), complete=True), path)
    return topk, times


def check_mined(ctx: Context, topk: mining.TopK) -> None:
    """The merged top-k covers the image set and found readable images (warnings on rank 0 when
    some were unreadable or fewer than k)."""
    n_ok = topk.seen - len(topk.skipped)
    if topk.skipped and ctx.info.is_main:
        log.warning("%d unreadable images skipped (listed above)", len(topk.skipped))
    if n_ok == 0:
        raise DeconvisError(f"none of the {len(ctx.source)} images of {ctx.source.spec!r} could be read")
    if n_ok < ctx.cfg.k and ctx.info.is_main:
        log.warning("only %d readable images for k=%d: channels get fewer than k winners", n_ok, ctx.cfg.k)
    if topk.seen != len(ctx.source):
        raise DeconvisError(f"mining covered {topk.seen} items of {len(ctx.source)}: the checkpoints do not "
                            "match the image set; pass --fresh")


def _winner_rows(ctx: Context, w: Dict[str, torch.Tensor], used: Dict[int, Dict[str, str]],
                 k: Optional[int] = None) -> List[ChannelResult]:
    """Per channel, the valid entries of a winners table (:meth:`mining.TopK.winners`) among its
    first ``k`` ranks (all when None; a mining pool can hold more than the run's k) as
    :class:`Winner` records in rank order; ``used`` collects the images' names and paths."""
    vals, imgs, ys, xs, valid = (w[f].tolist() for f in ("values", "images", "ys", "xs", "valid"))
    units = []
    for c in range(len(vals)):
        winners = []
        for r in range(len(vals[c]) if k is None else k):
            if not valid[c][r]:
                continue
            i = int(imgs[c][r])
            if i not in used:
                used[i] = {"name": ctx.source.name(i), "path": ctx.source.path(i)}
            winners.append(Winner(rank=r, image=i, source=used[i]["name"], activation=float(vals[c][r]),
                                  y=int(ys[c][r]), x=int(xs[c][r])))
        units.append(ChannelResult(channel=c, winners=winners))
    return units


def _bottom_result(ctx: Context, topk: mining.TopK, spec, used: Dict[int, Dict[str, str]]) -> Optional[LayerResult]:
    """The bottom-k of ``spec``'s layer as a :class:`LayerResult` of its pre-activation row (its
    winners' ``activation`` the minima, negative first), or None when the layer has none."""
    w = topk.bottom_winners(spec.name)
    if w is None:
        return None
    node = topk.bottom_of[spec.name]
    units = _winner_rows(ctx, w, used)
    return LayerResult(name=node, label=f"{spec.label}{BOTTOM_SUFFIX}", channels=len(units),
                       channels_total=spec.channels_total, map_size=list(spec.map_size), units=units)


def build_results(ctx: Context, topk: mining.TopK) -> Results:
    """Winners of every layer/channel as a :class:`Results` (not yet projected)."""
    cfg = ctx.cfg
    used: Dict[int, Dict[str, str]] = {}
    layers: List[LayerResult] = []
    for spec in ctx.specs:
        units = _winner_rows(ctx, topk.winners(spec.name), used, k=cfg.k)
        st = topk.stats.get(spec.name)
        cm = topk.classes.get(spec.name)
        layers.append(LayerResult(name=spec.name, label=spec.label, channels=len(units),
                                  channels_total=spec.channels_total, map_size=list(spec.map_size), units=units,
                                  unit_stats=st.summary() if st is not None else None,
                                  class_means=cm.summary() if cm is not None else None,
                                  bottom=_bottom_result(ctx, topk, spec, used)))
    skipped = [{"id": i, "path": ctx.source.path(i)} for i in topk.skipped]
    lab = ctx.source.labels() if topk.classes else None
    ident = ctx.identity.fields
    return Results(
        config=cfg.to_dict(), mining_hash=ctx.mining_hash, mining_identity=dict(ident), projection_hash="",
        model={"spec": cfg.model, "weights": cfg.weights, "weights_id": ident["weights_id"]},
        preprocess=ctx.preprocess, input_size=list(ctx.preprocess.crop), rule=cfg.rule, k=cfg.k,
        images={"spec": ident["images"], "count": len(ctx.source), "readable": len(ctx.source) - len(skipped),
                "skipped": skipped, "items": {str(i): used[i] for i in sorted(used)},
                **({"classes": lab[0]} if lab is not None else {})},
        layers=layers, status="mined")
