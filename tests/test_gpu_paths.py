"""The CUDA/NCCL code paths, checked on the CPU: device selection and refusal, the gloo side
group, TF32 policy, worker and memory defaults, the replay verdict, tiles waited for (fake clock)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from deconvis.errors import DeconvisError
from deconvis.render.projection import Replay
from deconvis.render.sheets import TileJob
from deconvis.runs import distributed as D
from deconvis.runs import precision, projection
from deconvis.runs.config import load_config
from deconvis.runs.results import finite_json
from deconvis.utils import device as dev

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two visible GPUs (as far as deconvis asks); records set_device and process-group calls."""
    calls = {"set_device": [], "init": [], "new_group": []}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls["init"].append(backend))
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: calls["new_group"].append(backend) or "gloo-group")
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    return calls


def _torchrun_env(monkeypatch, rank, world, local, local_world):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))


def test_nccl_run_gets_a_gloo_side_group_and_its_own_gpu(fake_cuda, monkeypatch):
    _torchrun_env(monkeypatch, rank=3, world=4, local=1, local_world=2)
    info = D.init(torch.device("cuda"), timeout_s=5)
    assert info.device == torch.device("cuda", 1) and fake_cuda["set_device"] == [torch.device("cuda", 1)]
    assert fake_cuda["init"] == ["nccl"] and fake_cuda["new_group"] == ["gloo"]
    assert info.group == "gloo-group" and info == D.DistInfo(rank=3, world=4, local_rank=1, device=info.device,
                                                             timeout_s=5, local_world=2)  # group: not compared


def test_gloo_run_needs_no_side_group(fake_cuda, monkeypatch):
    _torchrun_env(monkeypatch, rank=0, world=2, local=0, local_world=2)
    info = D.init(torch.device("cpu"), timeout_s=5)
    assert fake_cuda["init"] == ["gloo"] and fake_cuda["new_group"] == [] and info.group is None


@pytest.mark.parametrize("local,local_world", [(2, 3), (0, 3), (2, 1)])
def test_more_processes_than_gpus_are_refused_at_the_start(fake_cuda, monkeypatch, local, local_world):
    _torchrun_env(monkeypatch, rank=local, world=3, local=local, local_world=local_world)
    with pytest.raises(DeconvisError, match=r"processes on this node but only 2 GPUs visible.*--nproc_per_node=2"):
        D.init(torch.device("cuda"), timeout_s=5)
    assert fake_cuda["init"] == [] and fake_cuda["set_device"] == []


def test_one_process_on_cuda_n_makes_it_the_current_device(fake_cuda):
    D.init(torch.device("cuda", 1))
    D.init(torch.device("cuda"))  # plain "cuda": the current device stays
    D.init(torch.device("cpu"))
    assert fake_cuda["set_device"] == [torch.device("cuda", 1)]


def test_bf16_support_means_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))  # Turing: emulated only
    assert not dev.bf16_native(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert dev.bf16_native(torch.device("cuda")) and dev.bf16_native(torch.device("cpu"))


def test_workers_default_from_the_cpu_count_on_cuda():
    assert dev.default_workers(torch.device("cpu"), cpus=32) == 0
    assert dev.default_workers(torch.device("cuda"), cpus=32) == 8
    assert dev.default_workers(torch.device("cuda"), procs_per_node=8, cpus=32) == 3
    assert dev.default_workers(torch.device("cuda"), cpus=1) == 1
    cfg = load_config(None, {"device": "cpu"})
    assert cfg.workers is None and precision.workers(cfg, D.DistInfo()) == 0
    assert precision.workers(load_config(None, {"workers": 3}), D.DistInfo(device=torch.device("cuda"))) == 3


def test_workers_default_shares_the_node_between_its_processes_in_every_phase(tmp_path, monkeypatch):
    """Mining, the fp32 re-rank and projection all size their DataLoader for LOCAL_WORLD_SIZE
    processes on the node (torchrun sets it), not for one."""
    import pipeline_fixtures as fx
    from deconvis.runs import pipeline

    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    _torchrun_env(monkeypatch, rank=0, world=1, local=0, local_world=4)  # a 1-process job: no group
    seen = []
    monkeypatch.setattr(precision, "default_workers", lambda device, procs_per_node=1: seen.append(procs_per_node) or 0)
    out = pipeline.run(fx.tiny_config(tmp_path, amp="bf16", amp_pool=2))
    assert out.mined and out.projected and len(seen) >= 3 and set(seen) == {4}, seen


def test_a_caller_made_nccl_group_gets_a_gloo_side_group(fake_cuda, monkeypatch):
    _torchrun_env(monkeypatch, rank=1, world=2, local=1, local_world=2)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    info = D.init(torch.device("cuda"), timeout_s=5)
    assert fake_cuda["init"] == [] and fake_cuda["new_group"] == ["gloo"] and info.group == "gloo-group"
    assert info.local_world == 2
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")  # a caller's gloo group carries it itself
    assert D.init(torch.device("cpu"), timeout_s=5).group is None and fake_cuda["new_group"] == ["gloo"]


class _Stop(Exception):
    pass


def test_cuda_n_is_made_current_wherever_a_device_is_chosen(fake_cuda, monkeypatch, tmp_path):
    """Without torchrun too: the visualize prepare, the analyses' network loader, the occlusion
    run and training make ``cuda:1`` current before any CUDA work (model load stopped here)."""
    import pipeline_fixtures as fx
    from deconvis.analysis import common, occlusion_run
    from deconvis.analysis.occlusion_run import OcclusionConfig, run_occlusion
    from deconvis.runs.phases import prepare as prepare_mod
    from deconvis.runs.phases.prepare import prepare
    from deconvis.training import train as train_mod
    from deconvis.training.train import TrainConfig, train

    def stop(*a, **k):
        raise _Stop()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for mod in (prepare_mod, common, occlusion_run):
        monkeypatch.setattr(mod, "load_model", stop)
    monkeypatch.setattr(train_mod, "ExemplarDataset", stop)
    calls = [
        lambda: prepare(fx.tiny_config(tmp_path, device="cuda:1"), str(tmp_path / "run")),
        lambda: common.load_network("zfnet_demo", device="cuda:1"),
        lambda: run_occlusion(OcclusionConfig(device="cuda:1", out_dir=str(tmp_path / "occ")), log=lambda m: None),
        lambda: train(TrainConfig(device="cuda:1", out_dir=str(tmp_path / "train"), threads=0), log=lambda m: None),
    ]
    for i, call in enumerate(calls):
        fake_cuda["set_device"].clear()
        with pytest.raises(_Stop):  # stopped at the model (or data) load
            call()
        assert fake_cuda["set_device"][:1] == [torch.device("cuda", 1)], i


def test_weights_fingerprint_is_the_bytes_read_on_the_cpu(monkeypatch):
    """The cross-rank check compares SHA-256 digests of the weights' bytes: the same bits agree
    whatever device summed them, and weights that merely sum alike (a permutation) disagree."""
    import copy
    import hashlib
    from types import SimpleNamespace

    from deconvis.runs import ranks

    def ctx(model):
        return SimpleNamespace(mining_hash="h", source=[0] * 5, loaded=SimpleNamespace(model=model),
                               info=D.DistInfo(rank=0, world=2))

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    b = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with torch.no_grad():
        a[0].weight.copy_(torch.randint(-8, 8, a[0].weight.shape))  # integers: every summation order is exact
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight.flip(0))  # same sums (exactly), other weights
    want = hashlib.sha256()
    for name, t in list(a.named_parameters()) + list(a.named_buffers()):
        want.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode() + t.detach().numpy().tobytes())
    assert ranks.weights_digest(a) == want.hexdigest()[:16]
    assert ranks.weights_digest(copy.deepcopy(a).to(torch.bfloat16)) != ranks.weights_digest(a)  # any dtype hashes
    prints = [ranks._fingerprint(ctx(a)), ranks._fingerprint(ctx(b))]
    monkeypatch.setattr(D, "all_gather_objects", lambda obj, info, what="": prints)
    with pytest.raises(DeconvisError, match=r"rank 1 of 2 disagrees with rank 0 on the run \(model weights differ"):
        ranks.check_same_run(ctx(a))
    prints[1] = ranks._fingerprint(ctx(a))
    ranks.check_same_run(ctx(a))  # the same weights agree


def test_batch_budget_counts_memory_held_in_the_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 3000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 1000)
    assert dev.memory_budget(torch.device("cuda"), fraction=0.5) == 1500  # (1000 free + 2000 cached) / 2


def test_tf32_policy_is_set_inside_and_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with dev.tf32(True):
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with dev.tf32(False):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_device_type_tf32_and_pool_join_the_run_identity():
    cfg = load_config(None, {"device": "cpu"})
    assert precision.identity_extra(cfg, torch.device("cpu")) == {}  # CPU runs keep their hash
    cfg = load_config(None, {"tf32": True, "amp": "bf16", "amp_pool": 3})
    assert precision.identity_extra(cfg, torch.device("cuda", 1)) == {"device": "cuda", "tf32": True, "amp_pool": 3}
    assert precision.mining_k(cfg) == 27 and precision.mining_k(load_config(None, {})) == 9


def _job(a):
    return TileJob("conv1", 2, 0, 7, 1, 1, a)


def test_replay_counts_and_verdict():
    r = Replay(rtol=1e-4)
    r.add(_job(10.0), 10.0)
    r.add(_job(10.0), 10.0005)            # within 1e-4 relative
    r.add(_job(10.0), 10.01)              # 1e-3: a mismatch
    r.add(_job(None), 3.0)                # no mined value: not checked
    r.add(_job(1.0), float("nan"))        # a NaN now: a mismatch
    assert (r.checked, r.mismatches) == (4, 2) and math.isinf(r.worst)
    stats = {}
    entry = projection.add_replay(stats, [r, Replay(rtol=1e-4, checked=3)], 1e-4)
    assert entry["checked"] == 7 and entry["mismatches"] == 2
    assert entry["examples"][1][4] is None  # no NaN in JSON
    projection.replay_verdict(entry, None)  # only counted
    projection.replay_verdict(entry, 2)
    with pytest.raises(DeconvisError, match=r"replay check: 2 of 7 .*replay_max_mismatch=1.*--fresh"):
        projection.replay_verdict(entry, 1)
    again = projection.add_replay(stats, [Replay(rtol=1e-4)], 1e-4)  # a resumed run adds to the counts
    assert again["mismatches"] == 2 and again["checked"] == 7


def test_replay_tolerance_by_precision():
    class Ctx:
        device = torch.device("cuda")
        amp = torch.bfloat16

    ctx = Ctx()
    ctx.cfg = load_config(None, {"amp": "bf16"})
    assert precision.replay_rtol(ctx) == precision.SAME_PRECISION_RTOL  # re-ranked: fp32 values
    ctx.cfg = load_config(None, {"amp": "bf16", "amp_pool": 0})
    assert precision.replay_rtol(ctx) == 0.05
    ctx.cfg = load_config(None, {"tf32": True})
    assert precision.replay_rtol(ctx) == precision.TF32_RTOL


class _Layer:
    def __init__(self, name, tiles):
        class W:
            pass
        ws = []
        for t in tiles:
            w = W()
            w.tiles = t
            ws.append(w)

        class U:
            winners = ws
        self.name, self.units = name, [U()]


def test_listed_tiles_are_waited_for_then_an_error(tmp_path):
    now = [0.0]
    visible = {str(tmp_path / "a.png")}
    layers = [_Layer("l1", [{"rec": "a.png"}, None]), _Layer("l2", [{"rec": "b.png"}])]

    def sleep(s):
        now[0] += s
        if now[0] >= 3:
            visible.add(str(tmp_path / "b.png"))  # the other rank's tile shows up after 3 s

    projection.wait_for_tiles(str(tmp_path), layers, timeout_s=10, exists=visible.__contains__,
                              now=lambda: now[0], sleep=sleep)
    assert 3 <= now[0] < 4
    projection.wait_for_tiles(str(tmp_path), layers, names={"l1"}, exists=visible.__contains__)
    with pytest.raises(DeconvisError, match=r"1 tile\(s\) listed in results.json are missing after 10 s.*c.png"):
        projection.wait_for_tiles(str(tmp_path), [_Layer("l3", [{"rec": "c.png"}])], timeout_s=10,
                                  exists=visible.__contains__, now=lambda: now[0], sleep=sleep)


def test_results_never_hold_non_finite_numbers():
    assert finite_json({"a": [1.0, float("inf"), {"b": float("nan")}], "c": 2}) == {"a": [1.0, None, {"b": None}], "c": 2}


def test_mining_forward_applies_the_tf32_flag(tmp_path):
    import pipeline_fixtures as fx
    from deconvis.runs import pipeline

    seen = []
    for allow in (True, False):
        ctx = pipeline.prepare(fx.tiny_config(tmp_path, tf32=allow), str(tmp_path / "x"))
        real = ctx.dn.activations
        ctx.dn.activations = lambda x, layers: seen.append(torch.backends.cudnn.allow_tf32) or real(x, layers)
        with dev.tf32(not allow):
            pipeline.mining_forward(ctx)(torch.zeros(1, 3, fx.SIZE, fx.SIZE))
    assert seen == [True, False]
