"""Two gloo processes: the control plane on a side group, and one projection plan from rank 0
although rank 1's view of the shared folder is stale."""
from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from deconvis.runs import distributed as D


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan(folder: str, stale: bool):
    """The tiles still to project as this rank sees ``folder``; a stale view (NFS attribute
    cache) misses the newest tile, t3."""
    names = [f"t{i}" for i in range(6)]
    seen = set(os.listdir(folder)) - ({"t3"} if stale else set())
    return [n for n in names if n not in seen]


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = D.init(torch.device("cpu"), timeout_s=60, side_group=True)
    try:
        own = _plan(folder, stale=rank == 1)
        with D.phase(info, "plan"):
            jobs = own if info.is_main else None
        jobs = D.from_main(jobs, info, "the plan")
        mine = D.split_for_rank(jobs, info)
        gathered = D.all_gather_objects(mine, info, "check")
        out = {"group": info.group is not None, "own": own, "jobs": jobs, "all": gathered}
        with open(os.path.join(folder, "..", f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        D.shutdown(info)


def test_rank0_plan_wins_over_a_stale_view_on_a_side_group(tmp_path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name in ("t0", "t3"):
        (folder / name).write_text("x")
    mp.spawn(_worker, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["group"] and r1["group"]                      # the control plane ran on the gloo side group
    assert r1["own"] != r0["own"] and "t3" in r1["own"]     # the views differ ...
    assert r0["jobs"] == r1["jobs"] == ["t1", "t2", "t4", "t5"]  # ... the plan does not
    done = sorted(j for part in r0["all"] for j in part)
    assert done == r0["jobs"]                               # every job exactly once, none twice
