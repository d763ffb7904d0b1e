"""Checks that need a CUDA GPU (skipped without one): what the CPU tests of the GPU paths cannot
show. Run them whenever a GPU is at hand:

    PYTHONPATH=. python -m pytest -q tests/test_cuda.py

Each compares the GPU against an independent reference (the CPU in float64/float32, or fp32 on
the GPU itself) on the tiny pipeline net and small tensors, so the whole file takes seconds.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import warnings

import cv2
import numpy as np
import pytest
import torch

import pipeline_fixtures as fx
from deconvis.render.sheets import load_tile
from deconvis.mining import MiningTimes, TopK, mine
from deconvis.mining.nonfinite import nonfinite_summary
from deconvis.render.display import to_uint8, to_uint8_tensor
from deconvis.runs import pipeline
from deconvis.utils import device as dev

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _keep_current_device():
    """Every test leaves the current CUDA device as it found it (a test that makes the last GPU
    current must not move the later tests there)."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.cuda.current_device()
    try:
        yield
    finally:
        torch.cuda.set_device(before)


def _winners(res):
    return [[(w.image, w.y, w.x) for u in lr.units for w in u.winners] for lr in res.layers]


def test_fp16_overflow_on_the_gpu_never_wins_and_is_counted():
    """A real fp16 autocast conv overflowing above 65504: no winner is inf, the count names it."""
    conv = torch.nn.Conv2d(1, 2, 1, bias=False).cuda()
    with torch.no_grad():
        conv.weight[:] = torch.tensor([1000.0, 1.0]).view(2, 1, 1, 1)
    x = torch.full((4, 1, 3, 3), 10.0, device="cuda")
    x[2] = 100.0  # channel 0: 100000 > 65504 -> inf in fp16
    with torch.autocast("cuda", dtype=torch.float16):
        topk = mine(lambda b: {"c": conv(b)}, [(x, torch.arange(4))], TopK(["c"], 4, "cuda"), progress=False)
    w = topk.winners("c")
    assert torch.isfinite(w["values"][w["valid"]]).all()
    assert 2 not in w["images"][0][w["valid"][0]].tolist() and w["images"][1][0] == 2
    assert nonfinite_summary(topk)["c"]["channels"] == {0: 1}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: on one, cuda:0 is current anyway")
def test_cuda_n_becomes_current():
    n = torch.cuda.device_count() - 1
    torch.cuda.set_device(0)
    dev.activate(torch.device("cuda", n))
    assert torch.cuda.current_device() == n  # (the fixture puts GPU 0 back)
    torch.cuda.set_device(0)
    assert dev.use_device(f"cuda:{n}") == torch.device("cuda", n) and torch.cuda.current_device() == n


def test_event_times_are_read_on_the_current_device():
    d = torch.device("cuda", torch.cuda.current_device())
    conv = torch.nn.Conv2d(3, 8, 3).to(d)
    times = MiningTimes()
    batches = [(torch.randn(16, 3, 64, 64), torch.arange(16 * i, 16 * i + 16)) for i in range(4)]
    mine(lambda b: {"c": conv(b)}, batches, TopK(["c"], 3, d), times=times, progress=False)
    assert times.clock == "cuda-events" and times.forward > 0 and times.topk > 0


def test_fp32_mining_on_the_gpu_matches_the_cpu_with_tf32_off(tmp_path):
    cpu = pipeline.run(fx.tiny_config(tmp_path, run="cpu"))
    gpu = pipeline.run(fx.tiny_config(tmp_path, run="gpu", device="cuda"))
    assert gpu.results.mining_identity["device"] == "cuda" and "device" not in cpu.results.mining_identity
    assert _winners(gpu.results) == _winners(cpu.results)
    for lr, clr in zip(gpu.results.layers, cpu.results.layers):
        for u, cu in zip(lr.units, clr.units):
            for w, cw in zip(u.winners, cu.winners):
                assert w.activation == pytest.approx(cw.activation, rel=1e-4)
                assert w.box == cw.box
    assert gpu.results.stats["replay"]["mismatches"] == 0
    assert gpu.results.stats["precision"]["mining_forward"] == "float32"
    with dev.tf32(True):  # the run restores the caller's TF32 policy
        pipeline.run(fx.tiny_config(tmp_path, run="gpu", device="cuda"))
        assert torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_candidates_re_ranked_in_fp32_on_the_gpu(tmp_path, amp):
    if amp == "bf16" and not dev.bf16_native(torch.device("cuda")):
        pytest.skip("no native bf16 on this GPU")
    ref = pipeline.run(fx.tiny_config(tmp_path, run="fp32", device="cuda"))
    out = pipeline.run(fx.tiny_config(tmp_path, run=amp, device="cuda", amp=amp, amp_pool=3))
    doubt = out.results.stats["precision"]["uncertain_channels"]
    for got, want, lr in zip(_winners(out.results), _winners(ref.results), out.results.layers):
        if lr.label not in doubt:
            assert got == want, lr.label
    assert out.results.stats["replay"]["mismatches"] == 0


def test_tf32_flag_changes_the_identity_and_is_applied(tmp_path):
    cfg = fx.tiny_config(tmp_path, run="tf32", device="cuda", tf32=True)
    ctx = pipeline.prepare(cfg, str(tmp_path / "x"))
    assert ctx.identity.fields["tf32"] is True
    seen = []
    fwd = pipeline.mining_forward(ctx)
    real = ctx.dn.activations

    def spy(x, layers):
        seen.append(torch.backends.cudnn.allow_tf32)
        return real(x, layers)

    ctx.dn.activations = spy
    with dev.tf32(False):
        fwd(torch.zeros(1, 3, fx.SIZE, fx.SIZE, device="cuda"))
        assert not torch.backends.cudnn.allow_tf32
    assert seen == [True]


def test_uint8_tiles_built_on_the_gpu_equal_the_host_ones():
    rec = torch.randn(6, 3, 17, 9, dtype=torch.float32)
    assert np.array_equal(to_uint8_tensor(rec.cuda()).cpu().numpy(), to_uint8(rec))


def test_memory_budget_and_bf16_answer_from_the_device():
    d = torch.device("cuda")
    keep = torch.empty(64 << 20, dtype=torch.uint8, device=d)
    del keep  # now cached, not free: still counted
    free, _ = torch.cuda.mem_get_info(d)
    assert dev.memory_budget(d, fraction=1.0) >= free
    major, _ = torch.cuda.get_device_capability(d)
    assert dev.bf16_native(d) == (major >= 8)


def test_two_processes_on_one_gpu_are_refused(monkeypatch):
    from deconvis.errors import DeconvisError
    from deconvis.runs import distributed as D

    n = torch.cuda.device_count()
    for key, val in (("RANK", n), ("WORLD_SIZE", n + 1), ("LOCAL_RANK", n), ("LOCAL_WORLD_SIZE", n + 1)):
        monkeypatch.setenv(key, str(val))
    with pytest.raises(DeconvisError, match="processes on this node but only"):
        D.init(torch.device("cuda"), timeout_s=5)


def test_projection_on_the_gpu_gives_the_cpu_tiles(tmp_path):
    cpu = pipeline.run(fx.tiny_config(tmp_path, run="cpu"))
    gpu = pipeline.run(fx.tiny_config(tmp_path, run="gpu2", device="cuda"))

    for lr, clr in zip(gpu.results.layers, cpu.results.layers):
        for u, cu in zip(lr.units, clr.units):
            for w, cw in zip(u.winners, cu.winners):
                if (w.image, w.y, w.x) != (cw.image, cw.y, cw.x):
                    continue
                a = load_tile(gpu.run_dir, lr, u, w, "rec")
                b = load_tile(cpu.run_dir, clr, cu, cw, "rec")
                assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # round-off may move a grey level


# -- two ranks sharing one GPU ----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, world: int, port: int, tmp: str) -> None:
    """Each rank is 'alone on its node' (LOCAL_WORLD_SIZE=1), so both take cuda:0; the caller's
    gloo process group carries the control plane; the ranks' CUDA top-k states are gathered."""
    from deconvis.runs.config import load_config
    from deconvis.runs import distributed as D

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        info = D.DistInfo(rank=rank, world=world, device=torch.device("cuda", 0), timeout_s=120)
        part = TopK(["l"], 2, "cuda")
        acts = torch.arange(24.0, device="cuda").reshape(6, 1, 2, 2)  # image i: max 4i+3
        ids = torch.tensor(list(D.ShardSampler(6, rank, world)))
        part.update({"l": acts[ids.to(acts.device)]}, ids)
        merged = D.gather_topk(part, info)
        cfg = load_config(None, {"model": os.path.join(tmp, "tinynet.py") + ":make", "weights": "random",
                                 "images": os.path.join(tmp, "imgs"), "k": 3, "batch_size": 3, "resize": fx.SIZE,
                                 "crop": fx.SIZE, "out": os.path.join(tmp, "out"), "run": "two", "progress": False,
                                 "checkpoint_every": 1, "min_tile": 8, "max_tile": 32, "per_sheet": 4,
                                 "device": "cuda"})
        out = pipeline.run(cfg)
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump({"merged": merged.winners("l")["images"].tolist(), "device": str(merged.device),
                       "winners": [[(w.image, w.y, w.x) for u in lr.units for w in u.winners]
                                   for lr in out.results.layers]}, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_share_one_gpu(tmp_path):
    import torch.multiprocessing as mp

    ref = pipeline.run(fx.tiny_config(tmp_path, run="one", device="cuda"))  # also writes the net and images
    mp.spawn(_two_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    run_dir = tmp_path / "out" / "two"
    assert sorted(p.name for p in run_dir.glob("mining_state*.pt")) == ["mining_state.rank0-of2.pt",
                                                                         "mining_state.rank1-of2.pt"]
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["merged"] == [[5, 4]] and got["device"].startswith("cuda")
        assert [[tuple(w) for w in layer] for layer in got["winners"]] == _winners(ref.results)
    assert (run_dir / "run.rank1.log").is_file()


# -- out of memory, for real --------------------------------------------------------------------

def test_real_out_of_memory_halves_the_mining_chunk_and_the_projection_batch():
    """With the process capped at ~300 MB, a 64-image mining batch and a 64-unit projection batch
    run out of memory for real; both halve and give the uncapped results."""
    from deconvis.mirror.deconvnet import DeconvNet

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU()).cuda().eval()
    x = torch.randn(64, 3, 192, 192)
    ids = torch.arange(64)
    dn = DeconvNet(model)
    dev_index = torch.cuda.current_device()
    with dev.tf32(False):  # full fp32: other batch sizes pick other kernels, equal to round-off
        ref = TopK(["3"], 2, "cuda")
        for s in range(0, 64, 4):  # the oracle: small batches, no cap
            mine(lambda b: dn.activations(b, ["3"]), [(x[s:s + 4], ids[s:s + 4])], ref, progress=False)
        dn.forward(x[:2].cuda())
        units = torch.tensor([[i % 2, i % 64, (7 * i) % 192, (11 * i) % 192] for i in range(64)])
        want = torch.cat([dn.project("3", units[s:s + 4], batch_size=4) for s in range(0, 64, 4)]).cpu()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(dev_index).total_memory
        cap = (torch.cuda.memory_reserved() + (300 << 20)) / total
        torch.cuda.set_per_process_memory_fraction(cap)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = mine(lambda b: dn.activations(b, ["3"]), [(x, ids)], TopK(["3"], 2, "cuda"), progress=False,
                           batch_size=64)
                dn.forward(x[:2].cuda())
                rec = dn.project("3", units, batch_size=64).cpu()
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    text = [str(w.message) for w in caught]
    assert any("out of memory while mining: forwarding" in t for t in text), text
    assert any("out of memory: retrying with projection batch size" in t for t in text), text
    for f in ("images", "ys", "xs"):
        assert torch.equal(got.winners("3")[f], ref.winners("3")[f]), f
    assert torch.allclose(got.winners("3")["values"], ref.winners("3")["values"], rtol=1e-5)
    assert torch.allclose(rec, want, rtol=1e-4, atol=1e-6)


# -- the pipeline on CUDA -------------------------------------------------------------------------

def test_channels_last_on_cuda_mines_the_same_winners(tmp_path):
    from test_pipeline_distributed import _acts_of, _same_up_to_close_ties

    base = pipeline.run(fx.tiny_config(tmp_path, run="base", device="cuda"))
    cl = pipeline.run(fx.tiny_config(tmp_path, run="cl", device="cuda", channels_last=True))
    _same_up_to_close_ties(_acts_of(cl.results), _acts_of(base.results), tol=1e-5)
    assert cl.results.stats["replay"]["mismatches"] == 0


def test_resume_from_a_cuda_mining_checkpoint(tmp_path, monkeypatch):
    """Mining on the GPU stops in its 3rd batch (after checkpointing 2); the rerun loads the
    checkpoint onto the GPU and ends with the uninterrupted run's winners."""
    from deconvis.runs.phases import mine as mine_phase

    ref = pipeline.run(fx.tiny_config(tmp_path, run="ref", device="cuda"))
    real = mine_phase.mining_forward

    def failing(ctx):
        forward, calls = real(ctx), [0]

        def wrapped(x):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("simulated crash in batch 3")
            return forward(x)
        return wrapped

    monkeypatch.setattr(mine_phase, "mining_forward", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(fx.tiny_config(tmp_path, run="resumed", device="cuda"))
    monkeypatch.setattr(mine_phase, "mining_forward", real)
    run_dir = tmp_path / "out" / "resumed"
    assert torch.load(run_dir / "mining_state.pt", weights_only=True)["topk"]["seen"] == 6
    out = pipeline.run(fx.tiny_config(tmp_path, run="resumed", device="cuda"))
    assert out.mined and out.mining.images == 6  # only the rest
    assert _winners(out.results) == _winners(ref.results)
    assert "resuming mining at item 6 of 12" in (run_dir / "run.log").read_text()


def test_an_unreadable_image_inside_a_pinned_batch(tmp_path):
    """A broken file sorted into the middle of the set, loaded by workers into pinned batches:
    skipped and named; the other images' winners are those of the set without it."""
    images = tmp_path / "imgs"
    fx.write_images(images)
    clean = pipeline.run(fx.tiny_config(tmp_path, run="clean", device="cuda", workers=2, batch_size=4))
    (images / "img05b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = pipeline.run(fx.tiny_config(tmp_path, run="broken", device="cuda", workers=2, batch_size=4))
    assert [s["id"] for s in out.results.images["skipped"]] == [6]

    def by_name(res):
        return [[(w.source, w.y, w.x) for u in lr.units for w in u.winners] for lr in res.layers]

    assert by_name(out.results) == by_name(clean.results)
    assert "skipped unreadable image 6:" in open(os.path.join(out.run_dir, "run.log")).read()


def test_no_host_sync_while_mining_and_re_ranking_through_the_pipeline(tmp_path, monkeypatch):
    """The real pipeline under fp16 autocast with the fp32 re-rank: the mining loop and the
    re-rank loop run with CUDA sync debugging set to error (any host sync raises)."""
    from deconvis import mining
    from deconvis.runs import precision

    def strict(real):
        def run(*a, **k):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return real(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    monkeypatch.setattr(mining, "mine", strict(mining.mine))
    monkeypatch.setattr(precision, "mine", strict(precision.mine))
    out = pipeline.run(fx.tiny_config(tmp_path, device="cuda", amp="fp16", amp_pool=2, checkpoint_every=0,
                                      checkpoint_seconds=0, profile=False))
    assert out.mined and out.mining.clock == "cuda-events"
    assert "among 6 fp16 candidates" in out.results.stats["precision"]["ranking"]


# -- occlusion and projection on CUDA -----------------------------------------------------------

def _small_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()


def test_occlusion_on_cuda_equals_the_cpu():
    from deconvis.analysis.occlusion import occlusion

    model = _small_classifier().double()
    image = torch.rand(3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cpu = occlusion(model, image, layer="3", size=6, stride=3, batch_size=7)
    gpu = occlusion(model.cuda(), image.cuda(), layer="3", size=6, stride=3, batch_size=7)
    for name in ("activation", "probability", "top_probability", "projection"):
        np.testing.assert_allclose(getattr(gpu, name), getattr(cpu, name), rtol=1e-9, atol=1e-12, err_msg=name)
    assert gpu.channel == cpu.channel and gpu.target == cpu.target
    assert np.array_equal(gpu.top_class, cpu.top_class)


def test_windowed_projection_equals_the_full_one_on_cuda():
    from deconvis.mirror.deconvnet import DeconvNet

    model = _small_classifier().double().cuda()
    dn = DeconvNet(model)
    x = torch.rand(2, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).cuda()
    dn.forward(x)
    H, W = x.shape[-2:]
    for layer in ("1", "4"):
        units = dn.strongest(layer, 3)
        full = dn.project(layer, units)
        rec, boxes = dn.project_window(layer, units)
        assert rec.is_cuda and full.is_cuda
        pasted = torch.zeros_like(full)
        for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
            cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
            pasted[i, :, cy0:cy1, cx0:cx1] = rec[i, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        assert float(full.abs().max()) > 0
        assert torch.allclose(pasted, full, rtol=1e-10, atol=1e-12), layer
