"""``pipeline.run`` on two gloo ranks (torch.multiprocessing) against a shared folder that one rank
sees late, and rank 0 working alone for longer than ``--dist-timeout``.

* a stale view: rank 1's file system still shows (or does not yet show) what rank 0 deleted or
  wrote (an NFS attribute cache, simulated by patching ``os.path.isfile`` in rank 1 only): rank 0
  decides whether the run resumes, every rank follows it;
* a slow file system and a long analysis on rank 0 (sleeps longer than ``dist_timeout``): the
  other rank waits, the run succeeds;
* one log per rank: ``run.log`` holds rank 0's lines only, ``run.rank1.log`` rank 1's.

The process group is made by the test (a caller-made group, as a notebook or a framework would),
so three runs share it.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pipeline_fixtures as fx

#: --dist-timeout of the slow run; rank 0's solo work sleeps SLOW_S > it
TIMEOUT_S = 5  # (a prepare on a loaded machine must stay well within it: it sends no progress)
SLOW_S = 11.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stale_isfile(real, hide=(), show=()):
    """``os.path.isfile`` of a node whose cache has not caught up: ``hide`` paths (written by
    another node) look absent, ``show`` paths (deleted by another node) look present."""
    def isfile(path) -> bool:
        p = os.fspath(path)
        if any(p.endswith(h) for h in hide):
            return False
        if any(p.endswith(s) for s in show):
            return True
        return real(path)
    return isfile


def _config(tmp: str, **over):
    """The tiny pipeline config over the net and images the test wrote before the ranks start."""
    from deconvis.runs.config import load_config

    values = {"model": os.path.join(tmp, "tinynet.py") + ":make", "weights": "random",
              "images": os.path.join(tmp, "imgs"), "k": 3, "batch_size": 3, "resize": fx.SIZE, "crop": fx.SIZE,
              "out": os.path.join(tmp, "out"), "run": "shared", "progress": False, "checkpoint_every": 1,
              "min_tile": 8, "max_tile": 32, "per_sheet": 4, "device": "cpu", "dist_timeout": 30}
    values.update(over)
    return load_config(None, values)


def _run(tmp: str, rank: int, name: str, **over):
    from deconvis.runs import pipeline

    cfg = _config(tmp, **over)
    t0 = time.monotonic()
    try:
        out = pipeline.run(cfg)
        got = {"mined": out.mined, "error": "", "winners": [[w.image for u in lr.units for w in u.winners]
                                                            for lr in out.results.layers]}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        got = {"mined": None, "error": f"{type(exc).__name__}: {exc}", "winners": None}
    got["seconds"] = time.monotonic() - t0
    with open(os.path.join(tmp, f"{name}{rank}.json"), "w") as f:
        json.dump(got, f)


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=40))
    from deconvis.runs import pipeline

    real_isfile = os.path.isfile
    try:
        _run(tmp, rank, "first")
        # rank 1 does not see the results.json rank 0 wrote: rank 0's decision (resume) holds
        if rank == 1:
            os.path.isfile = _stale_isfile(real_isfile, hide=("results.json",))
        _run(tmp, rank, "resume")
        os.path.isfile = real_isfile
        # --fresh: rank 0 deletes the checkpoints (slowly, a slow file system) while rank 1 still
        # sees its own; rank 0's analyses outlast --dist-timeout too
        if rank == 1:
            os.path.isfile = _stale_isfile(real_isfile, show=("mining_state.rank1-of2.pt",))
        else:
            real_clear, real_analyses = pipeline.clear_run, pipeline.analyses_phase

            def slow_clear(run_dir):
                real_clear(run_dir)
                time.sleep(SLOW_S)

            def slow_analyses(*a, **k):
                time.sleep(SLOW_S)
                return real_analyses(*a, **k)

            pipeline.clear_run, pipeline.analyses_phase = slow_clear, slow_analyses
        _run(tmp, rank, "fresh", fresh=True, dist_timeout=TIMEOUT_S)
    finally:
        os.path.isfile = real_isfile
        dist.destroy_process_group()
        with open(os.path.join(tmp, f"threads{rank}.json"), "w") as f:  # what outlives the group
            json.dump(_native_threads(), f)


def _native_threads() -> list:
    """Names of this process's threads of torch.distributed (gloo's, the TCPStore server's)."""
    names = []
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return sorted(n for n in names if "gloo" in n or "tcpstore" in n)


def test_rank_0_decides_the_resume_waits_are_kept_alive_and_each_rank_logs_alone(tmp_path):
    fx.tiny_config(tmp_path)  # writes the net and the images once, before the ranks start
    files = [tmp_path / f"{name}{r}.json" for name in ("first", "resume", "fresh") for r in (0, 1)]
    # a rank that aborts at exit (SIGABRT, "terminate called without an active exception": gloo
    # threads of a process group that destroy_process_group could not free) fails here too
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    res = {(f.stem[:-1], int(f.stem[-1])): json.loads(f.read_text()) for f in files}
    for r in (0, 1):  # destroy_process_group freed the group: no gloo or store thread left to abort at exit
        assert json.loads((tmp_path / f"threads{r}.json").read_text()) == []
    for r in (0, 1):
        assert res["first", r]["error"] == "" and res["first", r]["mined"]
        assert res["resume", r]["error"] == "", res["resume", r]["error"]
        assert res["resume", r]["mined"] is False  # rank 1 too: it took rank 0's results
        assert res["resume", r]["winners"] == res["first", 0]["winners"]
        assert res["fresh", r]["error"] == "", res["fresh", r]["error"]  # no "made no progress", no "damaged"
        assert res["fresh", r]["mined"] and res["fresh", r]["winners"] == res["first", 0]["winners"]
    assert res["fresh", 1]["seconds"] > 2 * SLOW_S  # rank 1 did wait out both of rank 0's slow steps
    run_dir = tmp_path / "out" / "shared"
    main_log, rank1_log = (run_dir / "run.log").read_text(), (run_dir / "run.rank1.log").read_text()
    assert "[rank 0/2] mining time split" in main_log and "[rank 1/2]" not in main_log
    assert "[rank 1/2] mining time split" in rank1_log and "[rank 0/2]" not in rank1_log
