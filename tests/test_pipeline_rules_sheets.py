"""The visualize pipeline with ``--rule guided`` and ``--rule gradient``: every reconstruction
tile equals a direct full-image ``DeconvNet.project`` with that rule cut at the unit's RF box;
and the sheets: each channel block shows that channel's winners in rank order, the image-patch
tile of each being the direct crop of the winner's image, labelled with its activation."""
from __future__ import annotations

import dataclasses
import math
import os

import cv2
import numpy as np
import pytest
import torch

import pipeline_fixtures as fx
from deconvis.render.sheets import load_tile
from deconvis.io.images import FolderImages, normalize, preprocess_image
from deconvis.io.models import load_model
from deconvis.mirror.deconvnet import DeconvNet
from deconvis.render import sheets as render
from deconvis.render.display import to_uint8
from deconvis.runs import pipeline


def _read(path):
    return cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rules")
    cfg = fx.tiny_config(tmp, rule="guided", per_sheet=3, k=3, lossless=True)  # PNG sheets: compared pixel for pixel
    guided = pipeline.run(cfg)
    guided_tiles = {(lr.name, u.channel, w.rank): load_tile(guided.run_dir, lr, u, w, "rec")
                    for lr in guided.results.layers for u in lr.units for w in u.winners}
    gradient = pipeline.run(dataclasses.replace(cfg, rule="gradient"))  # reprojects, does not re-mine
    return cfg, guided, guided_tiles, gradient


def _expected_rec(dn, shown, pp, layer, channel, w, rule):
    dn.forward(normalize(shown, pp)[None])
    full = dn.project(layer, torch.tensor([[0, channel, w.y, w.x]]), rule=rule)[0]
    y0, y1, x0, x1 = w.box
    (cy0, cy1, cx0, cx1), _ = render.clip_box(w.box, fx.SIZE, fx.SIZE)
    cut = torch.zeros(3, y1 - y0, x1 - x0, dtype=full.dtype)
    cut[:, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = full[:, cy0:cy1, cx0:cx1]
    return to_uint8(cut[None])[0]


def test_guided_and_gradient_tiles_equal_direct_projections(runs):
    cfg, guided, guided_tiles, gradient = runs
    assert not gradient.mined and gradient.results.rule == "gradient"
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, "random").model
    dn = DeconvNet(model)
    pp = pipeline.prepare(cfg, gradient.run_dir).preprocess
    src = FolderImages(cfg.images)
    changed = 0
    for lr in gradient.results.layers:
        for u in lr.units:
            for w in u.winners:
                shown = preprocess_image(src.load(w.image), pp)
                got = load_tile(gradient.run_dir, lr, u, w, "rec")
                want = _expected_rec(dn, shown, pp, lr.name, u.channel, w, "gradient")
                assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (lr.name, u.channel, w.rank)
                want_g = _expected_rec(dn, shown, pp, lr.name, u.channel, w, "guided")
                assert np.abs(guided_tiles[(lr.name, u.channel, w.rank)].astype(int) - want_g.astype(int)).max() <= 1
                changed += not np.array_equal(want, want_g)
    assert changed > 0  # the two rules differ somewhere (conv2, conv3 see ReLUs below them)


def _label_strip(layout, text):
    """The label row under one tile as the sheet draws it: background 250, text at its baseline."""
    strip = np.full((layout.th + layout.label_h, layout.tw, 3), 250, np.uint8)
    cv2.putText(strip, render._fit_text(text, layout.tw, layout.font), (1, layout.th + layout.label_h - 4), 0,
                layout.font, (60, 60, 60), 1, cv2.LINE_AA)
    return strip[layout.th:]


def test_sheets_show_each_channels_winners_in_rank_order(runs):
    cfg, _, _, out = runs
    src = FolderImages(cfg.images)
    pp = pipeline.prepare(cfg, out.run_dir).preprocess
    for lr in out.results.layers:
        th, tw, interp = render.tile_scale(lr.rf[0], lr.rf[1], cfg.min_tile, cfg.max_tile)
        layout = render.SheetLayout(k=cfg.k, th=th, tw=tw, per_sheet=cfg.per_sheet, columns=cfg.sheet_columns)
        assert len(lr.sheets) == math.ceil(len(lr.units) / cfg.per_sheet)
        for page, rel in enumerate(lr.sheets):
            sheet = _read(os.path.join(out.run_dir, rel))
            units = lr.units[page * cfg.per_sheet:(page + 1) * cfg.per_sheet]
            assert [u.channel for u in units] == list(range(page * cfg.per_sheet, page * cfg.per_sheet + len(units)))
            cols = min(layout.columns, len(units))
            for n, u in enumerate(units):
                acts = [w.activation for w in u.winners]
                assert acts == sorted(acts, reverse=True) and [w.rank for w in u.winners] == list(range(cfg.k))
                by = layout.title_h + (n // cols) * (layout.block_h + layout.margin)
                bx = layout.margin + (n % cols) * (layout.block_w + layout.margin)
                for r, w in enumerate(u.winners):
                    gy, gx = divmod(r, layout.gcols)
                    y = by + layout.head_h + gy * (th + layout.label_h + layout.gap)
                    x_img = bx + layout.grid_w + layout.mid + gx * (tw + layout.gap)
                    # the patch: the winner's image cropped at its box, grey outside, scaled to the tile
                    shown = preprocess_image(src.load(w.image), pp)
                    crop = render.crop_padded(shown, w.box)
                    want = cv2.resize(crop, (tw, th), interpolation=interp) if crop.shape[:2] != (th, tw) else crop
                    assert np.array_equal(sheet[y:y + th, x_img:x_img + tw], want), (lr.label, u.channel, r)
                    # its activation label under the reconstruction tile
                    x_rec = bx + gx * (tw + layout.gap)
                    got = sheet[y + th:y + th + layout.label_h, x_rec:x_rec + tw]
                    assert np.array_equal(got, _label_strip(layout, f"{w.activation:.3g}")), (lr.label, u.channel, r)


def test_jpeg_sheets_match_the_lossless_ones(runs, tmp_path):
    """The default sheets are the lossless sheets within JPEG's error (JPEG, quality 92, 4:4:4:
    same pages, same size, a mean error of about a level: the tiny net's noise-like tiles are
    JPEG's worst case), except those of layers whose tiles the sheets enlarge 3x or more: PNG,
    the same pixels."""
    cfg, _, _, out = runs
    lossless = {s: _read(os.path.join(out.run_dir, s)) for s in out.sheets}  # the re-render replaces them
    again = pipeline.run(dataclasses.replace(cfg, lossless=False, render_only=True))
    formats = set()
    for lr, jlr in zip(out.results.layers, again.results.layers):
        f = min(render.tile_scale(*lr.rf, cfg.min_tile, cfg.max_tile)[0] // lr.rf[0],
                render.tile_scale(*lr.rf, cfg.min_tile, cfg.max_tile)[1] // lr.rf[1])
        ext = "png" if f >= 3 else "jpg"
        formats.add(ext)
        assert [s[:-4] for s in jlr.sheets] == [s[:-4] for s in lr.sheets] and all(s.endswith(ext) for s in jlr.sheets)
        if ext == "jpg":
            assert not any(os.path.exists(os.path.join(out.run_dir, s)) for s in lr.sheets)  # no stale PNG pages
        for png, new in zip(lr.sheets, jlr.sheets):
            a, b = lossless[png], _read(os.path.join(out.run_dir, new))
            assert a.shape == b.shape
            diff = np.abs(a.astype(int) - b.astype(int))
            assert diff.max() == 0 if ext == "png" else diff.mean() < 1.2, (new, diff.mean())
    assert formats == {"png", "jpg"}  # the tiny net has both kinds of layer


def test_sheets_composed_while_projecting_equal_the_render_phases(tmp_path, monkeypatch):
    """In one process the projection's writer thread composes each layer's sheets as its channels
    complete; they are the sheets the render phase makes from the sprites (PNG: pixel for pixel),
    and the run's render phase finds them current and composes none itself."""
    cfg = fx.tiny_config(tmp_path, per_sheet=3, k=3, lossless=True)
    calls, real = [], render.render_layer
    monkeypatch.setattr(render, "render_layer", lambda lr, *a, **kw: calls.append(lr.name) or real(lr, *a, **kw))
    out = pipeline.run(cfg)
    assert calls == [] and out.sheets
    during = {s: _read(os.path.join(out.run_dir, s)) for s in out.sheets}
    again = pipeline.run(dataclasses.replace(cfg, render_only=True))  # from the sprites on disk
    assert sorted(calls) == sorted(lr.name for lr in out.results.layers)
    assert again.sheets == out.sheets
    for s in out.sheets:
        assert np.array_equal(during[s], _read(os.path.join(out.run_dir, s))), s
