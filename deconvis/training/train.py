"""Train the demo net (``zfnet_demo``) on the exemplar surrogate task, with ZF Fig. 4
feature-evolution snapshots, and write a deconvis checkpoint: ``train(TrainConfig(...))``; the
``deconvis train`` command only parses its flags into a :class:`TrainConfig`.

Every key of :class:`TrainConfig` is a YAML key (``--config configs/train_demo.yaml``) and a
``--flag`` (underscores become dashes); precedence: defaults < YAML < flags (see
:mod:`deconvis.config`).

Outputs in ``out_dir``: ``train_state.pt`` (per-epoch training checkpoint: model, optimiser,
schedulers, epoch, RNG states, history; a rerun resumes from it), ``evolution_<layer>.png`` +
``snapshots.pt``/``.json`` (the snapshot callback), ``conv1_filters_init.png`` /
``conv1_filters.png`` (first-layer filters at init and now), ``train_log.json``,
``snapshot_weights/epoch_NNN.pt`` (the weights at each snapshot epoch, with ``snapshot_weights``;
``deconvis visualize --checkpoints OUT_DIR`` follows every unit across them), and the final
checkpoint (``checkpoint``, default ``out_dir/zfnet_demo.pt``) in the format
:func:`deconvis.io.models.load_model` reads::

    {"state_dict": ..., "deconvis": {"model": "zfnet_demo", "preprocess": {...}, "epoch": E,
                                     "classes": [...], "train": {...}}}
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deconvis import config as configbase
from deconvis.config import Config, option
from deconvis.errors import DeconvisError, close_matches
from deconvis.io import atomic
from deconvis.mirror.rules import Rule
from deconvis.training.demo_model import DEMO_INPUT_SIZE, DEMO_RESIZE, zfnet_demo
from deconvis.training.evolution import filter_grid
from deconvis.training.renorm import renormalise_filters
from deconvis.training.snapshots import SNAPSHOT_WEIGHTS_DIR, SnapshotCallback, check_epochs, open_summary_writer
from deconvis.training.surrogate import ExemplarDataset
from deconvis.utils.device import use_device

TRAIN_STATE = "train_state.pt"
VAL_EPOCH = 1_000_003  # the surrogate "epoch" the fixed validation samples are drawn from


def _coerce_epochs(value: Any, where: str) -> Union[str, List[int]]:
    """``snapshot_epochs``: 'all', or epoch numbers (a list or a comma separated string)."""
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return "all"
        value = [s for s in value.split(",") if s.strip()]
    if isinstance(value, (list, tuple)):
        try:
            return [int(str(v).strip()) for v in value]
        except ValueError:
            pass
    raise DeconvisError(f"{where} must be epoch numbers like 1,2,5 or 'all', got {value!r}")


@dataclass
class TrainConfig(Config):
    """Settings of ``deconvis train`` (the demo net on the exemplar surrogate task)."""

    epochs: int = option(12, "training epochs")
    batch_size: int = option(64, "images per optimiser step")
    optimizer: str = option("adamw", "optimiser of all layers but the first: adamw or sgd")
    lr: float = option(0.002, "peak learning rate of that optimiser")
    weight_decay: float = option(0.05, "its weight decay (decoupled for adamw)")
    momentum: float = option(0.9, "SGD momentum (AdamW: beta1)")
    conv1_sgd_lr: float = option(0.2, "peak learning rate of plain momentum SGD for the first conv layer "
                                  "(smooth, gradient-proportional updates give clean filters); 0: the "
                                  "first layer uses the main optimiser")
    conv1_weight_decay: float = option(5e-4, "weight decay of the first layer's SGD")
    schedule: str = option("onecycle", "learning-rate schedule: onecycle, cosine or constant")
    conv_bias_init: float = option(0.1, "initial bias of conv2..conv5 (small positive keeps their ReLUs from dying "
                                    "early; 0: the old zero init, which left ~11-30% of conv2 dead)")
    filter_radius: float = option(0.0, "ZF filter renormalisation: rescale conv filters whose RMS exceeds this "
                                   "radius after each step (0: off)")
    seed: int = option(0, "random seed (init, data, shuffling, dropout)")
    num_classes: int = option(128, "exemplar classes (seed patches)")
    samples_per_class: int = option(32, "random transformations per class per epoch")
    image_size: int = option(128, "training image side, pixels")
    val_samples: int = option(1024, "fixed held-out transformations for validation accuracy (0: none)")
    out_dir: str = option("outputs/train_demo", "output folder (training state, figures, logs)")
    checkpoint: str = option("", "final checkpoint path (default: OUT_DIR/zfnet_demo.pt)")
    snapshots: bool = option(True, "record feature-evolution snapshots (ZF Fig. 4)")
    snapshot_epochs: Union[str, List[int]] = option([1, 2, 3, 5, 8, 12], "epochs to snapshot (comma separated, or all)",
                                                    coerce=_coerce_epochs, metavar="A,B,..")
    snapshot_every_n_steps: Optional[int] = option(None, "also snapshot every N optimiser steps")
    snapshot_weights: bool = option(True, "save the weights at each snapshot epoch as OUT_DIR/snapshot_weights/"
                                          "epoch_NNN.pt (checkpoint format, ~1.7 MB each): `deconvis visualize "
                                          "--checkpoints OUT_DIR` shows every unit across them")
    layers: List[str] = option(["conv1", "conv2", "conv3", "conv5"], "layers to show in the evolution figures")
    features_per_layer: int = option(8, "features (rows) per layer")
    feature_select: str = option("top", "how features are picked: top (strongest at the first snapshot), first, spread")
    probe_images: int = option(64, "probe images (untransformed seed patches) the snapshots search")
    rule: str = option("deconvnet", "projection rule: deconvnet, guided or gradient")
    tile_size: int = option(48, "tile side in the evolution figures, pixels")
    tensorboard: bool = option(False, "log losses and figures to TensorBoard in OUT_DIR/tensorboard")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto")
    threads: int = option(2, "torch CPU threads (0: leave torch's default)")
    resume: bool = option(True, "resume from OUT_DIR/train_state.pt when it exists")

    def validate(self) -> None:
        """Range checks that need no model; DeconvisError naming the key."""
        for name in ("epochs", "batch_size", "num_classes", "samples_per_class", "features_per_layer",
                     "probe_images", "tile_size"):
            if getattr(self, name) < 1:
                raise DeconvisError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise DeconvisError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.image_size < 63:
            raise DeconvisError(f"image_size must be at least 63 pixels for zfnet_demo, got {self.image_size}")
        if self.batch_size > self.num_classes * self.samples_per_class:
            raise DeconvisError(f"batch_size {self.batch_size} exceeds the epoch's {self.num_classes * self.samples_per_class} "
                                "samples; lower batch_size or raise samples_per_class")
        for name in ("lr",):
            if getattr(self, name) <= 0:
                raise DeconvisError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("momentum", "weight_decay", "conv1_sgd_lr", "conv1_weight_decay", "filter_radius",
                     "val_samples", "threads"):
            if getattr(self, name) < 0:
                raise DeconvisError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adamw"):
            raise DeconvisError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise DeconvisError(f"schedule must be onecycle, cosine or constant, got {self.schedule!r}"
                                + close_matches(self.schedule, ["onecycle", "cosine", "constant"]))
        if self.snapshots:
            check_epochs(self.snapshot_epochs)
            if isinstance(self.snapshot_epochs, list) and self.snapshot_epochs[-1] > self.epochs:
                raise DeconvisError(f"snapshot epoch {self.snapshot_epochs[-1]} is after the last epoch ({self.epochs}); "
                                    "drop it or raise epochs")
        if self.snapshot_every_n_steps is not None and self.snapshot_every_n_steps < 1:
            raise DeconvisError(f"snapshot_every_n_steps must be at least 1, got {self.snapshot_every_n_steps}")
        configbase.check_device(self.device)
        self.rule = Rule.parse(self.rule).value
        if not self.out_dir:
            raise DeconvisError("out_dir is empty; give an output folder")


def _rng_state() -> Dict[str, Any]:
    st: Dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                          "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class _Optimisers:
    """The main optimiser (all layers but conv1, or all) plus, optionally, momentum SGD for the
    first conv layer, each with its own schedule; stepped, zeroed and saved together."""

    def __init__(self, cfg: "TrainConfig", model: torch.nn.Module, steps: int) -> None:
        first = model.features[0]
        split = cfg.conv1_sgd_lr > 0
        first_ids = {id(first.weight), id(first.bias)} if split else set()
        main = [(n, p) for n, p in model.named_parameters() if id(p) not in first_ids]
        groups = [{"params": [p for n, p in main if p.dim() > 1], "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in main if p.dim() <= 1], "weight_decay": 0.0}]
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        else:
            opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum or 0.9, 0.999))
        self.opts = [opt]
        if split:
            self.opts.append(torch.optim.SGD([{"params": [first.weight], "weight_decay": cfg.conv1_weight_decay},
                                              {"params": [first.bias], "weight_decay": 0.0}],
                                             lr=cfg.conv1_sgd_lr, momentum=0.9, nesterov=True))
        self.scheds = [self._schedule(cfg, o, steps) for o in self.opts]

    @staticmethod
    def _schedule(cfg: "TrainConfig", opt: torch.optim.Optimizer, steps: int):
        peak = opt.param_groups[0]["lr"]
        if cfg.schedule == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=max(steps, 1), pct_start=0.2,
                                                       cycle_momentum=False)
        if cfg.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o, s in zip(self.opts, self.scheds):
            o.step()
            s.step()

    def lr(self) -> float:
        return float(self.scheds[0].get_last_lr()[0])

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.opts], "schedulers": [s.state_dict() for s in self.scheds]}

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        for o, d in zip(self.opts, st["optimizers"]):
            o.load_state_dict(d)
        for s, d in zip(self.scheds, st["schedulers"]):
            s.load_state_dict(d)


#: settings that do not change the trained weights: a resumed run may differ in these
NOT_THE_RUN = ("out_dir", "checkpoint", "device", "threads", "resume", "tensorboard", "snapshots", "snapshot_epochs",
               "snapshot_every_n_steps", "snapshot_weights", "layers", "features_per_layer", "feature_select", "probe_images", "rule",
               "tile_size")


def _resume(cfg: TrainConfig, state_path: str, model: torch.nn.Module, opt: "_Optimisers",
            run_config: Mapping[str, Any], log: Callable[[str], None]) -> Tuple[int, List[Dict[str, Any]]]:
    """Load ``state_path`` (when it exists) into ``model``, ``opt`` and the RNGs; returns (epochs
    done, their history). An error when it is of a run with other weight-deciding settings."""
    if not os.path.isfile(state_path):
        return 0, []
    try:
        st = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DeconvisError(f"cannot read {state_path!r} ({type(exc).__name__}); delete it or use --no-resume") from exc
    old = st["config"]
    diff = [k for k in run_config if k not in NOT_THE_RUN and old.get(k) != run_config[k]]
    if diff:
        was = ", ".join(f"{k}={old.get(k)!r}" for k in diff)
        raise DeconvisError(f"{state_path!r} is from a run with different {', '.join(diff)} ({was}); "
                            "use another --out-dir or --no-resume")
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    _set_rng_state(st["rng"])
    log(f"resumed from {state_path} after epoch {int(st['epoch'])}")
    return int(st["epoch"]), list(st["history"])


@torch.no_grad()
def _evaluate(model: torch.nn.Module, val: Tuple[Tensor, Tensor], device: torch.device) -> Tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode on ``val`` = (images [N, 3, H, W], labels [N])."""
    model.eval()
    vl, vo = 0.0, 0
    for i in range(0, len(val[0]), 256):
        lo = model(val[0][i:i + 256].to(device))
        vl += float(F.cross_entropy(lo, val[1][i:i + 256].to(device), reduction="sum"))
        vo += int((lo.argmax(1).cpu() == val[1][i:i + 256]).sum())
    return vl / len(val[0]), vo / len(val[0])


def _save_checkpoint(cfg: TrainConfig, data: Any, model: torch.nn.Module, history: List[Dict[str, Any]],
                     run_config: Mapping[str, Any], checkpoint: str) -> None:
    """The final checkpoint in the format :func:`deconvis.io.models.load_model` reads."""
    final = history[-1] if history else {}
    classes = [f"{data.photo_names[s.photo]}@y{s.cy:.0f},x{s.cx:.0f},side{s.side:.0f}" for s in data.seeds]
    meta = {
        "model": "zfnet_demo",
        "preprocess": {"resize": int(round(cfg.image_size * DEMO_RESIZE / DEMO_INPUT_SIZE[0])),
                       "crop": [cfg.image_size, cfg.image_size],
                       "mean": data.mean_std[0], "std": data.mean_std[1]},
        "epoch": int(final.get("epoch", 0)),
        "classes": classes,
        "train": {**{k: v for k, v in run_config.items() if k not in NOT_THE_RUN},
                  "task": "exemplar surrogate (Dosovitskiy et al. 2014) on skimage.data photos",
                  "photos": list(data.photo_names),
                  "final_loss": final.get("loss"), "final_acc": final.get("acc"),
                  "final_val_loss": final.get("val_loss"), "final_val_acc": final.get("val_acc"),
                  "train_seconds": sum(h["train_seconds"] for h in history),
                  "snapshot_seconds": sum(h["snapshot_seconds"] for h in history),
                  "torch": str(torch.__version__)},
    }
    state = {k: v.detach().to("cpu", torch.float32).contiguous() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    atomic.save_torch({"state_dict": state, "deconvis": meta}, checkpoint)


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train per ``cfg`` (validated here unless it came from :meth:`TrainConfig.load`); returns the
    run record (also written to ``out_dir/train_log.json``). ``log`` receives one line per event."""
    cfg.checked()
    writer = open_summary_writer(os.path.join(cfg.out_dir, "tensorboard")) if cfg.tensorboard else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = use_device(cfg.device)
    out = cfg.out_dir
    atomic.ensure_writable_dir(out)
    checkpoint = cfg.checkpoint or os.path.join(out, "zfnet_demo.pt")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    data = ExemplarDataset(cfg.num_classes, cfg.samples_per_class, cfg.image_size, seed=cfg.seed)
    model = zfnet_demo(num_classes=cfg.num_classes, seed=cfg.seed, conv_bias=cfg.conv_bias_init).to(device)
    steps_per_epoch = len(data) // cfg.batch_size
    opt = _Optimisers(cfg, model, cfg.epochs * steps_per_epoch)

    state_path = os.path.join(out, TRAIN_STATE)
    run_config = dataclasses.asdict(cfg)
    start_epoch, history = _resume(cfg, state_path, model, opt, run_config, log) if cfg.resume else (0, [])

    cb = None
    if cfg.snapshots:
        cb = SnapshotCallback(model, data.probe_images(cfg.probe_images), cfg.layers,
                              features_per_layer=cfg.features_per_layer, select=cfg.feature_select,
                              epochs=cfg.snapshot_epochs, out_dir=out, rule=cfg.rule, tensorboard=writer,
                              every_n_steps=cfg.snapshot_every_n_steps, tile_size=cfg.tile_size,
                              mean=data.mean_std[0], std=data.mean_std[1], resume=cfg.resume)
    if start_epoch == 0:
        atomic.write_png(os.path.join(out, "conv1_filters_init.png"), filter_grid(model.features[0].weight))
    val = data.batch([i % len(data) for i in range(cfg.val_samples)], epoch=VAL_EPOCH) if cfg.val_samples else None

    t_run = time.perf_counter()
    global_step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        data.set_epoch(epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        model.train()
        tot_loss, tot_ok, n_seen, t_data, snap_s = 0.0, 0, 0, 0.0, 0.0
        for b in range(steps_per_epoch):
            td = time.perf_counter()
            x, y = data.batch(order[b * cfg.batch_size:(b + 1) * cfg.batch_size].tolist())
            x, y = x.to(device), y.to(device)
            t_data += time.perf_counter() - td
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if cfg.filter_radius > 0:
                renormalise_filters(model, cfg.filter_radius)
            global_step += 1
            tot_loss += loss.item() * len(y)
            tot_ok += int((logits.argmax(1) == y).sum())
            n_seen += len(y)
            if cb is not None:
                ts = time.perf_counter()
                if cb.on_step_end(global_step, model) is not None:
                    snap_s += time.perf_counter() - ts
        rec: Dict[str, Any] = {"epoch": epoch, "loss": tot_loss / n_seen, "acc": tot_ok / n_seen,
                               "lr": opt.lr()}
        if val is not None:
            rec["val_loss"], rec["val_acc"] = _evaluate(model, val, device)
        rec["train_seconds"] = time.perf_counter() - t0
        rec["data_seconds"] = t_data
        snapped = False
        if cb is not None:
            ts = time.perf_counter()
            if cb.on_epoch_end(epoch, model) is not None:
                snap_s += time.perf_counter() - ts
                snapped = True
        rec["snapshot_seconds"] = snap_s
        history.append(rec)
        if snapped and cfg.snapshot_weights:
            _save_checkpoint(cfg, data, model, history, run_config,
                             os.path.join(out, SNAPSHOT_WEIGHTS_DIR, f"epoch_{epoch:03d}.pt"))
        atomic.write_png(os.path.join(out, "conv1_filters.png"), filter_grid(model.features[0].weight))
        atomic.save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(),
                           "epoch": epoch, "rng": _rng_state(),
                           "history": history, "config": run_config}, state_path)
        if writer is not None:
            for k in ("loss", "acc", "val_loss", "val_acc", "lr"):
                if k in rec:
                    writer.add_scalar(f"train/{k}", rec[k], epoch)
        log(f"epoch {epoch:3d}/{cfg.epochs}  loss {rec['loss']:.3f}  acc {rec['acc']:.3f}"
            + (f"  val_loss {rec['val_loss']:.3f}  val_acc {rec['val_acc']:.3f}" if "val_acc" in rec else "")
            + f"  {rec['train_seconds']:.1f} s (data {t_data:.1f} s)  snapshots {snap_s:.2f} s")

    _save_checkpoint(cfg, data, model, history, run_config, checkpoint)
    record = {"config": run_config, "history": history, "checkpoint": checkpoint,
              "wall_seconds_this_run": time.perf_counter() - t_run,
              "snapshots": cb.summary()["snapshots"] if cb is not None else [],
              "figures": [cb.figure_path(l) for l in cb.layers] if cb is not None else []}
    for s in record["snapshots"]:
        s.pop("units", None)
    atomic.write_json(os.path.join(out, "train_log.json"), record)
    if cb is not None:
        cb.close()
    if writer is not None:
        writer.close()
    log(f"checkpoint: {checkpoint}")
    return record
