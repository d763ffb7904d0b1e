"""The typed per-layer record of a run (runs/layers.py): built once in prepare, its geometry
against the hand-computed receptive field of METHOD.md section 3 (pipeline_fixtures.theoretical_box)."""
from __future__ import annotations

import torch

import pipeline_fixtures as fx
from deconvis.render.sheets import clip_box
from deconvis.runs import pipeline


def test_layer_specs_match_the_theoretical_receptive_fields(tmp_path):
    cfg = fx.tiny_config(tmp_path, layers=["conv1", "conv3", "conv2"], channels=2)
    ctx = pipeline.prepare(cfg, str(tmp_path))
    assert [s.label for s in ctx.specs] == ["conv1", "conv3", "conv2"] and ctx.layers == [s.name for s in ctx.specs]
    model = ctx.loaded.model
    acts = ctx.dn.forward(torch.zeros(1, 3, fx.SIZE, fx.SIZE))
    for spec in ctx.specs:
        a = acts[spec.name]
        assert spec.channels_total == a.shape[1] and spec.channels == 2 and spec.map_size == tuple(a.shape[2:])
        h, w = spec.map_size
        for y, x in [(0, 0), (h // 2, w // 3), (h - 1, w - 1)]:
            want = fx.theoretical_box(model, spec.name, y, x)
            assert spec.rf_size == (want[1] - want[0], want[3] - want[2])
            assert spec.crop_box(y, x) == clip_box(want, fx.SIZE, fx.SIZE), (spec.label, y, x)
