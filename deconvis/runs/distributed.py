"""torch.distributed for deconvis runs: one process per device, on one machine or many.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), a run:

1. mines its shard of the image set (:class:`ShardSampler`: image ``i`` goes to rank
   ``i % world``; no padding, so no image is counted twice, unlike ``DistributedSampler``);
2. gathers every rank's :class:`~deconvis.mining.TopK` and merges them in rank order
   (:func:`gather_topk`): merging is exact, so the winners equal a single-process run's;
3. splits projection and rendering across ranks (:func:`split_for_rank`), and rank 0 writes the
   report.

A failure on one rank must not hang the others. Every phase runs inside :func:`phase`; on
leaving it all ranks :func:`agree` (one small all-gather): if any rank failed, all raise the same
:class:`DeconvisError` naming the rank and its error. A rank that fails also raises a flag in the
process group's key-value store (:func:`signal_failure`), which the others poll between batches
(:func:`failure_watch`, at most once a second, no collective), so a failure at batch 1 does not
wait for the other ranks to finish a long phase: they stop within about a second plus one batch
and join the agreement. A rank that finishes a phase early waits for the others in the store as
long as they make progress (no time limit: an uneven phase is fine; work one rank does alone
beats a :func:`heartbeat`); a rank that crashed outright
or hangs is caught after ``timeout_s`` seconds without progress (or by the process group's
timeout on a collective; torchrun also ends the whole group when any process exits with an
error).
Backends: NCCL on CUDA, gloo on CPU. The control plane (object all-gathers: the failure
agreement, the top-k merge, the projection plan) always runs on gloo: on a CUDA run a gloo side
group (``DistInfo.group``) carries it, so a timeout there is a clear Python error rather than an
NCCL watchdog abort, and a rank with a sticky CUDA error can still report it. Rank 0 plans work
from its view of the shared filesystem and broadcasts it (:func:`from_main`), so ranks whose
view lags (NFS attribute caches) never split the work differently.

Phase bodies hold no collectives (a failing rank leaves its body early: a collective inside would
pair with the wrong call on the others); collectives run between phases, where every rank
arrives.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from deconvis.errors import DeconvisError
from deconvis.mining import TopK
from deconvis.utils.device import activate

T = TypeVar("T")
log = logging.getLogger("deconvis")

_FAIL_KEY = "deconvis/failed"
_sessions = [0]  # sessions opened by this process (same count on every rank): store keys per session


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE): they share its CPUs
    timeout_s: float = 600.0
    tag: str = ""  # distinguishes runs in one process group (failure-flag key)
    group: Any = field(default=None, compare=False, repr=False)  # gloo side group of the control plane (None: default)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class PeerFailed(Exception):
    """Another rank failed; this rank left its phase to join the agreement (not an error of its own)."""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_gpu_count(local_rank: int, local_world: int, device_count: int) -> None:
    """Refuse a node with more processes than GPUs: two ranks on one GPU would fail much later as
    'lost contact' (or out of memory)."""
    if device_count < 1:
        raise DeconvisError("this CUDA run sees no GPU (torch.cuda.device_count() is 0); check "
                            "CUDA_VISIBLE_DEVICES or use --device cpu")
    if local_world > device_count or local_rank >= device_count:
        raise DeconvisError(f"{max(local_world, local_rank + 1)} processes on this node but only {device_count} "
                            f"GPU{'s' if device_count > 1 else ''} visible: start at most {device_count} "
                            f"(torchrun --nproc_per_node={device_count}), one per GPU")


def init(device: torch.device, timeout_s: float = 600.0, backend: Optional[str] = None,
         side_group: Optional[bool] = None) -> DistInfo:
    """Join the process group when launched by torchrun (else a 1-process :class:`DistInfo`).

    CUDA runs use NCCL and the device ``cuda:LOCAL_RANK`` (refused when the node has more
    processes than GPUs), plus a gloo side group for the control plane (``side_group``: None =
    whenever the main backend is not gloo, also in a process group the caller made, e.g. on
    NCCL); CPU runs use gloo. ``timeout_s`` bounds how long a
    collective waits for a rank that stopped answering. A 1-process torchrun job creates no
    process group. ``cuda:N`` becomes the current CUDA device in every case.
    """
    if not launched_by_torchrun():
        activate(device)
        return DistInfo(device=device, timeout_s=timeout_s)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device.type == "cuda":
        check_gpu_count(local, local_world, torch.cuda.device_count())
        device = torch.device("cuda", local)
        activate(device)
    group = None
    if world > 1:
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            if dist.is_initialized():  # made by the caller: its backend decides
                backend = dist.get_backend()
            else:
                backend = backend or ("nccl" if device.type == "cuda" else "gloo")
                dist.init_process_group(backend=backend, timeout=timeout)
            if side_group if side_group is not None else str(backend) != "gloo":
                group = dist.new_group(backend="gloo", timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - rendezvous/network errors become one clear line
            raise DeconvisError(f"rank {rank} of {world} could not join the process group ({backend}, "
                                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return DistInfo(rank=rank, world=world, local_rank=local, device=device, timeout_s=timeout_s,
                    local_world=local_world, group=group)


def release_captured_groups() -> int:
    """Let :func:`torch.distributed.destroy_process_group` free the default process group: set
    back to None (which torch reads as the default group) every process group held as the
    default ``group`` argument of a :mod:`torch.distributed.nn.functional` function; returns how
    many it released.

    That module writes ``group=group.WORLD`` as a default argument, evaluated once at import;
    imported after ``init_process_group`` (torchvision imports ``torch._dynamo``, which imports
    it), its functions keep the default group alive after ``destroy_process_group``. The group's
    gloo worker threads then live on into interpreter exit, where one that drops its last
    collective's tensors needs the GIL, is ended by Python's finalization and aborts the process
    (SIGABRT, "terminate called without an active exception")."""
    module = sys.modules.get("torch.distributed.nn.functional")  # None: not imported, nothing held
    released = 0
    for fn in list(vars(module).values()) if module is not None else ():
        code, defaults = getattr(fn, "__code__", None), getattr(fn, "__defaults__", None)
        if code is not None and defaults:  # positional defaults belong to the last parameters
            names = code.co_varnames[:code.co_argcount][-len(defaults):]
            fresh = tuple(None if n == "group" and isinstance(v, dist.ProcessGroup) else v
                          for n, v in zip(names, defaults))
            if fresh != defaults:
                fn.__defaults__, released = fresh, released + 1
        kw = getattr(fn, "__kwdefaults__", None)
        if isinstance(kw, dict) and isinstance(kw.get("group"), dist.ProcessGroup):
            fn.__kwdefaults__, released = {**kw, "group": None}, released + 1
    return released


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        release_captured_groups()
        dist.destroy_process_group()


@contextmanager
def session(device: torch.device, timeout_s: float = 600.0, backend: Optional[str] = None) -> Iterator[DistInfo]:
    """``with session(device) as info:`` -- :func:`init` for one run, and on leaving, destroy the
    process group if this call created it (one made by the caller is left alone, but freed of
    torch's stray references, :func:`release_captured_groups`, so that the caller's
    ``destroy_process_group`` ends its threads)."""
    created = launched_by_torchrun() and not dist.is_initialized()
    info = init(device, timeout_s, backend)
    _sessions[0] += 1
    info = replace(info, tag=str(_sessions[0]))
    try:
        yield info
    finally:
        if dist.is_initialized():  # so that destroying the group (here or by the caller) frees it
            release_captured_groups()
        if created:
            shutdown(info)
        elif info.group is not None and dist.is_initialized():  # our side group in the caller's process group
            dist.destroy_process_group(info.group)


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


def shard_size(n: int, rank: int = 0, world: int = 1) -> int:
    """How many of ``0..n-1`` :class:`ShardSampler` gives ``rank``."""
    return len(range(rank, n, world))


def split_for_rank(items: Sequence[T], info: DistInfo) -> List[T]:
    """This rank's share of ``items`` (round-robin, so layers and channels spread evenly)."""
    return list(items[info.rank::info.world])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def all_gather_objects(obj: object, info: DistInfo, what: str = "") -> List[object]:
    """Every rank's ``obj`` in rank order (``[obj]`` when not distributed).

    A collective that fails (a rank crashed, or did not arrive within the process group's
    timeout) becomes a :class:`DeconvisError` saying so."""
    if not info.enabled:
        return [obj]
    out: List[object] = [None] * info.world
    try:
        dist.all_gather_object(out, obj, group=info.group)
    except Exception as exc:  # noqa: BLE001 - gloo/NCCL errors, timeouts
        raise _lost(info, what, exc) from exc
    return out


def _lost(info: DistInfo, what: str, exc: BaseException) -> DeconvisError:
    where = f" during {what}" if what else ""
    return DeconvisError(f"rank {info.rank} of {info.world} lost contact with the other ranks{where} "
                         f"({type(exc).__name__}: {_first_line(exc)}); another rank crashed or did not "
                         f"answer within --dist-timeout {info.timeout_s:g} s: see its log")


def from_main(obj: T, info: DistInfo, what: str = "") -> T:
    """Rank 0's ``obj`` on every rank (sent on the control group; the others pass anything, e.g.
    None): one plan for all, whatever each rank's view of a shared filesystem. Compute ``obj``
    inside a :func:`phase` on rank 0 and call this after it, where every rank arrives."""
    if not info.enabled:
        return obj
    box: List[object] = [obj if info.is_main else None]
    try:
        dist.broadcast_object_list(box, src=0, group=info.group)
    except Exception as exc:  # noqa: BLE001
        raise _lost(info, what, exc) from exc
    return box[0]  # type: ignore[return-value]


def gather_topk(topk, info: DistInfo):
    """Merge every rank's TopK into ``topk`` (on every rank): the exact single-process winners.

    States travel as plain CPU tensors; merge order is rank order, and the merge is a total order,
    so every rank ends with identical winners."""
    if not info.enabled:
        return topk

    states = all_gather_objects(topk.state_dict(), info, "the top-k merge")
    merged = TopK(topk.layers, topk.k, device=topk.device)
    for st in states:
        part = TopK(topk.layers, topk.k, device=topk.device).load_state_dict(st)
        merged.merge(part)
    return merged


# -- failures ------------------------------------------------------------------------------------

def _store(info: DistInfo):
    """The default process group's key-value store (None when there is none)."""
    if not info.enabled or not dist.is_initialized():
        return None
    get = getattr(dist.distributed_c10d, "_get_default_store", None)  # stable since torch 1.x
    try:
        return get() if get is not None else None
    except Exception:  # noqa: BLE001 - no store: failures are still shared at the phase end
        return None


def _key(info: DistInfo, *parts: object) -> str:
    return "/".join(["deconvis", info.tag, *map(str, parts)])


def _fail_key(info: DistInfo) -> str:
    return _key(info, "failed")


def signal_failure(info: DistInfo, message: str = "") -> None:
    """Tell the other ranks (through the store, no collective) that this rank failed."""
    store = _store(info)
    if store is None:
        return
    try:
        store.set(_fail_key(info), f"{info.rank}:{message}"[:2000])
    except Exception:  # noqa: BLE001 - best effort: the phase-end agreement still shares the failure
        pass


def failure_watch(info: DistInfo, every_s: float = 1.0) -> Callable[[], None]:
    """A cheap ``check()`` to call between batches: raises :class:`PeerFailed` once another rank
    has signalled a failure, and counts this rank's progress (what ranks that finished a phase
    early watch while they wait, see :func:`phase`). Talks to the store at most every
    ``every_s`` seconds (a few microseconds otherwise); a no-op when not distributed."""
    store = _store(info)
    if store is None:
        return lambda: None
    fail, progress = _fail_key(info), _key(info, "progress")
    last = [time.monotonic()]

    def check() -> None:
        now = time.monotonic()
        if now - last[0] < every_s:
            return
        last[0] = now
        try:
            store.add(progress, 1)
            failed = store.check([fail])
        except Exception:  # noqa: BLE001 - store gone: the agreement will report it
            return
        if failed:
            raise PeerFailed("another rank failed")

    return check


_phase_seq: dict = {}


def wait_for_peers(info: DistInfo, name: str, poll_s: float = 0.25) -> None:
    """Wait (through the store, no collective) until every rank has finished phase ``name`` or
    one has failed, however long the others take while they make progress (see
    :func:`failure_watch`). Only when no rank made progress for ``info.timeout_s`` seconds: a
    :class:`DeconvisError` naming the ranks that never finished (hung, or lost). Then the
    phase-end collective runs with every rank present, so it never waits long."""
    store = _store(info)
    if store is None:
        return
    seq = _phase_seq[info.tag]
    done_key = _key(info, "phase", seq, "done")
    progress, fail = _key(info, "progress"), _fail_key(info)
    try:
        store.set(_key(info, "phase", seq, "rank", info.rank), "1")
        n_done = store.add(done_key, 1)
        seen = store.add(progress, 0)
    except Exception:  # noqa: BLE001 - the collective reports it
        return
    changed = start = last_log = time.monotonic()
    while n_done < info.world:
        time.sleep(poll_s)
        now = time.monotonic()
        try:
            if store.check([fail]):
                return  # the agreement that follows says which rank failed
            n_done = store.add(done_key, 0)
            p = store.add(progress, 0)
        except Exception:  # noqa: BLE001
            return
        if p != seen:
            seen, changed = p, now
        if now - last_log >= 60:
            last_log = now
            log.info("rank %d of %d: waiting %.0f s for %d rank(s) to finish %s", info.rank, info.world,
                     now - start, info.world - n_done, name)
        if n_done < info.world and now - changed > info.timeout_s:
            missing = [r for r in range(info.world)
                       if not store.check([_key(info, "phase", seq, "rank", r)])]
            raise DeconvisError(f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                                f"{info.world} made no progress for {info.timeout_s:g} s during {name} (hung or "
                                "lost); see its log, or raise --dist-timeout if that phase is just slow")


def agree(info: DistInfo, error: Optional[BaseException] = None, phase: str = "") -> None:
    """Phase barrier that shares failures: if any rank passes an ``error``, every rank raises one
    DeconvisError naming the first failing rank and its message (just the message when every
    rank failed the same way, e.g. a bad setting). A :class:`PeerFailed` is not a failure of its
    own: that rank only stopped early."""
    if not info.enabled:
        if error is not None and not isinstance(error, PeerFailed):
            raise error
        return
    payload = None
    if isinstance(error, PeerFailed):
        payload = ("peer", "")
    elif error is not None:
        text = _first_line(error) if isinstance(error, DeconvisError) else f"{type(error).__name__}: {_first_line(error)}"
        payload = ("error", text)
    where = f" during {phase}" if phase else ""
    msgs = all_gather_objects(payload, info, phase)
    failures = [(r, m[1]) for r, m in enumerate(msgs) if m is not None and m[0] == "error"]  # type: ignore[index]
    if failures:
        if len(failures) == info.world and len({m for _, m in failures}) == 1:
            raise DeconvisError(failures[0][1]) from error
        r, m = failures[0]
        raise DeconvisError(f"rank {r} of {info.world} failed{where}: {m}") from error
    if any(m is not None for m in msgs):
        raise DeconvisError(f"rank {info.rank} of {info.world} stopped{where}: a rank signalled a failure "
                            "that it did not report; see the log of every rank")


@contextmanager
def heartbeat(info: DistInfo, every_s: float = 1.0) -> Iterator[None]:
    """Inside, a thread counts this rank's progress every ``every_s`` seconds (see
    :func:`failure_watch`): for work one rank does alone with no loop to poll in (the analyses,
    clearing a tile folder, stat-ing every tile of the plan), so the waiting ranks do not take it
    for a hang and give up after ``--dist-timeout``. The beat proves the process is alive, not that
    the work advances: a rank that crashes stops beating and is caught as before; one stuck in
    such work waits like a one-process run would. A no-op when not distributed."""
    store = _store(info)
    if store is None:
        yield
        return
    progress, stop = _key(info, "progress"), threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                store.add(progress, 1)
            except Exception:  # noqa: BLE001 - store gone: the phase-end agreement reports it
                return

    thread = threading.Thread(target=beat, name="deconvis-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def phase(info: DistInfo, name: str, solo: bool = False) -> Iterator[None]:
    """``with phase(info, "mining"): ...`` -- run a phase; on leaving it, all ranks agree on
    whether any rank failed (see :func:`agree`). A failing rank first raises the store flag so
    that ranks still busy in this phase stop early (see :func:`failure_watch`); a rank that
    finishes early waits for the others without a time limit while they make progress
    (:func:`wait_for_peers`), so a long, uneven phase (a resumed rank with more left to do) is
    not mistaken for a hung rank. ``solo``: rank 0 does the phase's work alone, under a
    :func:`heartbeat`."""
    _phase_seq[info.tag] = _phase_seq.get(info.tag, 0) + 1
    beat = heartbeat(info) if solo and info.is_main else nullcontext()
    try:
        with beat:
            yield
    except BaseException as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not info.enabled:
            raise
        if not isinstance(exc, PeerFailed):
            signal_failure(info, _first_line(exc))
        agree(info, exc, name)
        raise
    if info.enabled:
        wait_for_peers(info, name)
    agree(info, None, name)
