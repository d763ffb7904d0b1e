"""What the processes of a ``torchrun`` run tell each other, in one place.

Every function here is a no-op (or returns its input) for a one-process run, so the pipeline reads
the same either way. The transport (process group, failure signals, top-k merge) is
:mod:`deconvis.runs.distributed`; this module is the pipeline's side of it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from typing import Any, Dict, List, Optional, Tuple

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


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of every parameter's and buffer's name, dtype, shape and bytes, read
    on the CPU: no arithmetic on the device, so two GPU models (other summation orders) agree
    whenever the weights are the same bits, and a permutation of the weights does not."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{name}:{flat.dtype}:{tuple(t.shape)}\0".encode())
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def results_digest(res: Optional[Results]) -> str:
    """SHA-256 (16 hex digits) of the results a run continues ('' for none)."""
    if res is None:
        return ""
    return hashlib.sha256(json.dumps(res.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(ctx: Context, res: Optional[Results] = None) -> Tuple[str, int, str, bool, str]:
    """What must be equal on every rank: the mining identity, the image count, the weights
    themselves (random weights drawn from the seed, checkpoints read on each node), whether the
    run resumes finished mining, and the results it continues from."""
    return ctx.mining_hash, len(ctx.source), weights_digest(ctx.loaded.model), res is not None, results_digest(res)


def check_same_run(ctx: Context, res: Optional[Results] = None) -> None:
    """Every rank prepared the same run (config, image count, weights) and continues the same
    results (``res``: what :func:`resume_decision` gave, None for a run that mines)."""
    info = ctx.info
    if not info.enabled:
        return
    prints = dist_mod.all_gather_objects(_fingerprint(ctx, res), info, "prepare")
    if any(p != prints[0] for p in prints):
        bad = next(r for r, p in enumerate(prints) if p != prints[0])
        what = ["mining config", "image count", "model weights", "resumed", "results"]
        differ = ", ".join(w for w, a, b in zip(what, prints[bad], prints[0]) if a != b)  # type: ignore[arg-type]
        raise DeconvisError(f"rank {bad} of {info.world} disagrees with rank 0 on the run ({differ} differ: "
                            f"{prints[bad]} vs {prints[0]}); every node needs the same images, weights and "
                            "deconvis version")


def resume_decision(res: Optional[Results], info: DistInfo) -> Optional[Results]:
    """Rank 0's decision whether to continue finished mining, and the results it loaded, on every
    rank (call after the phase in which rank 0 loaded them): the other ranks never read
    ``results.json`` themselves, so a stale view of a shared folder (NFS attribute caches after
    ``--fresh``) cannot make one rank mine while another resumes."""
    return dist_mod.from_main(res, info, "the resume decision")


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
