"""torch.distributed primitives on 2 CPU processes (gloo): exact top-k merge across ranks, a
failure on one rank reaching every rank as the same clear error, and rank 0's projection plan
taken by a rank with a stale view of the shared folder -- all on a gloo side group, as NCCL runs do."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from deconvis.runs import distributed as D
from deconvis.mining import TopK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_sampler_covers_each_index_once():
    n, world = 11, 3
    shards = [list(D.ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert list(D.ShardSampler(n, 1, world, start=2)) == shards[1][2:]


def _acts(n_images: int):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n_images, 5, 4, 4, generator=gen)
    a[7] = a[2]  # a tie across images (and ranks)
    return a


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = D.init(torch.device("cpu"), timeout_s=60, side_group=True)  # control plane on a gloo side group
    try:
        _stale_plan(info, out_dir)
        acts = _acts(20)
        topk = TopK(["l"], 3)
        ids = torch.tensor(list(D.ShardSampler(20, rank, world)))
        for chunk in ids.split(3):
            topk.update({"l": acts[chunk]}, chunk)
        merged = D.gather_topk(topk, info)
        torch.save(merged.state_dict(), os.path.join(out_dir, f"merged{rank}.pt"))
        try:
            with D.phase(info, "projection"):
                if rank == 1:
                    raise RuntimeError("disk full on rank 1")
        except Exception as exc:  # noqa: BLE001
            with open(os.path.join(out_dir, f"err{rank}.txt"), "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
        _more_failures(rank, world, out_dir)
    finally:
        D.shutdown(info)


def _stale_plan(info, out_dir: str) -> None:
    """Rank 1's view of the shared folder misses the newest tile (an NFS attribute cache): the
    projection plan is rank 0's on every rank, and split, it covers every job exactly once."""
    names = [f"t{i}" for i in range(6)]
    visible = {"t0", "t3"} - ({"t3"} if info.rank == 1 else set())
    own = [n for n in names if n not in visible]
    with D.phase(info, "plan"):
        jobs = own if info.is_main else None
    jobs = D.from_main(jobs, info, "the plan")
    parts = D.all_gather_objects(D.split_for_rank(jobs, info), info, "check")
    with open(os.path.join(out_dir, f"plan{info.rank}.json"), "w") as f:
        json.dump({"group": info.group is not None, "own": own, "jobs": jobs, "parts": parts}, f)


def _more_failures(rank: int, world: int, out_dir: str) -> None:
    """(a) rank 1 fails at once while rank 0 is busy in a long phase: rank 0, polling the failure
    flag between its 'batches', must stop within seconds, not at the end of its work; (b) every
    rank failing the same way gives that plain message; (c) an error-free phase passes."""
    info = D.DistInfo(rank=rank, world=world, timeout_s=60, tag="more")
    watch = D.failure_watch(info, every_s=0.2)
    t0 = time.monotonic()
    try:
        with D.phase(info, "mining"):
            if rank == 1:
                raise OSError("cannot decode batch 1 on rank 1")
            while time.monotonic() - t0 < 60:  # a long shard: 60 s of 10 ms batches
                time.sleep(0.01)
                watch()
        msg = "no error"
    except Exception as exc:  # noqa: BLE001
        msg = f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - t0
    try:
        with D.phase(info, "prepare"):
            raise D.DeconvisError("unknown layer 'conv9'")
    except Exception as exc:  # noqa: BLE001
        same = f"{type(exc).__name__}: {exc}"
    with D.phase(info, "report"):
        pass
    with open(os.path.join(out_dir, f"more{rank}.txt"), "w") as f:
        f.write(f"{elapsed:.3f}\n{msg}\n{same}\n")


def test_two_gloo_ranks_merge_exactly_and_share_failures(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    single = TopK(["l"], 3)
    acts = _acts(20)
    single.update({"l": acts}, torch.arange(20))
    want = single.winners("l")
    for rank in range(world):
        got = TopK.from_state_dict(torch.load(tmp_path / f"merged{rank}.pt", weights_only=True)).winners("l")
        for f in ("values", "images", "ys", "xs"):
            assert torch.equal(got[f], want[f]), (rank, f)
        err = (tmp_path / f"err{rank}.txt").read_text()
        assert err.startswith("DeconvisError: rank 1 of 2 failed during projection")
        assert "disk full on rank 1" in err
        elapsed, msg, same = (tmp_path / f"more{rank}.txt").read_text().splitlines()
        assert msg == "DeconvisError: rank 1 of 2 failed during mining: OSError: cannot decode batch 1 on rank 1"
        assert float(elapsed) < 20  # not the 60 s rank 0 had left: stopped by the failure flag
        assert same == "DeconvisError: unknown layer 'conv9'"  # all ranks alike: the message alone
        plan = json.loads((tmp_path / f"plan{rank}.json").read_text())
        assert plan["group"]                                  # the control plane ran on the side group
        assert plan["jobs"] == ["t1", "t2", "t4", "t5"]       # rank 0's plan, also on the stale rank 1
        assert sorted(j for part in plan["parts"] for j in part) == plan["jobs"]  # each job once
    assert "t3" in json.loads((tmp_path / "plan1.json").read_text())["own"]  # rank 1's own view differed


def test_failure_watch_and_agree_without_process_group():
    info = D.DistInfo()
    D.failure_watch(info)()  # no-op
    with pytest.raises(KeyError):  # one process: the original error, unchanged
        with D.phase(info, "x"):
            raise KeyError("k")
    with D.phase(info, "x"):
        pass


def _hang_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = D.init(torch.device("cpu"), timeout_s=4)
    info = D.DistInfo(rank=info.rank, world=info.world, timeout_s=4, tag="hang")
    try:
        # an uneven phase longer than the timeout is fine while the busy rank makes progress
        t0 = time.monotonic()
        watch = D.failure_watch(info, every_s=0.5)
        with D.phase(info, "mining"):
            while rank == 1 and time.monotonic() - t0 < 9:
                time.sleep(0.05)
                watch()
        with open(os.path.join(out_dir, f"uneven{rank}.txt"), "w") as f:
            f.write(f"{time.monotonic() - t0:.3f}\n")
        t0 = time.monotonic()
        try:
            with D.phase(info, "projection"):
                if rank == 1:
                    time.sleep(12)  # hangs past the timeout without failing
        except Exception as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {exc}"
        else:
            msg = "no error"
        with open(os.path.join(out_dir, f"hang{rank}.txt"), "w") as f:
            f.write(f"{time.monotonic() - t0:.3f}\n{msg}\n")
    finally:
        if rank == 0:
            os._exit(0)  # the group is broken: skip the teardown handshake
        D.shutdown(info)


@pytest.mark.slow
def test_a_hung_rank_times_out_with_a_clear_error(tmp_path):
    mp.spawn(_hang_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert float((tmp_path / "uneven0.txt").read_text()) > 8  # rank 0 waited 9 s > timeout 4 s, no error
    elapsed, msg = (tmp_path / "hang0.txt").read_text().splitlines()
    assert msg == ("DeconvisError: rank 1 of 2 made no progress for 4 s during projection (hung or lost); see its "
                   "log, or raise --dist-timeout if that phase is just slow")
    assert 3.5 < float(elapsed) < 11


_TEARDOWN_SCRIPT = r"""
import datetime, importlib, json, os, sys
import torch, torch.distributed as dist
from deconvis.runs import distributed as D

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)

store = dist.FileStore(sys.argv[1], 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=20))
importlib.import_module("torch.distributed.nn")  # after the group exists, as torchvision's import does
captured = dist.distributed_c10d._get_default_group() in importlib.import_module(
    "torch.distributed.nn.functional").broadcast.__defaults__
with D.session(torch.device("cpu")):  # a caller-made group: the caller destroys it
    pass
before = gloo_threads()
dist.destroy_process_group()
print(json.dumps([captured, bool(before), gloo_threads()]))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through /proc (Linux)")
def test_destroying_the_group_after_a_session_ends_its_gloo_threads(tmp_path):
    """torch.distributed.nn, imported after init_process_group, keeps the default group as a default
    argument; once a session ends, destroy_process_group must still free the group and join its
    gloo threads (left alive, they abort the process at interpreter exit)."""
    import subprocess
    import sys

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _TEARDOWN_SCRIPT, str(tmp_path / "store")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == [True, True, []], out.stdout  # captured; threads ran; none left
