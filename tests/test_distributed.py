"""torch.distributed primitives on 2 CPU processes (gloo): exact top-k merge across ranks and a
failure on one rank reaching every rank as the same clear error."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from deconvis import distributed as D
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
    info = D.init(torch.device("cpu"), timeout_s=60)
    try:
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
    finally:
        D.shutdown(info)


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
