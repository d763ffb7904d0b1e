"""What the processes of a ``torchrun`` run tell each other, in one place.

Every function here is a no-op (or returns its input) for a one-process run, so the pipeline reads
the same either way. The transport (process group, failure signals, top-k merge) is
:mod:`deconvis.runs.distributed`; this module is the pipeline's side of it.
"""
from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Dict, List, Tuple

import torch

from deconvis import mining
from deconvis.errors import DeconvisError
from deconvis.io.atomic import write_text
from deconvis.render.sheets import TileJob
from deconvis.runs import distributed as dist_mod
from deconvis.runs.distributed import DistInfo
from deconvis.runs.phases.prepare import Context
from deconvis.runs.phases.project import apply_projection_updates, projection_updates
from deconvis.runs.results import Results

log = logging.getLogger("deconvis")

SHARE_FILE = ".deconvis-ranks"  # token rank 0 writes and every rank reads: --out is shared


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun, or when unreadable)."""
    if not dist_mod.launched_by_torchrun():
        return 0
    try:
        return int(os.environ["RANK"])
    except ValueError:
        return 0


def main_log(info: DistInfo, msg: str, *args: Any, level: int = logging.INFO) -> None:
    """Log on rank 0 only (messages about the whole run, not one rank)."""
    if info.is_main:
        log.log(level, msg, *args)


def share_token(run_dir: str, info: DistInfo) -> str:
    """Rank 0 writes a fresh token into ``run_dir`` (call inside the setup phase); '' otherwise."""
    if not (info.enabled and info.is_main):
        return ""
    token = uuid.uuid4().hex
    write_text(os.path.join(run_dir, SHARE_FILE), token)
    return token


def check_shared(run_dir: str, token: str, info: DistInfo) -> None:
    """Every rank reads rank 0's token (sent by :func:`exchange_token`): ``--out`` is shared."""
    if not info.enabled:
        return
    try:
        with open(os.path.join(run_dir, SHARE_FILE), encoding="utf-8") as f:
            seen = f.read().strip()
    except OSError:
        seen = ""
    if seen != token:
        raise DeconvisError(f"rank {info.rank} cannot see the files rank 0 writes in {os.path.abspath(run_dir)}: "
                            "--out must be a folder every process shares (e.g. on NFS/Lustre for several nodes)")


def exchange_token(token: str, info: DistInfo) -> str:
    """Rank 0's token, on every rank."""
    return str(dist_mod.all_gather_objects(token, info, "setup")[0])


def _fingerprint(ctx: Context) -> Tuple[str, int, float]:
    """What must be equal on every rank: the mining identity, and the weights themselves
    (random weights drawn from the seed, checkpoints read on each node)."""
    with torch.no_grad():
        total = 0.0
        for p in ctx.loaded.model.parameters():
            total += float(p.detach().double().abs().sum()) + float(p.detach().double().sum())
    return ctx.mining_hash, len(ctx.source), total


def check_same_run(ctx: Context) -> None:
    """Every rank prepared the same run (config, image count, weights)."""
    info = ctx.info
    if not info.enabled:
        return
    prints = dist_mod.all_gather_objects(_fingerprint(ctx), info, "prepare")
    if any(p != prints[0] for p in prints):
        bad = next(r for r, p in enumerate(prints) if p != prints[0])
        raise DeconvisError(f"rank {bad} of {info.world} disagrees with rank 0 on the run (mining config, "
                            f"image count or model weights differ: {prints[bad][:2]} vs {prints[0][:2]}); every "
                            "node needs the same images, weights and deconvis version")


def merge_mining(topk: mining.TopK, stats: Dict[str, Any], info: DistInfo) -> Tuple[mining.TopK, List[Any]]:
    """The top-k of all ranks merged (exactly), and every rank's mining ``stats``."""
    all_stats = dist_mod.all_gather_objects(stats, info, "mining")
    return dist_mod.gather_topk(topk, info), all_stats


def merge_projection(res: Results, jobs: List[TileJob], n_done: int, info: DistInfo) -> int:
    """Fill the other ranks' projections into ``res``; returns how many units all ranks projected."""
    if not info.enabled:
        return n_done
    updates = dist_mod.all_gather_objects(projection_updates(res, jobs), info, "projection")
    apply_projection_updates(res, updates)  # type: ignore[arg-type]
    return sum(int(u["units"]) for u in updates)  # type: ignore[index]


def merge_sheets(res: Results, my_layers: List[str], info: DistInfo) -> None:
    """Fill the sheets the other ranks rendered into ``res``."""
    if not info.enabled:
        return
    mine = {lr.name: (lr.sheets, lr.sheets_hash) for lr in res.layers if lr.name in my_layers}
    layers = {lr.name: lr for lr in res.layers}
    for part in dist_mod.all_gather_objects(mine, info, "rendering"):
        for name, (sheets, h) in part.items():  # type: ignore[union-attr]
            layers[name].sheets, layers[name].sheets_hash = sheets, h
