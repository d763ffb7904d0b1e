"""The unit pages' extras (issue 19 section 1): each channel's RF box and ERF on one image (the ERF
against autograd and the ``deconvis erf`` code, float64; the box's pixels where the RF table says),
the channel across checkpoints (its strongest activation per checkpoint against a brute-force
search with that checkpoint's weights), the per-run feature visualisation (present with
``featvis_steps``, absent without), and their ``results.json`` keys (round trip; absent when off)."""
from __future__ import annotations

import dataclasses
import html.parser
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import pipeline_fixtures as fx
from deconvis.errors import DeconvisError
from deconvis.graph.erf import effective_receptive_field
from deconvis.io.images import FolderImages, normalize, preprocess_image
from deconvis.io.models import load_model
from deconvis.mirror.deconvnet import DeconvNet
from deconvis.runs import pipeline
from deconvis.runs import results as R
from deconvis.runs import unit_pages
from deconvis.runs.unit_erf import RF_COLOUR, draw_rf_erf, unit_erf_maps
from deconvis.runs.unit_evolution import checkpoint_files, checkpoint_label


def _net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, padding=1), nn.ReLU()).double().eval()


def test_unit_erf_is_the_input_gradient_of_the_unit_on_its_image():
    """Per unit, |d a / d x| summed over colours on the whole image: autograd on the float64 net
    and ``effective_receptive_field`` of that one unit on that one image agree with it; the box is
    the theoretical RF; a unit that does not fire (a = 0) has no map."""
    net = _net()
    x = torch.randn(3, 3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dn = DeconvNet(net)
    acts = dn.forward(x)
    a = acts["4"]
    units = [[0, 1, 0, 0], [2, 4, 9, 9], [1, 0, 4, 7]]  # corner (box past the border), far corner, inside
    for c in range(5):  # each channel's strongest unit, as the pipeline passes its top winner
        i = int(a[:, c].flatten().argmax())
        n, rest = divmod(i, 100)
        units.append([n, c, rest // 10, rest % 10])
    dead = (a == 0).nonzero()[0].tolist()
    units.append(dead)
    maps, boxes = unit_erf_maps(dn, "4", torch.tensor(units), a, (20, 20))
    assert maps[-1] is None
    fired = 0
    for (n, c, y, xx), m, box in zip(units[:-1], maps[:-1], boxes.tolist()):
        assert (m is None) == (a[n, c, y, xx] == 0)
        if m is None:
            continue
        fired += 1
        xi = x[n:n + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(xi)[0, c, y, xx], xi)
        np.testing.assert_allclose(m, g[0].abs().sum(0).numpy(), rtol=1e-10, atol=1e-14)
        erf = effective_receptive_field(net, "4", images=x[n:n + 1], channel=c, unit=(y, xx))
        np.testing.assert_allclose(m, erf.map, rtol=1e-10, atol=1e-14)
        assert box == fx.theoretical_box(net, "4", y, xx) == list(erf.rf_box)
        assert m.max() > 0
    assert fired >= 6


@pytest.mark.parametrize("px", [24, 48, 36])
def test_rf_box_is_drawn_on_the_rf_tables_box(px):
    """The frame is the clipped RF box scaled to the drawn image: its one-pixel outline has the RF
    colour, no other pixel has it; the heat only tints pixels where the ERF is positive."""
    image = np.full((24, 24, 3), 128, np.uint8)
    erf = np.zeros((24, 24))
    erf[6:9, 10:12] = [[1, 2], [3, 4], [0.5, 0.25]]
    box = [3, 13, 8, 24]  # runs to the right edge
    out, frame = draw_rf_erf(image, erf, box, px=px)
    s = px / 24
    assert out.shape == (px, px, 3)
    assert frame == [round(3 * s), round(13 * s), round(8 * s), round(24 * s)]
    y0, y1, x0, x1 = frame
    want = np.zeros((px, px), bool)
    want[y0, x0:x1] = want[y1 - 1, x0:x1] = want[y0:y1, x0] = want[y0:y1, x1 - 1] = True
    np.testing.assert_array_equal((out == RF_COLOUR).all(2), want)
    ring = np.zeros((px + 2, px + 2), bool)  # the black ring just outside the frame, inside the image
    ring[y0, x0:x1 + 2] = ring[y1 + 1, x0:x1 + 2] = ring[y0:y1 + 2, x0] = ring[y0:y1 + 2, x1 + 1] = True
    ring = ring[1:-1, 1:-1]
    assert (out[ring] == 0).all()
    tinted = (out != 128).any(2) & ~want & ~ring
    if s == 1:
        np.testing.assert_array_equal(tinted, (erf > 0) & ~want)


@pytest.mark.parametrize("px", [40, 64, 90])
def test_rf_erf_picture_equals_the_heat_blended_over_the_whole_image(px):
    """The heat, blended only where the ERF holds it, against the documented blend computed over
    every pixel (opacity HEAT_ALPHA * sqrt(min(erf / top, 1)), inferno colours), on a random photo
    and a random ERF: positive in an RF box, a few stray positive pixels elsewhere, zeros around."""
    import cv2

    from deconvis.runs.unit_erf import HEAT_ALPHA, HEAT_PERCENTILE

    rng = np.random.default_rng(px)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    erf = np.zeros((64, 64))
    erf[9:40, 17:52] = rng.random((31, 35)) ** 3
    erf[rng.integers(0, 64, 5), rng.integers(0, 64, 5)] = rng.random(5)
    box = [9, 40, 17, 52]
    out, frame = draw_rf_erf(image, erf, box, px=px)
    s = px / 64
    size = (round(64 * s), round(64 * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    img = cv2.resize(image, size, interpolation=interp) if s != 1 else image.copy()
    e = cv2.resize(erf, size, interpolation=interp) if s != 1 else erf
    top = float(np.percentile(e[e > 0], HEAT_PERCENTILE))
    norm = np.clip(e / top, 0.0, 1.0)
    heat = cv2.applyColorMap(np.round(norm * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
    alpha = (HEAT_ALPHA * np.sqrt(norm))[..., None]
    want = np.ascontiguousarray(np.round(img * (1 - alpha) + heat * alpha).astype(np.uint8))
    y0, y1, x0, x1 = frame
    cv2.rectangle(want, (x0 - 1, y0 - 1), (x1, y1), (0, 0, 0), 1)
    cv2.rectangle(want, (x0, y0), (x1 - 1, y1 - 1), RF_COLOUR, 1)
    np.testing.assert_array_equal(out, want)


def _pages_refs(path):
    class P(html.parser.HTMLParser):
        refs = []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.refs.append((a.get("class"), a.get("src")))

    p = P()
    p.refs = []
    p.feed(open(path, encoding="utf-8").read())
    return p.refs


@pytest.fixture(scope="module")
def evo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extras")
    spec = fx.write_net(tmp)
    cps = []
    for seed in range(3):  # three "training snapshots" of the tiny net
        torch.manual_seed(seed)
        path = os.path.join(str(tmp), "snap", f"epoch_{seed + 1:03d}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"state_dict": load_model(spec, "random").model.state_dict()}, path)
        cps.append(path)
    cfg = fx.tiny_config(tmp, checkpoints=[os.path.join(str(tmp), "snap")], evolution_images=10, featvis_steps=3,
                         unit_erf=True)
    out = pipeline.run(cfg)
    return cfg, cps, out, R.load(out.run_dir)  # the results as written (a test below turns the options off)


def test_checkpoints_show_each_channels_strongest_activation_per_checkpoint(evo_run):
    cfg, cps, out, res = evo_run
    meta = res.unit_extras["evolution"]
    assert [c["weights"] for c in meta["checkpoints"]] == cps and meta["images"] == 10
    assert [c["label"] for c in meta["checkpoints"]] == ["epoch 1", "epoch 2", "epoch 3"]
    src = FolderImages(cfg.images)
    pp = dataclasses.replace(pipeline.prepare(cfg, out.run_dir).preprocess)
    x = torch.stack([normalize(preprocess_image(src.load(i), pp), pp) for i in range(10)])
    layers = [lr.name for lr in res.layers]
    for j, cp in enumerate(cps):
        want = fx.brute_force_topk(load_model(cfg.model, cp).model, x, layers, 1)
        for lr in res.layers:
            evo = lr.unit_extras["evolution"]
            for ci, u in enumerate(lr.units):
                v = want[lr.name][0][u.channel][0][0]
                assert evo["value"][ci][j] == pytest.approx(v, rel=1e-5, abs=1e-6)
                # the unit shown holds that maximum (images 2 and 9 are equal: either may win the tie)
                at = want[lr.name][1][evo["image"][ci][j], u.channel, evo["y"][ci][j], evo["x"][ci][j]]
                assert at == pytest.approx(v, rel=1e-5, abs=1e-6)
    lr = res.layers[1]
    for ci, u in enumerate(lr.units):
        refs = dict(_pages_refs(os.path.join(out.run_dir, unit_pages.unit_page(lr.label, u.channel))))
        assert refs["evolution"] == "../../" + lr.unit_extras["evolution"]["file"][ci]
        assert os.path.isfile(os.path.join(out.run_dir, lr.unit_extras["evolution"]["file"][ci]))


def test_featvis_and_erf_on_every_page_with_the_options_and_absent_without(evo_run, tmp_path):
    cfg, _, out, res = evo_run
    assert res.unit_extras["featvis"]["steps"] == 3
    for lr in res.layers:
        for ci, u in enumerate(lr.units):
            refs = dict(_pages_refs(os.path.join(out.run_dir, unit_pages.unit_page(lr.label, u.channel))))
            for part in ("featvis", "erf"):
                rel = lr.unit_extras[part][ci]
                if rel is None:  # ERF: a channel that never fires has none
                    assert part == "erf" and u.winners[0].activation <= 0 and part not in refs
                    continue
                assert refs[part] == "../../" + rel and os.path.isfile(os.path.join(out.run_dir, rel))
    # the same run, the options off: resumed (nothing re-mined), the extras leave the results and the pages
    off = pipeline.run(dataclasses.replace(cfg, checkpoints=[], featvis_steps=0, unit_erf=False))
    assert not off.mined
    d = json.load(open(os.path.join(off.run_dir, "results.json"), encoding="utf-8"))
    assert "unit_extras" not in d and all("unit_extras" not in lr for lr in d["layers"])
    lr = off.results.layers[0]
    refs = dict(_pages_refs(os.path.join(off.run_dir, unit_pages.unit_page(lr.label, lr.units[0].channel))))
    assert not {"erf", "featvis", "evolution"} & set(refs) and "rec" in refs


def test_results_round_trip_with_the_extras(evo_run, tmp_path):
    res = evo_run[3]
    assert res.unit_extras and all(lr.unit_extras for lr in res.layers)
    R.save(res, str(tmp_path))
    again = R.load(str(tmp_path))
    assert again.to_dict() == res.to_dict()
    assert again.unit_extras == res.unit_extras
    assert [lr.unit_extras for lr in again.layers] == [lr.unit_extras for lr in res.layers]


def test_checkpoint_entries_expand_and_bad_ones_fail_in_one_line(tmp_path):
    train_dir = tmp_path / "train"
    (train_dir / "snapshot_weights").mkdir(parents=True)
    for e in (12, 2, 5):
        (train_dir / "snapshot_weights" / f"epoch_{e:03d}.pt").write_bytes(b"x")
    single = tmp_path / "final.pt"
    single.write_bytes(b"x")
    got = checkpoint_files([str(train_dir), "final.pt"], config_dir=str(tmp_path))
    assert [os.path.basename(p) for p in got] == ["epoch_002.pt", "epoch_005.pt", "epoch_012.pt", "final.pt"]
    assert [checkpoint_label(p) for p in got] == ["epoch 2", "epoch 5", "epoch 12", "final"]
    with pytest.raises(DeconvisError, match="does not exist"):
        checkpoint_files([str(tmp_path / "nope.pt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeconvisError, match="no \\*.pt"):
        checkpoint_files([str(tmp_path / "empty")])
    cfg = fx.tiny_config(tmp_path, checkpoints=[str(tmp_path / "nope.pt")])
    with pytest.raises(DeconvisError, match="checkpoints: .*nope.pt"):  # before any mining
        pipeline.run(cfg)
    assert not os.path.exists(os.path.join(cfg.out, cfg.run, "results.json"))


def _erf_images(run_dir):
    folder = os.path.join(run_dir, "units", "erf")
    return {os.path.relpath(os.path.join(r, n), folder): open(os.path.join(r, n), "rb").read()
            for r, _, names in os.walk(folder) for n in names}


def test_erf_images_drawn_on_the_writer_thread_equal_the_inline_ones(evo_run, tmp_path, monkeypatch):
    """The RF + ERF images and their records are the same whether a writer thread draws them
    while the next maps are computed or the loop draws them itself; a drawing or write that
    fails comes back from the phase and leaves neither a file nor a record for its unit."""
    from deconvis.runs import unit_erf

    cfg, _, out, res = evo_run
    ctx = pipeline.prepare(cfg, out.run_dir)
    got = {}
    for threads in (0, 1):
        monkeypatch.setattr(unit_erf, "ERF_WRITER_THREADS", threads)
        r = R.load(out.run_dir)
        run_dir = str(tmp_path / f"t{threads}")
        record = unit_erf.erf_phase(ctx, r, run_dir)
        got[threads] = (record, [lr.unit_extras for lr in r.layers], _erf_images(run_dir))
    assert got[0] == got[1]
    assert got[1][0]["images"] == len(got[1][2]) > 0
    assert [lr.unit_extras["erf"] for lr in res.layers] == [ex["erf"] for ex in got[1][1]]  # as the run wrote them

    real, calls = unit_erf.write_image, []

    def flaky(path, rgb, durable=True):
        calls.append(path)
        if len(calls) == 2:
            from deconvis.io.atomic import atomic_path
            with atomic_path(path) as tmp:  # dies half way through the file
                open(tmp, "wb").write(b"\xff\xd8half")
                raise OSError("disk full")
        real(path, rgb, durable)

    monkeypatch.setattr(unit_erf, "write_image", flaky)
    monkeypatch.setattr(unit_erf, "ERF_WRITER_THREADS", 1)
    r = R.load(out.run_dir)
    run_dir = str(tmp_path / "failing")
    with pytest.raises(OSError, match="disk full"):
        unit_erf.erf_phase(ctx, r, run_dir)
    left = _erf_images(run_dir)
    assert not any(".tmp" in f for f in left) and os.path.relpath(calls[1], os.path.join(run_dir, "units", "erf")) not in left
    listed = [f for lr in r.layers for f in lr.unit_extras["erf"] if f]
    assert all(os.path.isfile(os.path.join(run_dir, f)) for f in listed) and len(listed) < got[1][0]["images"]
