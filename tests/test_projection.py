"""render.projection.project_jobs against a direct projection of each image on its own: the
forward stops at the layers the jobs need, an out-of-memory forward is halved with every job done
once, tiles are the uint8 of the direct reconstruction, and the replay values are the activations."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pipeline_fixtures as fx
from deconvis.io.images import ImageDataset, open_images
from deconvis.io.models import Preprocess
from deconvis.mirror.deconvnet import DeconvNet
from deconvis.render.display import to_uint8, to_uint8_tensor
from deconvis.render.projection import Replay, completion_order, project_jobs
from deconvis.render.sheets import TileJob


@pytest.fixture
def setup(tmp_path):
    fx.write_images(tmp_path / "imgs", n=5)
    torch.manual_seed(0)
    ns = {}
    exec(fx.TINY_NET, ns)
    model = ns["make"]().eval()
    pp = Preprocess(resize=fx.SIZE, crop=(fx.SIZE, fx.SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ds = ImageDataset(open_images(str(tmp_path / "imgs")), pp)
    return DeconvNet(model), ds


def _direct(dn, ds, job):
    """The oracle: forward image ``job.image`` alone, project the unit, uint8 it."""
    acts = dn.forward(ds[job.image][0][None])
    rec, box = dn.project_window(job.layer, torch.tensor([[0, job.channel, job.y, job.x]]))
    return to_uint8(rec)[0], tuple(int(v) for v in box[0]), float(acts[job.layer][0, job.channel, job.y, job.x])


def test_jobs_match_direct_projection_with_oom_halving_and_a_cut_forward(setup, monkeypatch):
    dn, ds = setup
    jobs = [TileJob("1", c, r, i, (3 * i + c) % 32, (5 * c + i) % 32, None)
            for r, (i, c) in enumerate([(0, 1), (2, 0), (3, 3), (4, 2), (1, 1)])]
    jobs += [TileJob("4", 2, 0, 3, 5, 7, None)]
    want = {(j.layer, j.channel, j.rank): _direct(dn, ds, j) for j in jobs}
    jobs = [TileJob(j.layer, j.channel, j.rank, j.image, j.y, j.x, want[(j.layer, j.channel, j.rank)][2])
            for j in jobs]
    real, seen = dn.forward, []

    def forward(x, layers=None):
        seen.append((x.shape[0], tuple(layers)))
        if x.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, layers=layers)

    monkeypatch.setattr(dn, "forward", forward)
    got = {}

    def sink(job, rec, img, box):
        key = (job.layer, job.channel, job.rank)
        assert key not in got  # exactly once
        got[key] = (rec, box)

    replay = Replay(rtol=1e-5)  # batch of 2 vs 1 image: float32 sums may differ in the last bits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = project_jobs(dn, ds, jobs, batch_size=4, project_batch=2, sink=sink, progress=False, replay=replay)
    assert n == len(jobs) == len(got)
    assert any("forwarding 2 images at a time" in str(w.message) for w in caught)
    assert seen[0][0] == 4 and all(b <= 2 for b, _ in seen[1:])
    assert {layers for _, layers in seen if "4" not in layers} == {("1",)}  # images 0-2 need conv1 only
    for key, (rec, box) in got.items():
        assert box == want[key][1]
        assert np.array_equal(rec, want[key][0]), key
    assert (replay.checked, replay.mismatches) == (len(jobs), 0)  # batched values = single-image ones (round-off)


def test_channels_complete_in_the_jobs_order_not_the_images_order(setup):
    """Images are forwarded channel by channel in the jobs' order, so the first channel's winners
    all reach the sink before any of a later channel whose images have lower ids."""
    dn, ds = setup
    jobs = [TileJob("1", 0, 0, 4, 3, 3), TileJob("1", 0, 1, 3, 5, 5),  # channel 0 on images 4, 3
            TileJob("1", 1, 0, 0, 2, 2), TileJob("1", 1, 1, 1, 4, 4),  # channel 1 on images 0, 1
            TileJob("1", 2, 0, 3, 1, 1), TileJob("1", 2, 1, 2, 6, 6)]  # channel 2 on image 3 (shared), 2
    assert completion_order(jobs) == [3, 4, 0, 1, 2]
    seen = []
    project_jobs(dn, ds, jobs, batch_size=2, project_batch=8, sink=lambda j, *a: seen.append(j.channel),
                 progress=False)
    assert sorted(seen) == [0, 0, 1, 1, 2, 2]
    assert seen.index(1) > max(i for i, c in enumerate(seen) if c == 0)  # channel 0 complete first


def _stretch_ref(rec):
    """The contrast stretch in float64: 128 + 127 v / max|v| per image, rounded, [M, H, W, C]."""
    ref = 128 + 127 * rec.double() / rec.double().abs().flatten(1).amax(1).clamp_min(1e-300)[:, None, None, None]
    return ref.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)


@pytest.mark.parametrize("scale", [1.0, 1e-40])  # 1e-40: float32 denormals, 127 / max|v| overflows float32
def test_uint8_on_the_device_equals_the_host_version(scale):
    rec = torch.randn(8, 3, 33, 35, dtype=torch.float32) * scale
    rec[1] = 0
    assert to_uint8_tensor(rec).dtype == torch.uint8
    assert np.array_equal(to_uint8_tensor(rec).numpy(), to_uint8(rec))
    # float32 arithmetic: the float64 stretch but at rounding ties (at most one level, very rare)
    diff = np.abs(to_uint8(rec).astype(int) - _stretch_ref(rec))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert (to_uint8(rec)[1] == 128).all()
    # float64 reconstructions are stretched in float64: exactly the reference, also just above
    # every rounding tie (where float32 arithmetic would round half of them down)
    assert np.array_equal(to_uint8(rec.double()).astype(int), _stretch_ref(rec))
    ties = torch.cat([torch.ones(1, dtype=torch.float64),
                      (torch.arange(127, dtype=torch.float64) + 0.5 + 1e-9) / 127]).view(1, 1, 1, -1)
    assert np.array_equal(to_uint8(ties * scale).astype(int), _stretch_ref(ties * scale))
    assert (_stretch_ref(ties)[0, 0, 1:, 0] == np.arange(127) + 129).all()


class _GatedNet(torch.nn.Module):
    """conv -> ReLU -> squeeze-excitation gate -> conv -> ReLU: the last layer sees the whole
    image through the gate but has a small local field through its conv path."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import SqueezeExcitation

        self.c1, self.r1 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()
        self.se = SqueezeExcitation(4, 2)
        self.c2, self.r2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU()

    def forward(self, x):
        return self.r2(self.c2(self.se(self.r1(self.c1(x)))))


def test_gated_layer_local_crop_is_logged_by_every_projection_run(tmp_path, caplog):
    """Each projection run (not each process) says once that a gated layer's tiles show the local
    field of its conv path: two runs in one process log it twice, once each."""
    import logging

    fx.write_images(tmp_path / "imgs", n=3)
    torch.manual_seed(0)
    dn = DeconvNet(_GatedNet().eval())
    pp = Preprocess(resize=fx.SIZE, crop=(fx.SIZE, fx.SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ds = ImageDataset(open_images(str(tmp_path / "imgs")), pp)
    row = dn.receptive_fields((fx.SIZE, fx.SIZE))["r2"]
    assert row.whole and row.local is not None
    jobs = [TileJob("r2", c, 0, c, 4 + c, 9, None) for c in range(3)]
    boxes = []
    for run in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="deconvis"):
            project_jobs(dn, ds, jobs, batch_size=2, project_batch=2, progress=False,
                         sink=lambda job, rec, img, box: boxes.append(box))
        said = [r for r in caplog.records if "local field" in r.getMessage()]
        assert len(said) == 1, (run, [r.getMessage() for r in caplog.records])
        assert "r2" in said[0].getMessage()
    assert boxes[:3] == [row.local.box(4 + c, 9) for c in range(3)] == boxes[3:]  # the tiles are cut to it


def test_tile_thread_hands_the_same_tiles_in_the_same_order_and_raises_the_sinks_error(setup, monkeypatch):
    """On the CPU the stretch and the sink run on a thread of their own (``HANDOFF_CHUNKS`` chunks
    ahead): the sink sees what the inline path gives it, in the same order, and its error reaches
    the caller."""
    import threading

    from deconvis.render import projection

    dn, ds = setup
    jobs = [TileJob("1", c, r, i, (7 * i + c) % 32, (3 * c + 2 * i) % 32, None)
            for c in range(3) for r, i in enumerate((4, 1, 2))] + [TileJob("4", 1, 0, 0, 4, 6, None)]

    def run(chunks):
        monkeypatch.setattr(projection, "HANDOFF_CHUNKS", chunks)
        got, threads = [], set()

        def sink(job, rec, img, box):
            got.append((job, rec.copy(), img.copy(), box))
            threads.add(threading.current_thread() is threading.main_thread())

        project_jobs(dn, ds, jobs, batch_size=2, project_batch=2, sink=sink, progress=False)
        return got, threads

    inline, on_main = run(0)
    assert on_main == {True}
    for chunks in (1, 2):
        handed, on_main = run(chunks)
        assert on_main == {False}  # the tile thread
        assert [g[0] for g in handed] == [g[0] for g in inline]
        for a, b in zip(handed, inline):
            assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2]) and a[3] == b[3]

    calls = []

    def failing(job, *a):
        calls.append(job)
        if len(calls) == len(jobs):  # the last chunk: no later hand-off sees it, the closing one must
            raise OSError("disk full")

    monkeypatch.setattr(projection, "HANDOFF_CHUNKS", 2)
    with pytest.raises(OSError, match="disk full"):
        project_jobs(dn, ds, jobs, batch_size=2, project_batch=2, sink=failing, progress=False)
