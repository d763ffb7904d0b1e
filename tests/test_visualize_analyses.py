"""``deconvis visualize --analyses``: each Section 4 analysis writes its files and a report
section whose numbers equal the analysis API called directly; resuming does not recompute;
``--fresh`` does; a bad name is a one-line error with a suggestion; old results.json still load."""
from __future__ import annotations

import dataclasses
import json
import os

import cv2
import numpy as np
import pytest
import torch

import pipeline_fixtures as fx
from deconvis.analysis.occlusion import occlusion
from deconvis.errors import DeconvisError
from deconvis.runs import pipeline
from deconvis.runs import results as R
from deconvis.runs.phases import analyses as A

ALL = ["invariance", "correspondence", "diagnose"]


def _parts(tmp_path) -> str:
    """Three 32x32 images (no resize: photo pixels = input pixels) with one part box each."""
    folder = tmp_path / "parts"
    folder.mkdir()
    rng = np.random.default_rng(1)
    recs = []
    for i in range(3):
        img = (cv2.GaussianBlur(rng.normal(0, 1, (32, 32, 3)), (0, 0), 1.2) * 60 + 128).clip(0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"f{i}.png"), img)
        recs.append({"image": f"f{i}.png", "part": "eye", "box": [6 + i, 14 + i, 8, 16]})
        recs.append({"image": f"f{i}.png", "part": "mouth", "box": [20, 26, 10 + i, 20 + i]})
    path = folder / "parts.json"
    path.write_text(json.dumps(recs))
    return str(path)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("an")
    cfg = fx.tiny_config(tmp, analyses=ALL, correspondence_parts=_parts(tmp), analysis_images=2)
    return tmp, cfg, pipeline.run(cfg)


def _model_and_inputs(cfg, n):
    """The run's model (random weights drawn from the seed, as the run does) and its first ``n``
    images, read and normalised here with OpenCV + numpy (not the pipeline's loader)."""
    from deconvis.io.models import load_model

    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.model, "random", torch.device("cpu"))
    xs = []
    for name in sorted(os.listdir(cfg.images))[:n]:
        bgr = cv2.imread(os.path.join(cfg.images, name), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        h, w = rgb.shape[:2]  # every test image is larger than 32 px: short side to 32 (area), centre crop
        nh, nw = (fx.SIZE, int(fx.SIZE * w / h)) if h <= w else (int(fx.SIZE * h / w), fx.SIZE)
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        top, left = int(round((nh - fx.SIZE) / 2)), int(round((nw - fx.SIZE) / 2))
        xs.append(_normalise(rgb[top:top + fx.SIZE, left:left + fx.SIZE], lm.preprocess))
    return lm, torch.stack(xs)


def _normalise(rgb, pp):
    """uint8 RGB [h, w, 3] -> float32 [3, h, w], (x / 255 - mean) / std in float32."""
    x = (rgb.astype(np.float32) * np.float32(1 / 255) - np.float32(pp.mean)) / np.float32(pp.std)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def test_each_analysis_writes_its_files_and_report_section(done):
    _, _, out = done
    saved = R.load(out.run_dir)
    html = open(out.report, encoding="utf-8").read()
    assert list(saved.analyses) == ALL
    for name in ALL:
        rec = saved.analyses[name]
        assert rec.status == "done", rec.reason
        assert {"json", "png"} <= set(rec.files)
        for p in rec.files.values():
            assert p.startswith(f"analyses/{name}/") and os.path.getsize(os.path.join(out.run_dir, p)) > 0
        png = cv2.imread(os.path.join(out.run_dir, rec.files["png"]))
        assert png is not None and min(png.shape[:2]) > 100
        assert f'id="A-{name}"' in html and f'src="{rec.files["png"]}"' in html
        for row in rec.rows:  # every key number is in the page as shown
            for v in row:
                assert (f"{v:.4g}" if isinstance(v, float) else str(v)) in html
    d = json.load(open(os.path.join(out.run_dir, saved.analyses["diagnose"].files["json"])))
    assert d["settings_hash"] == saved.analyses["diagnose"].settings_hash and d["result"]["images"] == 12


def test_report_numbers_equal_the_analysis_apis(done):
    from deconvis.analysis.correspondence import correspondence
    from deconvis.analysis.diagnose import channel_max
    from deconvis.analysis.invariance import invariance, sweep_amounts

    tmp, cfg, out = done
    rec = out.results.analyses
    lm, x = _model_and_inputs(cfg, 2)
    # invariance: default sweeps of `deconvis invariance`, the run's first and last layer
    h = fx.SIZE
    amounts = {"translate": sweep_amounts("translate", 13, round(0.268 * h)), "scale": sweep_amounts("scale", 9, 1.8),
               "rotate": sweep_amounts("rotate", 36, 360.0)}
    inv = invariance(lm.model, x, ["conv1", "conv3"], amounts, fill="mean")
    got = {r[0]: r[2:] for r in rec["invariance"].rows}
    for s in inv.sweeps:
        want = [s.relative["conv1"].max(), s.relative["conv3"].max(), s.probability.min()]
        np.testing.assert_allclose(got[s.transform], want, rtol=1e-9)
    # correspondence: boxes are input pixels (32x32 images, no resize)
    folder = os.path.dirname(cfg.correspondence_parts)
    xs = []
    for i in range(3):
        rgb = cv2.cvtColor(cv2.imread(os.path.join(folder, f"f{i}.png")), cv2.COLOR_BGR2RGB)
        xs.append(_normalise(rgb, lm.preprocess))
    boxes = {"eye": [(6 + i, 14 + i, 8, 16) for i in range(3)], "mouth": [(20, 26, 10 + i, 20 + i) for i in range(3)]}
    cor = correspondence(lm.model, torch.stack(xs), boxes, ["conv1", "conv3"], 5, 0, "mean")
    got = {r[0]: r[1:] for r in rec["correspondence"].rows}
    assert set(got) == {"eye", "mouth", "random(eye)", "random(mouth)"}
    for row, cols in cor.table.items():
        np.testing.assert_allclose(got[row], [cols["conv1"].mean, cols["conv3"].mean], rtol=1e-12)
    # diagnose: dead channels by a plain max over all 12 images
    _, x12 = _model_and_inputs(cfg, 12)
    mx = channel_max(lm.model, x12, ["conv1", "conv2", "conv3"])
    assert rec["diagnose"].rows == [[l, len(v), int((v <= 0).sum())] for l, v in mx.items()]


def test_resume_does_not_recompute_and_fresh_does(done, monkeypatch):
    tmp, cfg, out = done
    calls = []
    for name in ALL:
        plan, run = A.REGISTRY[name]
        monkeypatch.setitem(A.REGISTRY, name, (plan, lambda *a, _r=run, _n=name: (calls.append(_n), _r(*a))[1]))
    again = pipeline.run(cfg)
    assert calls == [] and again.results.analyses.keys() == out.results.analyses.keys()
    assert [r.rows for r in again.results.analyses.values()] == [r.rows for r in out.results.analyses.values()]
    # --render-only keeps the sections (from results.json; no model, nothing recomputed)
    os.remove(again.report)
    pipeline.run(dataclasses.replace(cfg, render_only=True))
    assert calls == [] and all(f'id="A-{n}"' in open(again.report, encoding="utf-8").read() for n in ALL)
    # a missing figure is recomputed (only that analysis)
    os.remove(os.path.join(out.run_dir, out.results.analyses["diagnose"].files["png"]))
    pipeline.run(cfg)
    assert calls == ["diagnose"]
    calls.clear()
    pipeline.run(dataclasses.replace(cfg, fresh=True, analyses=["diagnose"]))
    assert calls == ["diagnose"] and not os.path.exists(os.path.join(out.run_dir, "analyses", "invariance"))


def test_correspondence_skipped_without_part_boxes(tmp_path):
    out = pipeline.run(fx.tiny_config(tmp_path, analyses=["correspondence"]))
    rec = out.results.analyses["correspondence"]
    assert rec.status == "skipped" and "--correspondence-parts" in rec.reason
    assert "Skipped: no part boxes" in open(out.report, encoding="utf-8").read()


def test_bad_analysis_name_is_a_one_line_error_with_a_suggestion(tmp_path, capsys):
    from deconvis.cli import main

    with pytest.raises(DeconvisError, match=r"unknown analysis 'invarance'.*did you mean: invariance"):
        fx.tiny_config(tmp_path, analyses=["invarance"])
    assert main(["visualize", "--analyses", "diagnose,ocllusion", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean: occlusion" in err
    # a missing part-box file fails before any mining
    with pytest.raises(DeconvisError, match="part-box file .*nope.yaml.* does not exist"):
        pipeline.run(fx.tiny_config(tmp_path, analyses=["correspondence"], correspondence_parts="nope.yaml"))
    assert not os.path.exists(os.path.join(str(tmp_path), "out", "t", "results.json"))


def test_results_without_analyses_load_and_records_round_trip():
    fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "results_v1", "results.json")
    d = json.load(open(fixture, encoding="utf-8"))
    assert "analyses" not in d
    res = R.Results.from_dict(d)
    assert res.analyses == {}
    res.analyses["diagnose"] = R.AnalysisRecord("diagnose", "done", files={"png": "a.png"}, headers=["x"],
                                                rows=[[1.5]], notes=["n"], settings_hash="h", seconds=1.0)
    back = R.Results.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.analyses == res.analyses
    d["analyses"] = {"diagnose": {"name": "diagnose", "bogus": 1}}
    with pytest.raises(DeconvisError, match="malformed"):
        R.Results.from_dict(d)


def test_occlusion_section_equals_the_occlusion_api(tmp_path):
    cfg = fx.tiny_config(tmp_path, analyses=["occlusion"], analysis_images=1)
    out = pipeline.run(cfg)
    rec = out.results.analyses["occlusion"]
    assert rec.status == "done" and os.path.isfile(os.path.join(out.run_dir, rec.files["png"]))
    assert 'id="A-occlusion"' in open(out.report, encoding="utf-8").read()
    lm, x = _model_and_inputs(cfg, 1)
    # the subcommand's 32 px square and 8 px stride at 224 px, scaled to the 32 px input
    res = occlusion(lm.model, x[0], size=5, stride=1, fill="mean")
    [row] = rec.rows
    assert row[:4] == ["img00.png", "conv3", res.channel, res.name(res.target)]
    np.testing.assert_allclose(row[4:6], [res.clean_probability, res.probability.min()], rtol=1e-12)
    assert row[6] == 28 * 28
    with torch.no_grad():  # the unoccluded probability by a plain forward
        p = torch.softmax(lm.model(x[:1]).double(), 1)[0]
    assert res.target == int(p.argmax()) and abs(row[4] - float(p.max())) < 1e-6


def test_demo_analyses_config_loads():
    from deconvis.runs.config import ANALYSES, load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "demo_analyses.yaml"))
    assert cfg.run == "demo_analyses" and cfg.analyses == list(ANALYSES) and cfg.model == "zfnet_demo"


def test_an_analysis_the_model_cannot_do_is_skipped_and_the_run_finishes(tmp_path):
    net = tmp_path / "convonly.py"
    net.write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), "
                   "nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.ReLU())\n")
    out = pipeline.run(fx.tiny_config(tmp_path, model=f"{net}:make", analyses=["invariance", "diagnose"]))
    inv, dia = out.results.analyses["invariance"], out.results.analyses["diagnose"]
    assert inv.status == "skipped" and "logits" in inv.reason and dia.status == "done"
    text = open(out.report, encoding="utf-8").read()
    assert "Skipped: " in text and 'id="A-diagnose"' in text
