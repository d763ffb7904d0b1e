"""torch.distributed for deconvis runs: one process per device, on one machine or many.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), a run:

1. mines its shard of the image set (:class:`ShardSampler`: image ``i`` goes to rank
   ``i % world``; no padding, so no image is counted twice, unlike ``DistributedSampler``);
2. gathers every rank's :class:`~deconvis.mining.TopK` and merges them in rank order
   (:func:`gather_topk`): merging is exact, so the winners equal a single-process run's;
3. splits projection and rendering across ranks (:func:`split_for_rank`), and rank 0 writes the
   report.

A failure on one rank must not hang the others: :func:`agree` is called at each phase boundary;
every rank says whether it failed, and if any did, all raise the same :class:`DeconvisError`
naming the rank and its error. The process group has a timeout, and torchrun ends the whole
group when any process exits with an error, so a crashed rank cannot leave the job hanging.
Backends: NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from deconvis.errors import DeconvisError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device, timeout_s: float = 600.0, backend: Optional[str] = None) -> DistInfo:
    """Join the process group when launched by torchrun (else a 1-process :class:`DistInfo`).

    CUDA runs use NCCL and the device ``cuda:LOCAL_RANK``; CPU runs use gloo. ``timeout_s``
    bounds how long a collective waits for a rank that stopped answering.
    """
    if not launched_by_torchrun():
        return DistInfo(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world=world, local_rank=local, device=device)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, rank + 2*world, ...`` below ``n``, starting at ``start``
    (items already consumed by this rank, for resume). Shards are disjoint and cover ``0..n-1``
    exactly once, with no padding."""

    def __init__(self, n: int, rank: int = 0, world: int = 1, start: int = 0):
        self.indices = list(range(rank, n, world))[start:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def split_for_rank(items: Sequence[T], info: DistInfo) -> List[T]:
    """This rank's share of ``items`` (round-robin, so layers and channels spread evenly)."""
    return list(items[info.rank::info.world])


def all_gather_objects(obj: object, info: DistInfo) -> List[object]:
    """Every rank's ``obj`` in rank order (``[obj]`` when not distributed)."""
    if not info.enabled:
        return [obj]
    out: List[object] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def gather_topk(topk, info: DistInfo):
    """Merge every rank's TopK into ``topk`` (on every rank): the exact single-process winners.

    States travel as plain CPU tensors; merge order is rank order, and the merge is a total order,
    so every rank ends with identical winners."""
    if not info.enabled:
        return topk
    from deconvis.mining import TopK

    states = all_gather_objects(topk.state_dict(), info)
    merged = TopK(topk.layers, topk.k, device=topk.device)
    for st in states:
        part = TopK(topk.layers, topk.k, device=topk.device).load_state_dict(st)
        merged.merge(part)
    return merged


def agree(info: DistInfo, error: Optional[BaseException] = None, phase: str = "") -> None:
    """Phase barrier that shares failures: if any rank passes an ``error``, every rank raises one
    DeconvisError naming the first failing rank and its message."""
    if not info.enabled:
        if error is not None:
            raise error
        return
    msg = None if error is None else f"{type(error).__name__}: {error}"
    msgs = all_gather_objects(msg, info)
    for r, m in enumerate(msgs):
        if m is not None:
            where = f" during {phase}" if phase else ""
            raise DeconvisError(f"rank {r} of {info.world} failed{where}: {m}") from error


@contextmanager
def phase(info: DistInfo, name: str) -> Iterator[None]:
    """``with phase(info, "mining"): ...`` -- run a phase; on leaving it, all ranks agree on
    whether any rank failed (see :func:`agree`)."""
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not info.enabled:
            raise
        agree(info, exc, name)
        raise
    agree(info, None, name)
