"""The feature-evolution callback (ZF Fig. 4): leaves training bitwise unchanged, draws the right
figure, resumes, and rejects bad configurations when it is built."""
from __future__ import annotations

import random
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from deconvis.mirror.deconvnet import DeconvNet
from deconvis.errors import DeconvisError
from deconvis.training.evolution import COL_GAP, GAP_INNER, HEADER_H, LABEL_W, ROW_GAP, TITLE_H, figure_size, filter_grid
from deconvis.training.snapshots import SnapshotCallback, preserve_training_state


class Tiny(nn.Module):
    """conv-relu-pool-conv-relu-avgpool-fc chain with dropout (so training consumes the RNG)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(24, 3))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def make(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def data(n=12, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


def train_run(epochs, callback_factory=None, steps_per_epoch=3):
    """Fixed-seed training; shuffling and dropout draw from the global RNGs."""
    model = make()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cb = callback_factory(model) if callback_factory else None
    torch.manual_seed(42)
    random.seed(42)
    np.random.seed(42)
    losses = []
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x))
        for b in range(steps_per_epoch):
            idx = perm[b * 4:(b + 1) * 4]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) + 0.0 * random.random() + 0.0 * np.random.rand()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            if cb is not None:
                cb.on_step_end(step, model)
        if cb is not None:
            cb.on_epoch_end(epoch, model)
    return losses, model, cb


def test_callback_does_not_change_training(tmp_path):
    probe = data(5, seed=7)[0]
    ref_losses, ref_model, _ = train_run(2)
    losses, model, cb = train_run(2, lambda m: SnapshotCallback(
        m, probe, ["conv1", "conv2"], features_per_layer=2, epochs="all", every_n_steps=2,
        out_dir=str(tmp_path), tile_size=8))
    assert len(cb.columns) == 2 + 3  # every epoch + steps 2, 4, 6
    assert losses == ref_losses  # bitwise
    for (k, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


def test_snapshot_keeps_grads_modes_rng_and_params(tmp_path):
    model = make()
    x, y = data()
    cb = SnapshotCallback(model, x[:4], ["conv2"], features_per_layer=3, epochs=[1], out_dir=None, tile_size=8)
    nn.functional.cross_entropy(model(x), y).backward()
    model.train()
    model.features[3].eval()  # mixed modes must come back as they were
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    col = cb.on_epoch_end(1, model)
    assert col is not None
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]) and torch.equal(p.detach(), params[n])
        assert p.grad.grad_fn is None
    for t in list(col.rec.values()) + list(col.value.values()):
        assert not t.requires_grad
    assert cb.on_epoch_end(2, model) is None  # not a chosen epoch
    # the guard restores modes and RNG even when the body fails
    with pytest.raises(RuntimeError):
        with preserve_training_state(model):
            torch.rand(3)
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), states[0]) and model.training


def test_snapshot_finds_the_probe_set_maximum():
    """Independent check with forward hooks on the plain model: the projected unit is the
    argmax of each chosen channel over all probe images and positions."""
    model = make(3).eval()
    probe = data(6, seed=11)[0]
    cb = SnapshotCallback(model, probe, ["conv2"], features_per_layer=[5, 0, 2], epochs=[1], batch_size=4, tile_size=8)
    col = cb.snapshot(epoch=1)
    got = {}
    h = model.features[4].register_forward_hook(lambda m, i, o: got.__setitem__("a", o.detach()))
    with torch.no_grad():
        model(probe)
    h.remove()
    act = got["a"]
    for row, c in enumerate([5, 0, 2]):
        n, ch, yy, xx = col.units["features.4"][row].tolist()
        assert ch == c
        assert act[n, c, yy, xx] == act[:, c].max()
        assert col.value["features.4"][row] == act[:, c].max()
    # "top": the strongest channels at the first snapshot, then fixed
    cb2 = SnapshotCallback(model, probe, ["conv2"], features_per_layer=2, select="top", epochs="all", tile_size=8)
    cb2.snapshot(epoch=1)
    maxima = act.amax(dim=(0, 2, 3))
    assert cb2.features["features.4"] == torch.argsort(-maxima, stable=True)[:2].tolist()
    with torch.no_grad():
        model.features[3].weight.mul_(-1.0)  # the net changes; the features do not
    cb2.snapshot(epoch=2)
    assert [c.units["features.4"][:, 1].tolist() for c in cb2.columns] == [cb2.features["features.4"]] * 2


def test_evolution_figure_layout(tmp_path):
    model = make()
    probe = data(5, seed=3)[0]
    t = 12
    cb = SnapshotCallback(model, probe, ["conv1", "conv2"], features_per_layer=3, select="first",
                          epochs=[1, 2, 4], out_dir=str(tmp_path), tile_size=t)
    for e in range(1, 5):
        cb.on_epoch_end(e, model)
    fig = cb.figures["features.1"]
    rows, cols = 3, 3
    assert fig.shape[:2] == figure_size(rows, cols, t)
    assert fig.shape == (TITLE_H + HEADER_H + rows * t + (rows - 1) * ROW_GAP,
                         LABEL_W + cols * (2 * t + GAP_INNER) + (cols - 1) * COL_GAP, 3)
    for j, col in enumerate(cb.columns):
        for i in range(rows):
            y = TITLE_H + HEADER_H + i * (t + ROW_GAP)
            x = LABEL_W + j * (2 * t + GAP_INNER + COL_GAP)
            rec = fig[y:y + t, x:x + t]
            patch = fig[y:y + t, x + t + GAP_INNER:x + 2 * t + GAP_INNER]
            assert np.array_equal(rec, col.rec["features.1"][i].numpy())
            assert np.array_equal(patch, col.patch["features.1"][i].numpy())
            if col.value["features.1"][i] > 0:  # the unit fired: a real picture, not flat grey
                assert rec.std() > 0 and patch.std() > 0
    assert [c.label for c in cb.columns] == ["1", "2", "4"]
    png = tmp_path / "evolution_conv1.png"
    assert png.is_file() and (tmp_path / "evolution_conv2.png").is_file()
    import cv2

    assert cv2.imread(str(png)).shape == fig.shape


def test_resume_keeps_earlier_columns(tmp_path):
    model = make()
    probe = data(4, seed=5)[0]
    kw = dict(layers=["conv1", "conv2"], features_per_layer=2, epochs=[1, 2, 3, 4], out_dir=str(tmp_path), tile_size=8)
    first = SnapshotCallback(model, probe, **kw)
    first.on_epoch_end(1, model)
    with torch.no_grad():
        model.features[0].weight.add_(0.3)
    first.on_epoch_end(2, model)
    saved = {l: [c.rec[l].clone() for c in first.columns] for l in first.layers}
    feats = dict(first.features)
    del first  # "interrupted"
    again = SnapshotCallback(model, probe, **kw)
    assert [c.label for c in again.columns] == ["1", "2"] and again.features == feats
    with torch.no_grad():
        model.features[0].weight.add_(0.3)
    again.on_epoch_end(3, model)
    again.on_epoch_end(4, model)
    assert [c.label for c in again.columns] == ["1", "2", "3", "4"]
    for l in again.layers:
        for k in range(2):
            assert torch.equal(again.columns[k].rec[l], saved[l][k])
    assert again.figures["features.1"].shape[:2] == figure_size(2, 4, 8)
    st = torch.load(tmp_path / "snapshots.pt", weights_only=True)
    assert [c["label"] for c in st["columns"]] == ["1", "2", "3", "4"]
    # an epoch re-run after a resumed training run replaces that column and later ones
    again.on_epoch_end(2, model)
    assert [c.label for c in again.columns] == ["1", "2"]
    # another configuration in the same folder is refused, not mixed in
    with pytest.raises(DeconvisError, match="different"):
        SnapshotCallback(model, probe, **{**kw, "rule": "guided"})
    fresh = SnapshotCallback(model, probe, **{**kw, "rule": "guided"}, resume=False)
    assert fresh.columns == []


def test_bad_configuration_fails_at_construction():
    model = make()
    probe = data(3)[0]
    ok = dict(layers=["conv1"], features_per_layer=2)
    cases = [
        (dict(layers=["conv3"]), "unknown layer 'conv3'.*did you mean"),
        (dict(layers=["cnv1"]), "did you mean: conv1"),
        (dict(layers=[]), "layers is empty"),
        (dict(layers=["conv1", "features.1"]), "listed twice"),
        (dict(layers=["fc1"]), "no spatial map"),
        (dict(epochs=[1, 5, 5]), "strictly increasing"),
        (dict(epochs=[3, 2]), "strictly increasing"),
        (dict(epochs=[0, 1]), "counted from 1"),
        (dict(epochs=[]), "epochs is empty"),
        (dict(epochs=[1.5]), "integers"),
        (dict(features_per_layer=5), "has only 4 channels"),
        (dict(features_per_layer=0), "at least 1"),
        (dict(features_per_layer=[1, 4]), "out of range.*4 channels"),
        (dict(features_per_layer=[1, 1]), "repeat"),
        (dict(features_per_layer={"conv2": [0]}), "not in layers"),
        (dict(features_per_layer={}), "no channels for"),
        (dict(rule="deconv"), "unknown rule.*did you mean: deconvnet"),
        (dict(select="best"), "unknown feature selection"),
        (dict(every_n_steps=0), "every_n_steps"),
        (dict(tile_size=2), "tile_size"),
        (dict(mean=[0.5, 0.5]), "mean has 2 values"),
        (dict(tensorboard=3), "tensorboard must be"),
    ]
    for kw, msg in cases:
        with pytest.raises(DeconvisError, match=msg):
            SnapshotCallback(model, probe, **{**ok, **kw})
    with pytest.raises(DeconvisError, match="empty"):
        SnapshotCallback(model, probe[:0], **ok)
    with pytest.raises(DeconvisError, match="empty"):
        SnapshotCallback(model, [], **ok)
    with pytest.raises(DeconvisError, match="channels"):
        SnapshotCallback(model, torch.randn(2, 1, 16, 16), **ok)
    with pytest.raises(DeconvisError, match="model"):
        SnapshotCallback(probe, probe, **ok)  # the model comes first
    # a dataset of (image, label) works as a probe set
    ds = torch.utils.data.TensorDataset(probe, torch.zeros(3))
    assert SnapshotCallback(model, ds, **ok).probe.shape == probe.shape
    # features by alias or module name, in a dict
    cb = SnapshotCallback(model, probe, layers=["conv1", "features.4"], features_per_layer={"features.1": [0], "conv2": [5, 1]})
    assert cb.features == {"features.1": [0], "features.4": [5, 1]}


def test_tensorboard_logging_and_missing_package(tmp_path, monkeypatch):
    class Writer:
        def __init__(self):
            self.images, self.scalars = [], []

        def add_image(self, tag, img, global_step=None, dataformats="CHW"):
            self.images.append((tag, img.shape, global_step, dataformats))

        def add_scalar(self, tag, value, global_step=None):
            self.scalars.append((tag, value, global_step))

    w = Writer()
    model = make()
    cb = SnapshotCallback(model, data(3)[0], ["conv1"], features_per_layer=2, epochs=[1, 2], tensorboard=w, tile_size=8)
    cb.on_epoch_end(1, model)
    cb.on_epoch_end(2, model)
    evo = [i for i in w.images if i[0] == "deconvis/evolution/conv1"]
    assert [i[2] for i in evo] == [1, 2] and evo[-1][1] == cb.figures["features.1"].shape and evo[-1][3] == "HWC"
    assert [s[2] for s in w.scalars] == [1, 2]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(DeconvisError, match="pip install tensorboard"):
        SnapshotCallback(model, data(3)[0], ["conv1"], features_per_layer=2, tensorboard=str(tmp_path / "tb"))


def _fake_lightning(monkeypatch):
    class Callback:
        pass

    pkg = types.ModuleType("lightning")
    sub = types.ModuleType("lightning.pytorch")
    sub.Callback = Callback
    pkg.pytorch = sub
    monkeypatch.setitem(sys.modules, "lightning", pkg)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", sub)
    import deconvis.training.lightning as dl

    monkeypatch.setattr(dl, "_CLASS", None)
    return Callback


def test_lightning_adapter_with_a_stand_in_lightning(monkeypatch):
    base = _fake_lightning(monkeypatch)
    from deconvis.training.lightning import SnapshotLightningCallback

    assert issubclass(SnapshotLightningCallback, base)
    net = make()
    pl_module = nn.Module()
    pl_module.net = net
    cb = SnapshotCallback(net, data(3)[0], ["conv1"], features_per_layer=2, epochs=[1, 2], every_n_steps=5, tile_size=8)
    adapter = SnapshotLightningCallback(cb, model_attr="net")
    rank1 = types.SimpleNamespace(current_epoch=0, global_step=5, is_global_zero=False, sanity_checking=False)
    adapter.on_train_epoch_end(rank1, pl_module)
    adapter.on_train_batch_end(rank1, pl_module, None, None, 0)
    assert cb.columns == []  # only global rank 0 snapshots
    rank0 = types.SimpleNamespace(current_epoch=0, global_step=4, is_global_zero=True, sanity_checking=False)
    adapter.on_train_batch_end(rank0, pl_module, None, None, 3)
    assert cb.columns == []
    rank0.global_step = 5
    adapter.on_train_batch_end(rank0, pl_module, None, None, 4)
    adapter.on_train_epoch_end(rank0, pl_module)  # Lightning counts epochs from 0
    assert [c.label for c in cb.columns] == ["step 5", "1"]
    with pytest.raises(DeconvisError, match="no attribute 'model'"):
        SnapshotLightningCallback(cb, model_attr="model").on_train_epoch_end(rank0, pl_module)


def test_lightning_missing_is_a_clear_error(monkeypatch):
    import deconvis.training.lightning as dl

    monkeypatch.setattr(dl, "_CLASS", None)
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(DeconvisError, match="pip install lightning"):
        dl.SnapshotLightningCallback


def test_real_lightning_adapter_is_a_callback():
    pl = pytest.importorskip("lightning.pytorch")
    import deconvis.training.lightning as dl

    dl._CLASS = None
    assert issubclass(dl.SnapshotLightningCallback, pl.Callback)


def test_filter_grid_shapes_and_contrast():
    w = torch.randn(10, 3, 5, 5)
    g = filter_grid(w, scale=3, gap=1)
    assert g.dtype == np.uint8 and g.shape == (3 * 15 + 2, 4 * 15 + 3, 3)  # 4 per row (ceil(sqrt(10))), 3 rows
    tile = g[:15, :15]
    assert tile.min() == 0 or tile.max() == 255  # stretched to the full range
    flat = filter_grid(torch.zeros(2, 1, 3, 3), scale=1)
    assert np.all(flat[:3, :3] == 128)
    with pytest.raises(DeconvisError):
        filter_grid(torch.randn(4, 5, 3, 3))


def test_deconvnet_contract_used_here():
    """The calls the callback relies on exist with the contract's shapes."""
    model = make().eval()
    dn = DeconvNet(model)
    x = data(2)[0]
    dn.forward(x)
    units = torch.tensor([[1, 2, 3, 4]])
    rec, boxes = dn.project_window("conv2", units)
    assert rec.shape[:2] == (1, 3) and boxes.shape == (1, 4)
    assert boxes[0, 1] - boxes[0, 0] == rec.shape[2]


def test_real_tensorboard_writer(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    model = make()
    cb = SnapshotCallback(model, data(3)[0], ["conv1"], features_per_layer=2, epochs=[1],
                          tensorboard=str(tmp_path / "tb"), tile_size=8)
    cb.on_epoch_end(1, model)
    cb.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_snapshot_callback_on_a_resnet18_training_loop(tmp_path):
    """A ResNet-18 training loop (BatchNorm in train mode, residual adds): the callback leaves
    training bitwise unchanged, each stage name means the stage's output, the projected unit is
    the probe-set maximum (forward hooks on the plain model), and the reconstruction is the full
    projection cut at the unit's RF box."""
    import torchvision

    def run(with_cb):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=3)
        x, y = data(8, size=32, seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        cb = SnapshotCallback(model, x[:4], ["layer1", "layer3"], features_per_layer=2, epochs="all",
                              out_dir=str(tmp_path), tile_size=8, resume=False) if with_cb else None
        losses = []
        for epoch in (1, 2):
            model.train()
            for b in range(2):
                loss = nn.functional.cross_entropy(model(x[b * 4:(b + 1) * 4]), y[b * 4:(b + 1) * 4])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            if cb is not None:
                cb.on_epoch_end(epoch, model)
        return losses, model, cb, x

    ref, ref_model, _, _ = run(False)
    losses, model, cb, x = run(True)
    assert losses == ref and len(cb.columns) == 2
    for (k, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k  # BN running statistics included
    model.eval()
    probe = x[:4]
    got = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach()))
             for n in ("layer1", "layer3")]
    with torch.no_grad():
        model(probe)
    for h in hooks:
        h.remove()
    col = cb.columns[-1]
    dn = DeconvNet(model)
    for name in ("layer1", "layer3"):
        key = dn.resolve(name)
        act = got[name]
        for row, (n, c, yy, xx) in enumerate(col.units[key].tolist()):
            assert float(act[n, c, yy, xx]) == pytest.approx(float(act[:, c].max()), rel=1e-6)
            dn.forward(probe[n:n + 1])
            full = dn.project(name, torch.tensor([[0, c, yy, xx]]))[0]
            y0, y1, x0, x1 = col.boxes[key][row].tolist()
            assert list(dn.receptive_fields(32).box(name, yy, xx)) == [y0, y1, x0, x1]
            inside = full[:, max(y0, 0):y1, max(x0, 0):x1]
            assert float(inside.abs().sum()) == pytest.approx(float(full.abs().sum()), rel=1e-5)
