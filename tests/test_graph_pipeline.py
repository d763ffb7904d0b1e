"""The visualize pipeline on graph models (ResNet-50 stages, a squeeze-excitation net) with random
weights, offline, at 64 px.

Oracles: forward hooks on the named container modules (``layer3`` means that stage's output),
the theoretical RF box, direct crops of the displayed image, and ``DeconvNet.project`` on the full
image for the reconstruction tiles (cut at the box: nothing of the projection lies outside it).
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
import torchvision

import pipeline_fixtures as fx
from deconvis.render.sheets import load_tile
from deconvis.graph.rf import receptive_fields
from deconvis.io.images import FolderImages, normalize, preprocess_image
from deconvis.mirror.deconvnet import DeconvNet
from deconvis.render.display import to_uint8
from deconvis.runs import pipeline
from deconvis.runs.config import load_config

SIZE = 64


def _run(tmp_path, model: str, layers, **over):
    images = tmp_path / "imgs"
    fx.write_images(images, n=5, duplicate=None)
    values = {"model": model, "weights": "random", "images": str(images), "layers": layers, "k": 2,
              "channels": 2, "batch_size": 5, "resize": SIZE, "crop": SIZE, "out": str(tmp_path / "out"),
              "run": "g", "progress": False, "device": "cpu", "min_tile": 8, "max_tile": 32, "seed": 3,
              "lossless": True}  # PNG sprites: the tiles are compared pixel for pixel
    values.update(over)
    cfg = load_config(None, values)
    out = pipeline.run(cfg)
    torch.manual_seed(cfg.seed)
    net = getattr(torchvision.models, model)(weights=None).eval()
    pp = pipeline.prepare(cfg, out.run_dir).preprocess
    src = FolderImages(cfg.images)
    shown = [preprocess_image(src.load(i), pp) for i in range(len(src))]
    x = torch.stack([normalize(s, pp) for s in shown])
    return out, net, shown, x


def _hooked(net, names, x):
    acts = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: acts.__setitem__(n, o.detach()))
             for n in names]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return acts


def _read(path):
    return cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1]


def _check_tiles(out, net, shown, x, layer, label, box_of):
    """Every winner: the image maximum of its channel; image tile = crop at box_of(y, x); rec tile
    = the full-image projection cut at the same box."""
    acts = _hooked(net, [layer], x)[layer]
    lr = next(l for l in out.results.layers if l.label == label)
    dn = DeconvNet(net)
    for u in lr.units:
        for w in u.winners:
            amap = acts[w.image, u.channel]
            assert float(amap.max()) == pytest.approx(w.activation, rel=1e-5, abs=1e-6)
            assert float(amap[w.y, w.x]) == pytest.approx(w.activation, rel=1e-5, abs=1e-6)
            box = list(box_of(w.y, w.x))
            assert w.box == box
            y0, y1, x0, x1 = box
            cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, SIZE), max(x0, 0), min(x1, SIZE)
            expect = np.full((y1 - y0, x1 - x0, 3), 128, np.uint8)
            expect[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = shown[w.image][cy0:cy1, cx0:cx1]
            assert np.array_equal(load_tile(out.run_dir, lr, u, w, "img"), expect)
            dn.forward(x[w.image:w.image + 1])
            full = dn.project(layer, torch.tensor([[0, u.channel, w.y, w.x]]))[0]
            cut = torch.zeros(3, y1 - y0, x1 - x0, dtype=full.dtype)
            cut[:, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = full[:, cy0:cy1, cx0:cx1]
            rec_tile = load_tile(out.run_dir, lr, u, w, "rec")
            assert np.abs(rec_tile.astype(int) - to_uint8(cut[None])[0].astype(int)).max() <= 1
    return lr


def test_visualize_resnet50_stages_offline(tmp_path):
    """``deconvis visualize --model resnet50 --layers layer1,...,layer4`` with random weights: each
    stage name means the stage's output; winners, patches and reconstructions are right."""
    layers = ["layer1", "layer2", "layer3", "layer4"]
    out, net, shown, x = _run(tmp_path, "resnet50", layers)
    assert [lr.label for lr in out.results.layers] == layers
    assert all(os.path.isfile(os.path.join(out.run_dir, s)) for s in out.sheets)
    assert os.path.isfile(os.path.join(out.run_dir, "index.html"))
    table = receptive_fields(net, SIZE)
    for layer in layers:
        lr = _check_tiles(out, net, shown, x, layer, layer, lambda y, x_, l=layer: table.box(l, y, x_))
        assert lr.channels == 2


def test_squeeze_excitation_layer_is_cropped_by_its_local_field(tmp_path, caplog):
    """After an SE gate every unit sees the whole image; the tiles show the local field of the
    conv path (the gate detached), and the run says so."""
    import logging

    with caplog.at_level(logging.INFO, logger="deconvis"):
        out, net, shown, x = _run(tmp_path, "mobilenet_v3_small", ["features.4"], k=1)
    row = receptive_fields(net, SIZE)["features.4"]
    assert row.whole and row.local is not None and row.local.rf[0] < SIZE
    _check_tiles(out, net, shown, x, "features.4", "features.4", lambda y, x_: row.local.box(y, x_))
    assert "local field" in caplog.text
