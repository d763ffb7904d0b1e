"""``deconvis visualize`` on several processes (torchrun, gloo, CPU) against one process, plus the
single-device speed options (amp, channels_last, timing, auto projection batches).

Oracle for the distributed run: the one-process run of the same config (itself checked against a
brute-force top-k in test_pipeline.py). The 2-process run goes through the real launcher,
``python -m torch.distributed.run --nproc_per_node=2 -m deconvis visualize ...``, as users run it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import socket
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import pytest
import torch
import yaml

import fail_rank_entry
import pipeline_fixtures as fx
from deconvis import mining
from deconvis.runs import pipeline
from deconvis.runs import unit_pages
from deconvis.runs.config import load_config
from deconvis.errors import DeconvisError

TORCHRUN_TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(tmp_path, **over) -> str:
    """A YAML config for the tiny net over 12 small images plus one unreadable file (k=2)."""
    spec = fx.write_net(tmp_path)
    images = tmp_path / "imgs"
    if not images.is_dir():
        fx.write_images(images, broken=True)
    values = {"model": spec, "weights": "random", "images": str(images), "k": 2, "batch_size": 2, "resize": fx.SIZE,
              "crop": fx.SIZE, "out": str(tmp_path / "out"), "progress": False, "checkpoint_every": 1,
              "min_tile": 8, "max_tile": 32, "per_sheet": 4, "device": "cpu", "seed": 3, "dist_timeout": 60}
    values.update(over)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _torchrun(conf: str, run: str, log_dir, *extra: str, fail: Optional[str] = None, nproc: int = 2):
    """Run ``deconvis visualize --config conf -n run`` on ``nproc`` processes (``fail="R[:B]"``:
    rank R fails in its B-th mining forward, see fail_rank_entry.py); returns the completed
    process, the per-rank stderr and stdout logs, and the wall time."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    entry = ["-m", "deconvis"]
    if fail is not None:
        env[fail_rank_entry.FAIL_ENV] = fail
        entry = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "fail_rank_entry.py")]
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", "--log-dir", str(log_dir), "-r", "3",
           *entry, "visualize", "--config", conf, "-n", run, *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT, env=env)
    wall = time.monotonic() - t0
    logs = {}
    for rank in range(nproc):
        found = {kind: glob.glob(os.path.join(str(log_dir), "*", "attempt_0", str(rank), f"{kind}.log"))
                 for kind in ("stdout", "stderr")}
        logs[rank] = {kind: open(paths[0]).read() if paths else "" for kind, paths in found.items()}
    return proc, logs, wall


@contextlib.contextmanager
def _one_thread():
    """The reference run with the thread count of each torchrun process (OMP_NUM_THREADS=1): the
    CPU convolution's summation order depends on it, so float32 values would differ in the last bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single(conf: str, run: str):
    with _one_thread():
        return pipeline.run(load_config(conf, {"run": run}))


def _winners(run_dir: str):
    """Per layer and channel: (image id, activation, y, x, box, box_clipped) of every winner; the
    bottom-k's under ``<layer>/bottom``."""
    d = json.load(open(os.path.join(run_dir, "results.json")))
    cols = ("image", "activation", "y", "x", "box", "box_clipped")
    out = {}
    for lr in d["layers"]:
        for key, part in ((lr["name"], lr), (lr["name"] + "/bottom", lr.get("bottom"))):
            if part is not None:
                out[key] = [list(zip(*(part["units"][c][i] for c in cols))) for i in range(len(part["units"]["channel"]))]
    return out


def _tile_files(run_dir: str):
    """Every channel's sprite (all projected: none is null)."""
    d = json.load(open(os.path.join(run_dir, "results.json")))
    sprites = [s for lr in d["layers"] for part in (lr, lr.get("bottom")) if part for s in part["units"]["sprite"]]
    assert sprites and None not in sprites
    return [os.path.join(run_dir, p) for p in sprites]


def test_two_processes_give_the_one_process_winners(tmp_path):
    conf = _write_config(tmp_path)
    ref = _single(conf, "single")
    proc, logs, wall = _torchrun(conf, "multi", tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = str(tmp_path / "out" / "multi")
    got, want = _winners(run_dir), _winners(ref.run_dir)
    assert got == want  # image ids, activations (exact: same float math), positions, boxes
    assert sum(len(c) for name, layer in want.items() for c in layer if not name.endswith("/bottom")) == (4 + 5 + 3) * 2
    assert sum(len(c) for name, layer in want.items() for c in layer if name.endswith("/bottom")) == (4 + 5 + 3) * 2
    for path in _tile_files(run_dir):  # every winner's tiles, byte-identical to the 1-process ones
        assert os.path.getsize(path) > 0
        rel = os.path.relpath(path, run_dir)
        assert open(path, "rb").read() == open(os.path.join(ref.run_dir, rel), "rb").read(), rel
    res = json.load(open(os.path.join(run_dir, "results.json")))
    assert res["status"] == "rendered" and res["stats"]["world"] == 2 and res["stats"]["images"] == 13
    assert [s["id"] for s in res["images"]["skipped"]] == [12] and res["images"]["readable"] == 12
    ranks = res["stats"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and [r["images"] for r in ranks] == [7, 6]  # shards 0,2,..,12 / 1,..,11
    for lr, rlr in zip(res["layers"], ref.results.to_dict()["layers"]):
        assert lr["sheets"] == rlr["sheets"] and lr["rf"] == rlr["rf"]
        for s in lr["sheets"]:
            assert os.path.getsize(os.path.join(run_dir, s)) > 0
    # per-rank checkpoints, one report, written by rank 0 only
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "mining_state*.pt"))) == \
        ["mining_state.rank0-of2.pt", "mining_state.rank1-of2.pt"]
    pages = [unit_pages.unit_page(lr.label, u.channel) for lr in ref.results.layers for u in lr.units]
    assert sorted(os.path.relpath(p, run_dir) for p in glob.glob(os.path.join(run_dir, "**", "*.html"), recursive=True)) \
        == sorted(["index.html"] + pages)
    for lr, rlr in zip(res["layers"], ref.results.to_dict()["layers"]):  # the ranks' unit statistics merged = one pass
        assert lr["unit_stats"]["hist"] == rlr["unit_stats"]["hist"] and lr["unit_stats"]["fired"] == rlr["unit_stats"]["fired"]
    text = open(os.path.join(run_dir, "run.log")).read()
    assert text.count("wrote 4 sheets and") == 1 and "[rank 0/2] wrote 4 sheets" in text
    assert "[rank 0/2] skipped unreadable image 12" in text
    assert "[rank 0/2] mining time split (7 images" in text and "[rank 1/2]" not in text  # one log per rank
    assert "[rank 1/2] mining time split (6 images" in open(os.path.join(run_dir, "run.rank1.log")).read()
    # only rank 0 talks: the summary on its stdout, nothing from rank 1 but warnings
    assert "run multi: 3 layers, 24 units, top-2 over 12 images (1 unreadable skipped)" in logs[0]["stdout"]
    assert "mining time (rank 1 of 2)" in logs[0]["stdout"]
    assert logs[1]["stdout"].strip() == ""
    assert [ln for ln in logs[1]["stderr"].splitlines() if ln.startswith("deconvis")] == []  # no INFO lines
    assert "deconvis: visualize: run multi" in logs[0]["stderr"] and "deconvis: projecting" in logs[0]["stderr"]


#: the failure test's --dist-timeout: a rank that were not told of the other's failure would wait
#: this long, so a run that ends sooner shows the failure was shared (and the test cannot pass by
#: the subprocess timeout, which raises instead)
FAIL_DIST_TIMEOUT = 150


def test_a_failure_on_one_rank_ends_every_rank_with_the_same_error(tmp_path):
    conf = _write_config(tmp_path, dist_timeout=FAIL_DIST_TIMEOUT)
    proc, logs, wall = _torchrun(conf, "fail", tmp_path / "logs", "--batch-size", "1",
                                 fail="1")
    assert proc.returncode != 0
    want = ("deconvis: error: rank 1 of 2 failed during mining: RuntimeError: DECONVIS_TEST_FAIL_RANK: simulated "
            "failure in the mining forward of batch 1 on rank 1")
    for rank in (0, 1):
        lines = [ln for ln in logs[rank]["stderr"].splitlines() if ln.startswith("deconvis: error:")]
        assert lines == [want], (rank, logs[rank]["stderr"][-2000:])
        assert "Traceback" not in logs[rank]["stderr"]
    # torchrun lists both processes as failed (exit code 2: the CLI's DeconvisError code)
    summary = proc.stderr[proc.stderr.find("Failures:"):]
    assert "rank      : 0" in summary and "rank      : 1" in summary and "exitcode  : 2" in summary
    assert not os.path.exists(tmp_path / "out" / "fail" / "results.json")
    assert wall < FAIL_DIST_TIMEOUT  # ended by the shared failure, not by rank 0 timing out
    # a small distributed resume (the slow test below repeats it with a checkpoint per image):
    # the rerun continues each rank's checkpoint and ends with the one-process winners, no image
    # counted twice
    run_dir = tmp_path / "out" / "fail"
    assert sorted(os.listdir(run_dir)).count("mining_state.rank0-of2.pt") == 1
    proc, logs, _ = _torchrun(conf, "fail", tmp_path / "logs2", "--batch-size", "1")
    assert proc.returncode == 0, logs[0]["stderr"][-3000:]
    with _one_thread():  # same batch size and threads as the ranks: same float32 values
        ref = pipeline.run(load_config(conf, {"run": "single", "batch_size": 1}))
    assert _winners(str(run_dir)) == _winners(ref.run_dir)
    assert json.load(open(run_dir / "results.json"))["stats"]["images"] == 13


def test_projection_resume_keeps_every_ranks_finished_channels(tmp_path):
    """A crash during a 2-rank projection: each rank's progress file lists the channels whose
    sprite it wrote; the rerun merges both and projects only the others (rank 1's finished
    channels are not projected again), ending with the one-process sprites."""
    conf = _write_config(tmp_path)
    ref = _single(conf, "single")
    run_dir = tmp_path / "out" / "multi"
    # rank 1 fails at its 6th projected unit (k=2: its first channels are written by then)
    proc, logs, _ = _torchrun(conf, "multi", tmp_path / "logs1", fail="1:6:project")
    assert proc.returncode != 0 and "failed during projection" in logs[0]["stderr"], logs[0]["stderr"][-2000:]
    done = {}
    for r in (0, 1):
        d = json.load(open(run_dir / f"projection.rank{r}.json"))
        done[r] = {(e[0], e[1]): len(e[5]) for e in d["channels"]}
        assert done[r] and all((run_dir / e[2]).is_file() for e in d["channels"]), r
    assert not set(done[0]) & set(done[1])  # whole channels, split between the ranks
    total = (4 + 5 + 3) * 2
    proc, logs, _ = _torchrun(conf, "multi", tmp_path / "logs2")
    assert proc.returncode == 0, logs[0]["stderr"][-3000:]
    left = total - sum(done[0].values()) - sum(done[1].values())
    text = open(run_dir / "run.log").read()
    assert f"[rank 0/2] projecting {left} units (rule deconvnet) on 2 processes" in text, text[-3000:]
    assert f"run multi: 3 layers, {total} units" in logs[0]["stdout"]
    assert _winners(str(run_dir)) == _winners(ref.run_dir)
    for path in _tile_files(str(run_dir)):
        rel = os.path.relpath(path, run_dir)
        assert open(path, "rb").read() == open(os.path.join(ref.run_dir, rel), "rb").read(), rel
    assert not list(run_dir.glob("projection.rank*.json"))  # merged into results.json, then removed


@pytest.mark.slow
def test_per_rank_checkpoints_resume_without_double_counting(tmp_path):
    conf = _write_config(tmp_path, batch_size=1)
    ref = _single(conf, "single")
    run_dir = tmp_path / "out" / "multi"
    # rank 1 dies in its 3rd batch, after checkpointing 2 (checkpoint_every=1)
    proc, logs, _ = _torchrun(conf, "multi", tmp_path / "logs1", fail="1:3")
    assert proc.returncode != 0 and "rank 1 of 2 failed during mining" in logs[0]["stderr"]
    st1 = torch.load(run_dir / "mining_state.rank1-of2.pt", weights_only=True)
    assert st1["topk"]["seen"] == 2 and not st1["complete"] and (st1["rank"], st1["world"]) == (1, 2)
    st0 = torch.load(run_dir / "mining_state.rank0-of2.pt", weights_only=True)
    done0 = st0["topk"]["seen"]
    assert 1 <= done0 <= 7
    # another number of processes cannot continue these checkpoints
    with pytest.raises(DeconvisError, match=r"mining checkpoint of a 2-process run .* restart with 2 processes"):
        pipeline.run(load_config(conf, {"run": "multi"}))
    proc, logs, _ = _torchrun(conf, "multi", tmp_path / "logs2")
    assert proc.returncode == 0, logs[0]["stderr"][-3000:]
    assert _winners(str(run_dir)) == _winners(ref.run_dir)
    res = json.load(open(run_dir / "results.json"))
    assert res["stats"]["images"] == 13  # 7 + 6: nothing counted twice
    split = {r["rank"]: r["split"]["images"] for r in res["stats"]["ranks"]}
    assert split == {0: 7 - done0, 1: 4}  # each rank streamed only the rest of its shard
    text = open(run_dir / "run.rank1.log").read()
    assert "[rank 1/2] resuming mining at item 2 of 6 (this rank's shard of 13)" in text
    for path in _tile_files(str(run_dir)):
        assert os.path.getsize(path) > 0


def test_checkpoint_of_another_world_size_is_an_error_unless_fresh(tmp_path):
    cfg = fx.tiny_config(tmp_path)
    run_dir = os.path.join(cfg.out, cfg.run)
    os.makedirs(run_dir)
    open(os.path.join(run_dir, "mining_state.rank1-of4.pt"), "wb").close()
    with pytest.raises(DeconvisError, match=r"4-process run \(mining_state.rank1-of4.pt\) but this run has 1 process"):
        pipeline.run(cfg)
    out = pipeline.run(dataclasses.replace(cfg, fresh=True))
    assert out.mined and not os.path.exists(os.path.join(run_dir, "mining_state.rank1-of4.pt"))
    assert os.path.isfile(os.path.join(run_dir, "mining_state.pt"))


# ---------------------------------------------------------------------------------------------
# one device, fast

def _acts_of(res):
    return {lr.name: [[(w.image, w.activation) for w in u.winners] for u in lr.units] for lr in res.layers}


def _same_up_to_close_ties(a, b, tol):
    """Winners equal up to ``tol`` times the layer's largest activation, and images may swap
    only where their activations are that close."""
    for name in a:
        scale = max(abs(v) for row in b[name] for _, v in row) or 1.0
        atol = tol * scale
        for ra, rb in zip(a[name], b[name]):
            va, vb = np.array([v for _, v in ra]), np.array([v for _, v in rb])
            assert np.allclose(va, vb, rtol=0, atol=atol), (name, ra, rb)
            for (ia, x), (ib, _) in zip(ra, rb):
                if ia != ib:  # a swap is only allowed between near-equal values
                    assert any(abs(x - v) <= atol for i, v in rb if i == ia) or \
                        abs(x - min(v for _, v in rb)) <= atol, (name, ra, rb)


def test_channels_last_mines_the_same_winners(tmp_path):
    base = pipeline.run(fx.tiny_config(tmp_path, run="base"))
    cl = pipeline.run(fx.tiny_config(tmp_path, run="cl", channels_last=True))
    _same_up_to_close_ties(_acts_of(cl.results), _acts_of(base.results), tol=1e-5)
    # the model is back in the usual layout for the projections: the tiles are the same
    for lr, blr in zip(cl.results.layers, base.results.layers):
        for u, bu in zip(lr.units, blr.units):
            for w, bw in zip(u.winners, bu.winners):
                if w.image == bw.image:
                    assert w.box == bw.box


def test_bf16_autocast_on_cpu_is_close_to_float32(tmp_path):
    base = pipeline.run(fx.tiny_config(tmp_path, run="base"))
    out = pipeline.run(fx.tiny_config(tmp_path, run="bf16", amp="bf16", amp_pool=0))  # no fp32 re-rank
    assert out.results.mining_identity["amp"] == "bf16" and "amp" not in base.results.mining_identity
    # bf16 keeps 8 bits of mantissa: values within a few per cent of the layer's scale, winners
    # equal up to such near-ties
    _same_up_to_close_ties(_acts_of(out.results), _acts_of(base.results), tol=3e-2)
    assert any(w.activation != bw.activation for lr, blr in zip(out.results.layers, base.results.layers)
               for u, bu in zip(lr.units, blr.units) for w, bw in zip(u.winners, bu.winners))  # really bf16
    assert out.results.stats["precision"]["activation"] == "bf16"
    with pytest.raises(DeconvisError, match=r"different configuration \(amp: 'bf16' -> None"):
        pipeline.run(fx.tiny_config(tmp_path, run="bf16"))


def test_bf16_candidates_re_ranked_in_fp32_give_the_fp32_winners(tmp_path, monkeypatch):
    """amp_pool=2: 6 bf16 candidates of 12 images per channel, re-ranked in fp32: the winners,
    positions and activations of the fp32 run on every channel whose pool is certain (the
    per-channel doubt the run computed), fp32 values in results."""
    from deconvis.mining import rerank

    masks, real = {}, rerank.uncertain_mask
    monkeypatch.setattr(rerank, "uncertain_mask", lambda *a, **k: masks.update(real(*a, **k)) or real(*a, **k))
    base = pipeline.run(fx.tiny_config(tmp_path, run="base"))
    out = pipeline.run(fx.tiny_config(tmp_path, run="pool", amp="bf16", amp_pool=2))
    prec = out.results.stats["precision"]
    assert prec["activation"] == "float32" and "among 6 bf16 candidates" in prec["ranking"]
    assert out.results.mining_identity["amp_pool"] == 2
    checked = 0
    for lr, blr in zip(out.results.layers, base.results.layers):
        doubt = masks[lr.name]
        assert prec["uncertain_channels"].get(lr.label, 0) == int(doubt.sum()), lr.label
        for u, bu in zip(lr.units, blr.units):
            if doubt[u.channel]:
                continue
            checked += 1
            assert u.channel == bu.channel
            assert [(w.image, w.y, w.x) for w in u.winners] == [(w.image, w.y, w.x) for w in bu.winners], \
                (lr.label, u.channel)
            for w, bw in zip(u.winners, bu.winners):
                assert w.activation == pytest.approx(bw.activation, rel=1e-5)
    assert checked >= len(out.results.layers)  # every layer has certain channels checked
    assert out.results.stats["replay"]["mismatches"] == 0 and out.results.stats["replay"]["checked"] == 72  # + bottom-k


def test_fp16_needs_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(mining, "mine", lambda *a, **k: pytest.fail("mining started"))
    with pytest.raises(DeconvisError, match="--amp fp16 needs a CUDA device but this run is on cpu"):
        pipeline.run(fx.tiny_config(tmp_path, amp="fp16"))


def test_time_split_is_logged_and_saved(tmp_path):
    out = pipeline.run(fx.tiny_config(tmp_path, profile=True))
    t = out.mining
    assert t.images == 12 and t.batches == 4 and t.clock == "host"
    assert t.load > 0 and t.forward > 0 and t.topk > 0 and t.total >= t.load + t.forward + t.topk
    assert len(t.per_batch) == 4 and abs(sum(b[1] for b in t.per_batch) - t.forward) < 1e-6
    split = out.results.stats["mining_split"]
    assert split["images"] == 12 and split["forward"] == pytest.approx(t.forward, abs=1e-4)
    text = open(os.path.join(out.run_dir, "run.log")).read()
    assert "mining time split (12 images" in text and "load " in text and "top-k " in text
    assert text.count("batch ") >= 4 and "batch 4: load" in text  # profile: per-batch lines


def test_auto_projection_batches_give_the_same_tiles(tmp_path):
    auto = pipeline.run(fx.tiny_config(tmp_path, run="auto", project_batch=0))
    fixed = pipeline.run(fx.tiny_config(tmp_path, run="fixed", project_batch=2))
    assert pipeline.project_chunk(pipeline.prepare(fx.tiny_config(tmp_path), auto.run_dir)) >= 16
    for path in _tile_files(fixed.run_dir):
        rel = os.path.relpath(path, fixed.run_dir)
        assert open(path, "rb").read() == open(os.path.join(auto.run_dir, rel), "rb").read(), rel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mining_has_no_host_sync_per_batch(tmp_path):
    from deconvis.io.images import FolderImages, ImageDataset, make_loader
    from deconvis.mirror.deconvnet import DeconvNet
    from deconvis.io.models import Preprocess

    fx.write_images(tmp_path / "imgs")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(4, 5, 3), torch.nn.ReLU()).cuda().eval()
    dn = DeconvNet(model)
    pp = Preprocess(resize=32, crop=(32, 32))
    loader = make_loader(ImageDataset(FolderImages(str(tmp_path / "imgs")), pp), 3, pin_memory=True)
    topk = mining.TopK(["1", "4"], 2, "cuda")
    times = mining.MiningTimes()
    batches = list(loader)
    torch.cuda.set_sync_debug_mode("error")
    try:
        mining.mine(lambda x: dn.activations(x, ["1", "4"]), batches, topk, progress=False, times=times)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert times.clock == "cuda-events" and times.forward > 0 and topk.seen == 12



def test_analyses_run_once_on_rank_0(tmp_path):
    """--analyses under torchrun: rank 0 runs them after the sheets, the other rank waits; one record."""
    conf = _write_config(tmp_path)
    proc, logs, _ = _torchrun(conf, "an", tmp_path / "logs", "--analyses", "diagnose")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "an"
    res = json.load(open(run_dir / "results.json"))
    assert res["analyses"]["diagnose"]["status"] == "done" and res["status"] == "rendered"
    assert (run_dir / res["analyses"]["diagnose"]["files"]["png"]).stat().st_size > 0
    text = open(run_dir / "run.log").read()
    assert text.count("analysis diagnose:") == 1 and "[rank 0/2] analysis diagnose:" in text
    assert 'id="A-diagnose"' in open(run_dir / "index.html").read()


def test_an_overflowed_activation_is_re_ranked_through_the_pipeline(tmp_path, monkeypatch):
    """The mining forward under autocast returns +inf for the fp32 winner of a channel (an fp16
    overflow, emulated on the CPU's bf16): the re-rank still makes it that channel's winner with
    its fp32 value, and the overflow is counted."""
    from deconvis.io.images import ImageDataset
    from deconvis.runs.phases import mine as mine_phase

    base = pipeline.run(fx.tiny_config(tmp_path, run="base"))
    lr = base.results.layers[-1]
    top = lr.units[0].winners[0]
    ctx = pipeline.prepare(fx.tiny_config(tmp_path), str(tmp_path / "probe"))
    target = ImageDataset(ctx.source, ctx.preprocess)[top.image][0]
    real = mine_phase.mining_forward

    def overflowing(c):
        forward = real(c)

        def wrapped(x):
            acts = dict(forward(x))
            hit = torch.tensor([torch.equal(row, target) for row in x.float()])
            if hit.any():
                a = acts[lr.name].clone()
                a[hit, 0, 0, 0] = float("inf")
                acts[lr.name] = a
            return acts
        return wrapped

    monkeypatch.setattr(mine_phase, "mining_forward", overflowing)
    out = pipeline.run(fx.tiny_config(tmp_path, run="amp", amp="bf16", amp_pool=2))
    got = next(layer for layer in out.results.layers if layer.name == lr.name).units[0].winners[0]
    assert got.image == top.image and got.activation == pytest.approx(top.activation, rel=1e-5)
    assert out.results.stats["nonfinite"][lr.label]["channels"]["0"] >= 1


def test_identical_images_tie_exactly_when_one_lands_in_a_short_batch(tmp_path, monkeypatch):
    """Images 2 and 9 are byte copies; with 10 images in batches of 4, image 9 is in the short
    last batch. Under a forward whose last bits depend on the batch shape (cuDNN/oneDNN pick
    kernels by shape) the mining pads that batch, so the two tie and image 2 comes first."""
    from deconvis.runs.phases import mine as mine_phase

    real = mine_phase.mining_forward

    def shape_dependent(c):
        forward = real(c)
        return lambda x: {n: a * (1.0 - 1e-6 * x.shape[0]) for n, a in forward(x).items()}

    monkeypatch.setattr(mine_phase, "mining_forward", shape_dependent)
    out = pipeline.run(fx.tiny_config(tmp_path, batch_size=4, max_images=10))
    both = [[w.image for w in u.winners] for lr in out.results.layers for u in lr.units
            if {2, 9} <= {w.image for w in u.winners}]
    assert both and all(imgs.index(2) < imgs.index(9) for imgs in both), both
