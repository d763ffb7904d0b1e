"""``deconvis train`` at a tiny size in the default suite: the CLI, bitwise resume (model and
snapshots) against an uninterrupted run, the sgd optimiser, the cosine and constant schedules
against their closed forms, and ZF's filter renormalisation against a naive per-filter loop."""
from __future__ import annotations

import dataclasses
import math
import os
import re

import pytest
import torch

from deconvis.cli import main
from deconvis.training.train import TrainConfig, renormalise_filters, train


def _cfg(out_dir, **kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, num_classes=2, samples_per_class=2, image_size=64, val_samples=2,
                out_dir=str(out_dir), snapshot_epochs=[1, 2], layers=["conv2"], features_per_layer=2,
                probe_images=2, threads=0, tile_size=16, lr=0.01)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(msg: str) -> None:
    pass


def test_train_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    full = train(_cfg(tmp_path / "full"), log=_quiet)

    def stop_after_first_epoch(msg):
        if msg.startswith("epoch   1/"):
            raise KeyboardInterrupt

    part = _cfg(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        train(part, log=stop_after_first_epoch)
    assert not os.path.exists(tmp_path / "part" / "zfnet_demo.pt")  # not finished: no final checkpoint
    assert os.path.isfile(tmp_path / "part" / "train_state.pt")  # but epoch 1 is kept
    resumed = train(part, log=_quiet)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    a = torch.load(full["checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(resumed["checkpoint"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the weights of each snapshot epoch, for visualize --checkpoints: the last one is the final model
    from deconvis.runs.unit_evolution import checkpoint_files
    snaps = checkpoint_files([str(tmp_path / "full")])
    assert [os.path.relpath(p, tmp_path / "full") for p in snaps] == ["snapshot_weights/epoch_001.pt",
                                                                       "snapshot_weights/epoch_002.pt"]
    last = torch.load(snaps[-1], weights_only=True)
    assert last["deconvis"]["epoch"] == 2 and all(torch.equal(a[k], last["state_dict"][k]) for k in a)
    first = torch.load(snaps[0], weights_only=True)
    assert first["deconvis"]["epoch"] == 1 and not all(torch.equal(a[k], first["state_dict"][k]) for k in a)
    sa = torch.load(tmp_path / "full" / "snapshots.pt", weights_only=True)
    sb = torch.load(tmp_path / "part" / "snapshots.pt", weights_only=True)
    assert [c["label"] for c in sb["columns"]] == ["1", "2"]
    for ca, cb in zip(sa["columns"], sb["columns"]):
        for layer in ca["rec"]:
            assert torch.equal(ca["rec"][layer], cb["rec"][layer])


def _interrupted_after_epoch_1(out_dir) -> TrainConfig:
    """A run of ``_cfg(out_dir)`` stopped by Ctrl-C right after epoch 1 was saved."""

    def stop(msg):
        if msg.startswith("epoch   1/"):
            raise KeyboardInterrupt

    cfg = _cfg(out_dir, epochs=3, snapshots=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=stop)
    return cfg


def test_resume_runs_only_the_unfinished_epochs(tmp_path, monkeypatch):
    """A resume starts after the saved epoch: epoch 1 is neither trained again nor logged again
    (a restart from scratch would give the same weights under a fixed seed, so count the epochs)."""
    cfg = _interrupted_after_epoch_1(tmp_path)
    saved = torch.load(tmp_path / "train_state.pt", weights_only=False)
    assert saved["epoch"] == 1
    init_png = (tmp_path / "conv1_filters_init.png").read_bytes()  # drawn by the fresh run only
    lines, steps = [], []
    from deconvis.training import train as train_mod

    real = train_mod._Optimisers.step

    def counting_step(self):
        steps.append(1)
        real(self)

    monkeypatch.setattr(train_mod._Optimisers, "step", counting_step)
    # settings that do not decide the weights may change on resume
    rec = train(dataclasses.replace(cfg, threads=1, tile_size=8), log=lines.append)
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch")] == ["2/3", "3/3"]
    assert any(ln.startswith("resumed from") and "after epoch 1" in ln for ln in lines)
    steps_per_epoch = cfg.num_classes * cfg.samples_per_class // cfg.batch_size
    assert len(steps) == 2 * steps_per_epoch  # epochs 2 and 3 only
    assert [h["epoch"] for h in rec["history"]] == [1, 2, 3]
    assert rec["history"][0] == saved["history"][0]  # epoch 1's record is the saved one
    assert (tmp_path / "conv1_filters_init.png").read_bytes() == init_png  # not redrawn from resumed weights
    # a finished run resumed again trains nothing
    lines.clear()
    again = train(cfg, log=lines.append)
    assert not [ln for ln in lines if ln.startswith("epoch")] and len(steps) == 2 * steps_per_epoch
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3]


def test_resume_continues_the_global_step_count(tmp_path, monkeypatch):
    """Step-based snapshots are named by the global optimiser step: after a resume at epoch 1 of
    2-step epochs the callback sees steps 3, 4, 5, 6, as in an uninterrupted run (recorded by a
    stand-in for the snapshot callback; snapshots may be switched on at resume)."""
    from deconvis.training import train as train_mod

    def stop(msg):
        if msg.startswith("epoch   1/"):
            raise KeyboardInterrupt

    cfg = _cfg(tmp_path, epochs=3, batch_size=2, snapshots=False)  # 4 samples: 2 steps per epoch
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=stop)
    seen = []

    class Recorder:
        layers: list = []

        def __init__(self, *a, **k):
            pass

        def on_step_end(self, step, model):
            seen.append(step)

        def on_epoch_end(self, epoch, model):
            return None

        def summary(self):
            return {"snapshots": []}

        def close(self):
            pass

    monkeypatch.setattr(train_mod, "SnapshotCallback", Recorder)
    train(dataclasses.replace(cfg, snapshots=True), log=_quiet)
    assert seen == [3, 4, 5, 6]


@pytest.mark.parametrize("change", [dict(lr=0.02), dict(epochs=4)])
def test_resume_with_other_weight_settings_is_refused(tmp_path, change):
    """train_state.pt of a run with other weight-deciding settings: a one-line DeconvisError naming
    the setting and the way out, the saved state left as it was; --no-resume starts over."""
    from deconvis.errors import DeconvisError

    was = _interrupted_after_epoch_1(tmp_path)
    before = (tmp_path / "train_state.pt").read_bytes()
    key = next(iter(change))
    other = _cfg(tmp_path, **{**dict(epochs=3, snapshots=False), **change})
    with pytest.raises(DeconvisError, match=rf"different {key} \({key}={re.escape(repr(getattr(was, key)))}\); "
                                            r"use another --out-dir or --no-resume") as err:
        train(other, log=_quiet)
    assert "\n" not in str(err.value)
    assert (tmp_path / "train_state.pt").read_bytes() == before
    assert not os.path.exists(tmp_path / "zfnet_demo.pt")
    # --no-resume starts over in the same folder
    fresh = train(dataclasses.replace(other, resume=False), log=_quiet)
    assert [h["epoch"] for h in fresh["history"]] == list(range(1, other.epochs + 1))


def test_no_resume_starts_the_snapshots_over_in_a_used_folder(tmp_path):
    """--no-resume in a folder holding another run's snapshots (other seed, so other probe
    images): the snapshots equal those of the same run in an empty folder."""
    train(_cfg(tmp_path / "used", epochs=1, snapshot_epochs=[1]), log=_quiet)
    for name in ("used", "empty"):
        train(_cfg(tmp_path / name, epochs=1, snapshot_epochs=[1], seed=1, resume=False), log=_quiet)
    a, b = (torch.load(tmp_path / n / "snapshots.pt", weights_only=True) for n in ("used", "empty"))
    assert [c["label"] for c in a["columns"]] == [c["label"] for c in b["columns"]] == ["1"]
    assert all(torch.equal(a["columns"][0]["rec"][l], b["columns"][0]["rec"][l]) for l in b["columns"][0]["rec"])


def test_an_unreadable_train_state_is_named_and_left_alone(tmp_path):
    """A truncated train_state.pt: a one-line DeconvisError naming the file, what went wrong and
    the way out; the file is not overwritten."""
    from deconvis.errors import DeconvisError

    cfg = _cfg(tmp_path, epochs=1, snapshots=False)
    (tmp_path / "train_state.pt").write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with pytest.raises(DeconvisError, match=r"cannot read '.*train_state\.pt' \([A-Za-z]*Error\); "
                                            r"delete it or use --no-resume") as err:
        train(cfg, log=_quiet)
    assert "\n" not in str(err.value)
    assert (tmp_path / "train_state.pt").read_bytes() == b"PK\x03\x04 not a whole checkpoint"


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_sgd_with_cosine_and_constant_schedules(tmp_path, schedule):
    lr = 0.02
    cfg = _cfg(tmp_path, optimizer="sgd", schedule=schedule, lr=lr, snapshots=False, val_samples=0,
               conv1_sgd_lr=0.0)
    rec = train(cfg, log=_quiet)
    steps_per_epoch = cfg.num_classes * cfg.samples_per_class // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    want = [lr * (1 + math.cos(math.pi * e * steps_per_epoch / total)) / 2 if schedule == "cosine" else lr
            for e in range(1, cfg.epochs + 1)]
    got = [h["lr"] for h in rec["history"]]
    assert got == pytest.approx(want, abs=1e-12)
    # train_state.pt holds numpy RNG state, which train_cmd reads back with weights_only=False too
    st = torch.load(tmp_path / "train_state.pt", weights_only=False)["optimizer"]["optimizers"]
    assert len(st) == 1  # conv1_sgd_lr 0: one optimiser for every layer
    per_param = list(st[0]["state"].values())
    assert per_param and all("momentum_buffer" in s and "exp_avg" not in s for s in per_param)  # SGD, not AdamW


def _naive_renorm(weight: torch.Tensor, radius: float) -> torch.Tensor:
    out = weight.clone()
    for i in range(weight.shape[0]):
        rms = math.sqrt(sum(float(v) ** 2 for v in weight[i].flatten()) / weight[i].numel())
        if rms > radius:
            out[i] = weight[i] * (radius / rms)
    return out


def test_filter_renormalisation_matches_a_naive_loop():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 2)).double()
    with torch.no_grad():
        net[0].weight[:3] *= 0.01  # some filters below the radius, the rest above
    radius = 0.1
    want = [_naive_renorm(net[0].weight.detach(), radius), _naive_renorm(net[2].weight.detach(), radius)]
    n_above = sum(int((w.detach().pow(2).mean(dim=(1, 2, 3)).sqrt() > radius).sum()) for w in (net[0].weight, net[2].weight))
    with torch.no_grad():
        n = renormalise_filters(net, radius)
    assert n == n_above and 0 < n < 10
    assert torch.allclose(net[0].weight, want[0], rtol=1e-12, atol=0)
    assert torch.allclose(net[2].weight, want[1], rtol=1e-12, atol=0)


def test_train_with_renormalisation_keeps_every_filter_within_the_radius(tmp_path):
    radius = 0.05
    train(_cfg(tmp_path, epochs=1, filter_radius=radius, snapshots=False, val_samples=0, lr=0.05), log=_quiet)
    state = torch.load(tmp_path / "zfnet_demo.pt", weights_only=True)["state_dict"]
    convs = [v for k, v in state.items() if k.endswith(".weight") and v.dim() == 4]
    rms = torch.cat([w.pow(2).mean(dim=(1, 2, 3)).sqrt() for w in convs])
    assert len(convs) == 5 and float(rms.max()) <= radius * (1 + 1e-5)
    assert float(rms.max()) > radius * 0.9  # the bound is reached: renormalisation did act


def test_train_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["train", "--epochs", "1", "--batch-size", "4", "--num-classes", "2", "--samples-per-class", "2",
                 "--image-size", "64", "--val-samples", "0", "--no-snapshots", "--threads", "0",
                 "--out-dir", str(out)])
    assert code == 0
    assert os.path.isfile(out / "zfnet_demo.pt") and os.path.isfile(out / "train_log.json")
    assert "epoch   1/1" in capsys.readouterr().out
    from deconvis.io.models import load_model

    lm = load_model("auto", str(out / "zfnet_demo.pt"))  # the checkpoint names its own model
    assert lm.preprocess.crop == (64, 64)
