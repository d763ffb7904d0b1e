"""Checks that need a CUDA GPU (skipped without one): what the CPU tests of the GPU paths cannot
show. Run them whenever a GPU is at hand:

    PYTHONPATH=. python -m pytest -q tests/test_cuda.py

Each compares the GPU against an independent reference (the CPU in float64/float32, or fp32 on
the GPU itself) on the tiny pipeline net and small tensors, so the whole file takes seconds.
"""
from __future__ import annotations

import os

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


def test_cuda_n_becomes_current_and_event_times_are_read():
    n = torch.cuda.device_count() - 1
    d = torch.device("cuda", n)
    dev.activate(d)
    assert torch.cuda.current_device() == n
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
