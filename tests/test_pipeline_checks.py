"""Faults injected into a whole run: non-finite activations while mining, and an image changed in
place between mining and projection (the replay check)."""
from __future__ import annotations

import json
import math
import os
import shutil

import cv2
import numpy as np
import pytest

import pipeline_fixtures as fx
from deconvis.errors import DeconvisError
from deconvis.runs import pipeline
from deconvis.runs.phases import mine as mine_phase


def test_non_finite_activations_are_named_never_win_and_results_stay_valid(tmp_path, monkeypatch):
    real = mine_phase.mining_forward

    def poisoned(ctx):
        fwd = real(ctx)
        first, second = ctx.layers[0], ctx.layers[1]

        def run(x):
            acts = dict(fwd(x))
            a, b = acts[first].clone(), acts[second].clone()
            a[0, 1, 0, 0] = float("inf")   # an fp16-style overflow in conv1 channel 1, first image of each batch
            b[1, 0, 2, 2] = float("nan")   # a NaN in conv2 channel 0, second image of each batch
            acts[first], acts[second] = a, b
            return acts
        return run

    monkeypatch.setattr(mine_phase, "mining_forward", poisoned)
    out = pipeline.run(fx.tiny_config(tmp_path))  # batches of 3: images 0, 3, 6, 9 and 1, 4, 7, 10
    with open(os.path.join(out.run_dir, "results.json")) as f:
        saved = json.load(f, parse_constant=lambda c: pytest.fail(f"non-finite {c} in results.json"))
    layers = {lr["label"]: lr for lr in saved["layers"]}
    ch1 = layers["conv1"]["units"]["image"][1]
    ch0 = layers["conv2"]["units"]["image"][0]
    assert len(ch1) == 3 and not set(ch1) & {0, 3, 6, 9}
    assert len(ch0) == 3 and not set(ch0) & {1, 4, 7, 10}
    assert all(math.isfinite(w.activation) for lr in out.results.layers for u in lr.units for w in u.winners)
    nf = saved["stats"]["nonfinite"]
    assert nf["conv1"] == {"images": 4, "channels": {"1": 4}, "first_image": 0}
    assert nf["conv2"]["channels"] == {"0": 4} and nf["conv2"]["first_image"] == 1
    text = open(os.path.join(out.run_dir, "run.log")).read()
    assert text.count("layer conv1: non-finite") == 1 and text.count("layer conv2: non-finite") == 1  # once per layer
    assert "channel 1 (4 images); first in image 0 (img00.png)" in text


def _winner_image(out) -> int:
    return out.results.layers[0].units[0].winners[0].image


def test_replay_check_catches_an_image_changed_in_place(tmp_path):
    out = pipeline.run(fx.tiny_config(tmp_path))
    rep = out.results.stats["replay"]
    assert rep["checked"] == 72 and rep["mismatches"] == 0  # same device and precision: all match (top + bottom)
    # the winning image's content changes under the same name; its tiles are gone: re-projected (counts add up)
    i = _winner_image(out)
    path = os.path.join(str(tmp_path), "imgs", f"img{i:02d}.png")
    img = cv2.imread(path)
    cv2.imwrite(path, np.ascontiguousarray(255 - img))
    shutil.rmtree(os.path.join(out.run_dir, "tiles"))
    with pytest.raises(DeconvisError, match=r"replay check: [1-9]\d* of 144 .*replay_max_mismatch=0.*--fresh"):
        pipeline.run(fx.tiny_config(tmp_path))
    with open(os.path.join(out.run_dir, "results.json")) as f:
        saved = json.load(f)
    assert saved["stats"]["replay"]["mismatches"] >= 1  # counted in results.json before failing
    text = open(os.path.join(out.run_dir, "run.log")).read()
    assert "replay check:" in text and f"image {i}: mined" in text
    # the verdict sticks on resume (the tiles stay suspect), unless the threshold allows them
    with pytest.raises(DeconvisError, match="replay check"):
        pipeline.run(fx.tiny_config(tmp_path))
    again = pipeline.run(fx.tiny_config(tmp_path, replay_max_mismatch=None))
    assert again.results.stats["replay"]["mismatches"] >= 1
