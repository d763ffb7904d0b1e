"""The visualize pipeline end to end on a tiny chain CNN and a dozen small images.

Oracles: brute-force top-k from full activations (hooks + Python sort), the theoretical RF box of
docs/method.md section 3 computed here by hand, direct crops of the preprocessed image, and
``DeconvNet.project`` on the full image for the reconstruction tiles.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import pipeline_fixtures as fx
from deconvis.render.sheets import load_tile
from deconvis import mining
from deconvis.runs import pipeline
from deconvis.runs.phases import project as project_phase
from deconvis.render import sheets as render
from deconvis.runs import results as results_mod
from deconvis.io.images import FolderImages, normalize, preprocess_image, read_image
from deconvis.errors import DeconvisError

LAYERS = ["1", "4", "7"]  # conv1..conv3 rectified (ReLU modules) of the tiny net


def _winners(res):
    return {lr.name: [[(w.image, w.activation, w.y, w.x) for w in u.winners] for u in lr.units] for lr in res.layers}


def _read(path):
    return cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1]


def _load(cfg):
    from deconvis.io.models import load_model

    torch.manual_seed(cfg.seed)
    return load_model(cfg.model, "random").model


@pytest.fixture
def done(tmp_path):
    cfg = fx.tiny_config(tmp_path)
    out = pipeline.run(cfg)
    return cfg, out


def test_winners_match_bruteforce(done):
    cfg, out = done
    res = out.results
    assert [lr.name for lr in res.layers] == LAYERS
    assert [lr.label for lr in res.layers] == ["conv1", "conv2", "conv3"]
    assert out.n_images == 12 and out.mined
    model = _load(cfg)
    src = FolderImages(cfg.images)
    pp = dataclasses.replace(pipeline.prepare(cfg, out.run_dir).preprocess)
    x = torch.stack([normalize(preprocess_image(src.load(i), pp), pp) for i in range(len(src))])
    want = fx.brute_force_topk(model, x, LAYERS, cfg.k)
    for lr in res.layers:
        rows, acts = want[lr.name]
        assert lr.channels == len(rows) and lr.map_size == list(acts.shape[2:])
        for u, orow in zip(lr.units, rows):
            assert len(u.winners) == cfg.k
            got = [w.activation for w in u.winners]
            assert np.allclose(got, [t[0] for t in orow], rtol=1e-5, atol=1e-6)
            assert len({w.image for w in u.winners}) == cfg.k  # one per image
            for w in u.winners:  # each winner really is that image's maximum, at its first position
                amap = acts[w.image, u.channel]
                assert math.isclose(amap.max(), w.activation, rel_tol=1e-5, abs_tol=1e-6)
                assert math.isclose(amap[w.y, w.x], w.activation, rel_tol=1e-5, abs_tol=1e-6)
                assert w.source == src.name(w.image)
            if [t[1] for t in orow] != [w.image for w in u.winners]:  # only exact/near ties may reorder
                assert np.allclose(sorted(got), sorted(t[0] for t in orow), rtol=1e-5)


def test_patches_and_reconstructions(done):
    from deconvis.mirror.deconvnet import DeconvNet
    from deconvis.render.display import to_uint8

    cfg, out = done
    res = out.results
    model = _load(cfg)
    dn = DeconvNet(model)
    pp = pipeline.prepare(cfg, out.run_dir).preprocess
    src = FolderImages(cfg.images)
    try:
        from deconvis.graph.rf import receptive_fields

        table = receptive_fields(model, (fx.SIZE, fx.SIZE))
    except ImportError:  # pragma: no cover - rf.py is another engineer's module
        table = None
    n_outside = 0
    for lr in res.layers:
        for u in lr.units:
            for w in u.winners:
                box = fx.theoretical_box(model, lr.name, w.y, w.x)
                assert w.box == box
                if table is not None:
                    assert list(table.box(lr.name, w.y, w.x)) == box
                clipped, _ = render.clip_box(box, fx.SIZE, fx.SIZE)
                assert w.box_clipped == list(clipped)
                shown = preprocess_image(src.load(w.image), pp)
                img_tile = load_tile(out.run_dir, lr, u, w, "img")
                # the image patch is the direct crop of the displayed image, grey outside it
                y0, y1, x0, x1 = box
                expect = np.full((y1 - y0, x1 - x0, 3), 128, np.uint8)
                cy0, cy1, cx0, cx1 = clipped
                expect[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = shown[cy0:cy1, cx0:cx1]
                assert np.array_equal(img_tile, expect)
                # the reconstruction tile is the full-image projection cut at the same box
                dn.forward(normalize(shown, pp)[None])
                full = dn.project(lr.name, torch.tensor([[0, u.channel, w.y, w.x]]))[0]
                padded = torch.zeros(3, y1 - y0, x1 - x0, dtype=full.dtype)
                padded[:, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = full[:, cy0:cy1, cx0:cx1]
                # nothing of the full projection lies outside the box
                assert float(full.abs().sum()) == pytest.approx(float(padded.abs().sum()), rel=1e-5, abs=1e-7)
                rec_tile = load_tile(out.run_dir, lr, u, w, "rec")
                assert np.abs(rec_tile.astype(int) - to_uint8(padded[None])[0].astype(int)).max() <= 1
                if clipped != tuple(box):
                    n_outside += 1
                    assert (rec_tile[:cy0 - y0] == 128).all() and (img_tile[:cy0 - y0] == 128).all()
                    assert (rec_tile[:, :cx0 - x0] == 128).all() and (rec_tile[:, rec_tile.shape[1] - (x1 - cx1):] == 128).all()
    assert n_outside > 0  # some boxes ran past the image: the padding path was exercised


def test_sheets_and_results_roundtrip(done):
    cfg, out = done
    res = out.results
    pages = {lr.label: lr.sheets for lr in res.layers}
    # conv1's small tiles are enlarged 3x or more on its sheet: PNG (render.sheet_format); the others JPEG
    assert pages == {"conv1": ["layer_conv1_p001.png"], "conv2": ["layer_conv2_p001.jpg", "layer_conv2_p002.jpg"],
                     "conv3": ["layer_conv3_p001.jpg"]}
    for s in out.sheets:
        img = cv2.imread(os.path.join(out.run_dir, s))
        assert img is not None and img.shape[0] > 50 and img.shape[1] > 200
    again = results_mod.load(out.run_dir)
    assert again.to_dict() == res.to_dict()
    raw = json.load(open(os.path.join(out.run_dir, "results.json")))
    assert raw["schema"] == "deconvis.results" and raw["version"] == 4 and raw["status"] == "rendered"
    assert raw["preprocess"]["crop"] == [fx.SIZE, fx.SIZE] and raw["config"]["k"] == 3
    assert all(str(i) in raw["images"]["items"] for lr in raw["layers"] for row in lr["units"]["image"] for i in row)
    # a few files per layer: one sprite per channel (tiles of rank r in column r, rec above img)
    for lr in res.layers:
        files = sorted(os.listdir(os.path.join(out.run_dir, "tiles", lr.label)))
        assert files == [f"c{u.channel:04d}.png" for u in lr.units] == [os.path.basename(u.sprite) for u in lr.units]
        sprite = cv2.imread(os.path.join(out.run_dir, lr.units[0].sprite))
        assert sprite.shape[:2] == (2 * lr.cell[0], cfg.k * lr.cell[1]) and lr.cell == lr.rf
    assert raw["sprites"]["rows"] == ["rec", "img"]
    assert not [f for f in os.listdir(out.run_dir) if f.startswith("projection.rank")]  # merged into results.json
    assert os.path.isfile(os.path.join(out.run_dir, "index.html"))
    assert os.path.isfile(os.path.join(out.run_dir, "run.log"))
    left = [f for _, _, fs in os.walk(out.run_dir) for f in fs if f.endswith(".tmp")]
    assert left == []


def test_rerun_skips_done_work(done, monkeypatch):
    cfg, out = done
    monkeypatch.setattr(mining, "mine", lambda *a, **k: pytest.fail("re-mined"))
    sheet = os.path.join(out.run_dir, out.sheets[0])
    before = os.stat(sheet).st_mtime_ns
    again = pipeline.run(cfg)
    assert not again.mined and again.projected == 0
    assert os.stat(sheet).st_mtime_ns == before  # current sheets are not re-rendered
    assert _winners(again.results) == _winners(out.results)


def test_render_only_neither_mines_nor_loads_the_model(done, monkeypatch):
    cfg, out = done
    monkeypatch.setattr(mining, "mine", lambda *a, **k: pytest.fail("re-mined"))
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("loaded the model"))
    for s in out.sheets:
        os.remove(os.path.join(out.run_dir, s))
    os.remove(os.path.join(out.run_dir, "index.html"))
    again = pipeline.run(dataclasses.replace(cfg, render_only=True, per_sheet=2))
    assert {lr.label: len(lr.sheets) for lr in again.results.layers} == {"conv1": 2, "conv2": 3, "conv3": 2}
    assert all(os.path.isfile(os.path.join(out.run_dir, s)) for s in again.sheets)
    assert os.path.isfile(again.report)
    assert _winners(again.results) == _winners(out.results)


def test_render_only_without_results_is_an_error(tmp_path):
    cfg = fx.tiny_config(tmp_path, render_only=True)
    with pytest.raises(DeconvisError, match="run without --render-only first"):
        pipeline.run(cfg)


def test_rule_change_reprojects_without_mining(done, monkeypatch):
    cfg, out = done
    monkeypatch.setattr(mining, "mine", lambda *a, **k: pytest.fail("re-mined"))
    total = sum(len(u.winners) for lr in out.results.layers for layer in (lr, lr.bottom) for u in layer.units)  # top + bottom
    again = pipeline.run(dataclasses.replace(cfg, rule="guided"))
    assert again.projected == total and again.results.rule == "guided"


def test_changed_config_is_an_error_unless_fresh(done):
    cfg, out = done
    with pytest.raises(DeconvisError, match=r"different configuration \(k: 3 -> 2\).*--fresh"):
        pipeline.run(dataclasses.replace(cfg, k=2))
    stale = os.path.join(out.run_dir, "tiles", "conv1", "c0099_0_rec.png")  # e.g. a tile of an older version
    open(stale, "wb").close()
    again = pipeline.run(dataclasses.replace(cfg, k=2, fresh=True))
    assert again.mined and all(len(u.winners) == 2 for lr in again.results.layers for u in lr.units)
    assert not os.path.exists(stale)  # --fresh dropped the old tiles folder (one rename, deleted aside)
    assert sorted(os.listdir(out.run_dir + "/tiles")) == ["conv1", "conv1-bottom", "conv2", "conv2-bottom", "conv3",
                                                          "conv3-bottom"]


def test_fresh_moves_the_tiles_aside_and_deletes_them_off_the_calling_thread(tmp_path, monkeypatch):
    """--fresh on a run folder of an older version (two files per winner): the tiles folder is gone
    at once (one rename), its files are unlinked on a background thread, never the caller's."""
    import threading

    from deconvis.runs.phases import rundir

    run_dir = tmp_path / "run"
    for i in range(300):
        (run_dir / "tiles" / f"l{i % 3}").mkdir(parents=True, exist_ok=True)
        (run_dir / "tiles" / f"l{i % 3}" / f"c{i:04d}_0_rec.png").write_bytes(b"x")
    (run_dir / "layer_conv1_p001.png").write_bytes(b"x")
    (run_dir / "projection.rank1.json").write_text("{}")
    (run_dir / "mine.txt").write_text("not ours")
    callers = []
    real_unlink = os.unlink

    def unlink(path, *a, **k):
        callers.append(threading.current_thread() is threading.main_thread())
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "unlink", unlink)
    rundir.clear_run(str(run_dir))
    assert not (run_dir / "tiles").exists()
    for t in threading.enumerate():
        if t.name == "deconvis-discard":
            t.join()
    assert sorted(os.listdir(run_dir)) == ["mine.txt"]
    assert callers.count(False) >= 300 and callers.count(True) <= 2  # the two top-level files


class _Interrupt(Exception):
    pass


def test_resume_after_interrupted_mining(tmp_path, monkeypatch):
    ref = pipeline.run(fx.tiny_config(tmp_path, run="ref"))
    cfg = fx.tiny_config(tmp_path, run="cut")
    real_update = mining.TopK.update
    calls = {"n": 0}

    def failing_update(self, acts, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Interrupt()
        return real_update(self, acts, ids)

    monkeypatch.setattr(mining.TopK, "update", failing_update)
    with pytest.raises(_Interrupt):
        pipeline.run(cfg)
    run_dir = os.path.join(cfg.out, cfg.run)
    state = torch.load(os.path.join(run_dir, "mining_state.pt"), weights_only=True)
    assert state["topk"]["seen"] == 6 and not state["complete"]
    assert not os.path.exists(os.path.join(run_dir, "results.json"))
    with pytest.raises(DeconvisError, match=r"mining state for a different configuration \(k: 3 -> 2\)"):
        pipeline.run(dataclasses.replace(cfg, k=2))
    seen_ids = []

    def recording_update(self, acts, ids):
        seen_ids.extend(ids.tolist())
        return real_update(self, acts, ids)

    monkeypatch.setattr(mining.TopK, "update", recording_update)
    out = pipeline.run(cfg)
    assert seen_ids == list(range(6, 12))  # resumed where it stopped: nothing counted twice
    assert _winners(out.results) == _winners(ref.results)


@pytest.mark.parametrize("cut,progress", [(30, "projection.rank0.json"), (50, "projection-bottom.rank0.json")])
def test_resume_after_interrupted_projection(tmp_path, monkeypatch, cut, progress):
    """Interrupted in the top-k's projection (36 units) or in the bottom-k's: the channels listed
    in that part's progress file are not projected again."""
    ref = pipeline.run(fx.tiny_config(tmp_path, run="ref"))
    cfg = fx.tiny_config(tmp_path, run="cut")
    monkeypatch.setattr(project_phase, "SAVE_EVERY_S", 0.0)
    real = render.crop_padded
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == cut:
            raise _Interrupt()
        return real(*a, **k)

    monkeypatch.setattr(render, "crop_padded", failing)
    with pytest.raises(_Interrupt):
        pipeline.run(cfg)
    run_dir = os.path.join(cfg.out, cfg.run)
    # the channels whose sprite was written before the crash, listed in this rank's progress file
    done = json.load(open(os.path.join(run_dir, progress)))["channels"]
    assert done and all(os.path.isfile(os.path.join(run_dir, e[2])) for e in done)
    if progress != "projection.rank0.json":  # every top channel was done before the bottom-k started
        top = json.load(open(os.path.join(run_dir, "projection.rank0.json")))["channels"]
        # (the top-k's last sprites are written while the bottom-k projects: saved after its error too)
        assert len(top) == sum(len(lr.units) for lr in ref.results.layers)
        done += top
    monkeypatch.setattr(render, "crop_padded", real)
    monkeypatch.setattr(mining, "mine", lambda *a, **k: pytest.fail("re-mined"))
    out = pipeline.run(cfg)
    total = sum(len(u.winners) for lr in out.results.layers for layer in (lr, lr.bottom) for u in layer.units)  # top + bottom
    assert out.projected == total - sum(len(e[5]) for e in done) < total
    for lr, rlr in zip(out.results.layers, ref.results.layers):
        for u, ru in zip(lr.units, rlr.units):
            for w, rw in zip(u.winners, ru.winners):
                assert w.box == rw.box
                for kind in ("rec", "img"):
                    a = load_tile(out.run_dir, lr, u, w, kind)
                    b = load_tile(ref.run_dir, rlr, ru, rw, kind)
                    assert np.array_equal(a, b)


def test_unreadable_images_are_skipped_and_logged(tmp_path):
    fx.write_images(tmp_path / "imgs", broken=True)
    out = pipeline.run(fx.tiny_config(tmp_path))
    assert out.results.images["count"] == 13 and out.results.images["readable"] == 12
    assert [s["id"] for s in out.results.images["skipped"]] == [12]
    text = open(os.path.join(out.run_dir, "run.log")).read()
    assert "skipped unreadable image 12" in text and "img99_broken.png" in text
    assert "1 unreadable images skipped" in text


@pytest.mark.parametrize("over,match", [
    ({"layers": ["conv9"]}, "unknown layer 'conv9'.*did you mean"),
    ({"layers": ["conv1", "fc"]}, "unknown layer 'fc'"),
    ({"images": "/nonexistent/folder"}, "does not exist"),
    ({"images": "EMPTY"}, "holds no images"),
    ({"weights": "/nonexistent/w.pt"}, "does not exist"),
    ({"weights": "asset:nope.pt"}, "does not exist"),
    ({"model": "alexnett"}, "did you mean: alexnet"),
])
def test_bad_input_fails_before_any_work(tmp_path, monkeypatch, over, match):
    monkeypatch.setattr(mining, "mine", lambda *a, **k: pytest.fail("mining started"))
    if over.get("images") == "EMPTY":
        (tmp_path / "empty").mkdir()
        over = dict(over, images=str(tmp_path / "empty"))
    cfg = fx.tiny_config(tmp_path, **over)
    with pytest.raises(DeconvisError, match=match):
        pipeline.run(cfg)
    assert not os.path.exists(os.path.join(cfg.out, cfg.run, "mining_state.pt"))


def test_bad_k_fails_in_validation(tmp_path):
    with pytest.raises(DeconvisError, match="k must be at least 1"):
        fx.tiny_config(tmp_path, k=0)


def test_channels_limit_and_alias_layers(tmp_path):
    out = pipeline.run(fx.tiny_config(tmp_path, layers=["conv2", "7"], channels=2, k=2))
    assert [(lr.label, lr.channels, lr.channels_total) for lr in out.results.layers] == [("conv2", 2, 5),
                                                                                         ("conv3", 2, 3)]


def test_cli_end_to_end(tmp_path, capsys):
    from deconvis.cli import main

    spec = fx.write_net(tmp_path)
    fx.write_images(tmp_path / "imgs")
    argv = ["visualize", "--model", spec, "--weights", "random", "--images", str(tmp_path / "imgs"),
            "--layers", "conv1,conv3", "--k", "2", "--batch-size", "5", "--resize", "32", "--crop", "32",
            "--out", str(tmp_path / "o"), "--run", "cli", "--no-progress", "--device", "cpu", "--seed", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "run cli: 2 layers, 14 units, top-2 over 12 images" in text
    run_dir = tmp_path / "o" / "cli"
    assert (run_dir / "layer_conv1_p001.png").is_file() and (run_dir / "index.html").is_file()  # tiles enlarged 3x+
    cfg = json.load(open(run_dir / "results.json"))["config"]
    assert cfg["seed"] == 1 and cfg["layers"] == ["conv1", "conv3"]
    from deconvis.runs.results import load as load_results
    res = load_results(str(run_dir))  # the summary line counts the bottom-k's projected units too
    n_bottom = sum(len(u.winners) for lr in res.layers if lr.bottom is not None for u in lr.bottom.units)
    assert n_bottom > 0 and f", and {n_bottom} bottom units, " in text
    assert main(argv + ["--render-only"]) == 0
    assert main(argv[:-2] + ["--layers", "conv7"]) == 2
    assert "deconvis: error: unknown layer 'conv7'" in capsys.readouterr().err
    assert main(["visualize", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_config_file_and_script_wrapper(tmp_path):
    spec = fx.write_net(tmp_path)
    fx.write_images(tmp_path / "imgs")
    conf = tmp_path / "tiny.yaml"
    conf.write_text(f"model: {spec}\nweights: random\nimages: imgs\nk: 2\nresize: 32\ncrop: 32\n"
                    f"layers: [conv3]\nout: {tmp_path / 'o'}\nprogress: false\ndevice: cpu\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "scripts", "visualize_layers.py"), "--config",
                           str(conf), "--channels", "1"], capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "run tiny: 1 layers, 2 units" in proc.stdout  # images: resolved against the config's folder
    assert (tmp_path / "o" / "tiny" / "layer_conv3_p001.png").is_file()  # small tiles, enlarged 3x+ on the sheet


def test_demo_config_runs_with_random_weights(tmp_path):
    from deconvis.runs.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "demo.yaml"),
                      {"weights": "random", "max_images": 10, "channels": 2, "out": str(tmp_path), "progress": False,
                       "device": "cpu"})
    out = pipeline.run(cfg)
    assert [lr.label for lr in out.results.layers] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert out.results.input_size == [128, 128] and out.n_images == 10
    assert out.results.layers[0].rf == [7, 7]
