"""The numeric precision of a ``visualize`` run: what it adds to the run identity, the fp32
re-rank of an autocast candidate pool, and the record of each number's precision.

* Identity: a checkpoint mined on a GPU (other kernels, optionally TF32) is not resumed on the CPU
  or the reverse; ``amp`` and the pool size decide the candidates; ``tf32`` the mining math.
* Re-rank (:mod:`deconvis.mining.rerank`): under ``--amp`` the mining keeps ``k x amp_pool``
  candidates per channel; after the ranks' pools merge, the distinct candidate images (split over
  the ranks) are forwarded again in full precision, TF32 off, and the k best among each channel's
  candidates win. Winners, positions and activations are then full-precision values.
* ``results.json`` ``stats.precision`` says which precision each number has.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from deconvis.io.images import ImageDataset, Normalized, make_loader
from deconvis.mining import TopK, mine
from deconvis.mining.nonfinite import nonfinite_messages, nonfinite_summary
from deconvis.mining.rerank import AMP_RTOL, PoolTopK, candidate_images, finish, pool_size, uncertain_channels
from deconvis.runs import distributed as dist_mod
from deconvis.utils.device import default_workers, tf32

log = logging.getLogger("deconvis")

#: replay tolerance (relative) when mining and projection computed in the same precision: equal up
#: to summation order (kernels differ with the batch size: cuDNN/oneDNN pick them by shape)
SAME_PRECISION_RTOL = 1e-4
TF32_RTOL = 1e-2


def _labels(ctx: Any) -> Dict[str, str]:
    """Step name -> display label of the run's layers."""
    return {s.name: s.label for s in ctx.specs}


def identity_extra(cfg: Any, device: torch.device) -> Dict[str, Any]:
    """Keys the run identity gains beyond the config's mining keys: the device type (not for the
    CPU, so CPU runs keep their hash), ``tf32`` when allowed on CUDA, the pool under amp."""
    out: Dict[str, Any] = {}
    if device.type != "cpu":
        out["device"] = device.type
    if cfg.tf32 and device.type == "cuda":
        out["tf32"] = True
    if cfg.amp != "none":
        out["amp_pool"] = int(cfg.amp_pool)
    return out


def mining_k(cfg: Any) -> int:
    """Entries per channel the mining keeps: ``k``, or the candidate pool under amp."""
    return pool_size(cfg.k, cfg.amp_pool) if cfg.amp != "none" else int(cfg.k)


def reranks(cfg: Any) -> bool:
    return cfg.amp != "none" and int(cfg.amp_pool) > 0


def workers(cfg: Any, info: dist_mod.DistInfo) -> int:
    """``--workers``, or its default for this rank's device shared by the node's processes
    (``info.local_world``, torchrun's ``LOCAL_WORLD_SIZE``; see
    :func:`deconvis.utils.device.default_workers`)."""
    return int(cfg.workers) if cfg.workers is not None else default_workers(info.device, info.local_world)


def rerank_part(ctx: Any, pool: TopK, poll: Optional[Callable[[], None]] = None) -> TopK:
    """This rank's share of the re-rank: its slice of the candidate images forwarded in full
    precision (TF32 off), folded into a :class:`PoolTopK`. Merge the ranks' parts with
    :func:`deconvis.runs.distributed.gather_topk`, then :func:`rerank_finish`."""
    cfg, info = ctx.cfg, ctx.info
    cands = dist_mod.split_for_rank(candidate_images(pool), info)
    part = PoolTopK(pool, cfg.k)
    n_workers = workers(cfg, info)
    loader = make_loader(ImageDataset(ctx.source, ctx.preprocess, displayed=True), cfg.batch_size, n_workers,
                         pin_memory=ctx.device.type == "cuda", sampler=cands)
    batches = Normalized(loader, ctx.preprocess, ctx.device, read_ahead=n_workers == 0)

    def forward(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        with tf32(False):
            return ctx.dn.activations(x, ctx.layers)

    mine(forward, batches, part, channels=cfg.channels, dtype=ctx.dtype, total=len(cands),
         progress=cfg.progress and info.is_main, desc="fp32 re-rank", on_batch=lambda n: poll() if poll else None,
         batch_size=cfg.batch_size)
    return part


def rerank_finish(ctx: Any, merged: TopK, pool: TopK) -> Tuple[TopK, Dict[str, int]]:
    """The merged re-rank with the pool's bookkeeping, and per layer label the channels whose
    pool may have been too small (logged on rank 0; pass it to :func:`record`)."""
    ranked = finish(merged, pool)
    doubt = uncertain_channels(pool, ranked, AMP_RTOL.get(ctx.amp, 0.05))
    n = sum(doubt.values())
    if n and ctx.info.is_main:
        log.warning("%d channels' fp32 winners may lie outside their %d amp candidates (the last candidate is "
                    "within amp rounding of the k-th winner): raise --amp-pool, or use --amp none for exact "
                    "fp32 winners", n, pool.k)
    return ranked, {_labels(ctx).get(k, k): v for k, v in doubt.items() if v}


def record(ctx: Any, doubt: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """``stats.precision`` of ``results.json``: the precision of each kind of number."""
    cfg = ctx.cfg
    full = str(ctx.dtype).replace("torch.", "")
    mining = f"{cfg.amp} autocast" if cfg.amp != "none" else full + (" (TF32 convs)" if cfg.tf32 and
                                                                          ctx.device.type == "cuda" else "")
    out: Dict[str, Any] = {"device": ctx.device.type, "mining_forward": mining, "projection": full + " (TF32 off)"}
    if reranks(cfg):
        out.update(activation=full, ranking=f"{full} among {mining_k(cfg)} {cfg.amp} candidates per channel",
                   uncertain_channels=dict(doubt or {}))
    else:
        out.update(activation=cfg.amp if cfg.amp != "none" else full, ranking=mining)
    return out


def replay_rtol(ctx: Any) -> float:
    """Relative tolerance of the replay check: same precision -> :data:`SAME_PRECISION_RTOL`;
    mined under amp without re-rank -> the amp rounding; TF32 mining -> :data:`TF32_RTOL`."""
    cfg = ctx.cfg
    if cfg.amp != "none" and not reranks(cfg):
        return AMP_RTOL.get(ctx.amp, 0.05)
    if cfg.tf32 and cfg.amp == "none" and ctx.device.type == "cuda":
        return TF32_RTOL
    return SAME_PRECISION_RTOL


def bottom_replay_rtol(ctx: Any) -> float:
    """The replay tolerance of the bottom-k: under amp it keeps the autocast ranking and values
    (the fp32 re-rank covers the top-k only), so the amp rounding; else :func:`replay_rtol`."""
    if ctx.cfg.amp != "none":
        return AMP_RTOL.get(ctx.amp, 0.05)
    return replay_rtol(ctx)


def report_nonfinite(ctx: Any, topk: TopK) -> Dict[str, Any]:
    """Warn once per layer (rank 0) about non-finite activations; the summary for ``results.json``
    keyed by layer label (ints only)."""
    summary = nonfinite_summary(topk)
    if summary and ctx.info.is_main:
        for msg in nonfinite_messages(summary, _labels(ctx), ctx.cfg.amp, ctx.source.name, reranked=reranks(ctx.cfg)):
            log.warning(msg)
    return {_labels(ctx).get(layer, layer): {"images": v["images"], "channels": {str(c): n for c, n in v["channels"].items()},
                                           "first_image": v["first_image"]}
            for layer, v in summary.items()}
