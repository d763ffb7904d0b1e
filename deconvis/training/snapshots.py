"""Feature evolution during training (Zeiler & Fergus 2014, Fig. 4) as a training callback.

At chosen snapshots (epoch ends, optionally every N steps) :class:`SnapshotCallback` finds, over
a fixed probe image set, the strongest activation of selected features of selected layers,
projects it to pixel space with the model's *current* weights (a :class:`DeconvNet` built once,
sharing the parameters), and keeps the reconstruction and the image patch under the unit's
receptive-field box. After every snapshot it writes, atomically, its state and one figure per
layer (rows = features, columns = snapshots) to ``out_dir``; a new callback on the same
``out_dir`` resumes from them.

It leaves training unchanged: no parameter, buffer or ``.grad`` is touched, every module's
train/eval mode is restored, the RNG states (torch CPU and CUDA, Python ``random``, NumPy's
global) are saved and restored, and everything runs without autograd. Its cost (seconds per
snapshot) is logged (logger ``deconvis.training.snapshots``) and kept in :attr:`SnapshotCallback.history`.

Plain PyTorch::

    cb = SnapshotCallback(model, probe, layers=["conv1", "conv2"], out_dir="runs/evo")
    for epoch in range(1, epochs + 1):
        train_one_epoch(...)
        cb.on_epoch_end(epoch, model)

Lightning: :class:`deconvis.training.lightning.SnapshotLightningCallback`.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from deconvis.io import atomic
from deconvis.io.images import unnormalize
from deconvis.mining import TopK
from deconvis.mirror.deconvnet import DeconvNet
from deconvis.mirror.rules import Rule
from deconvis.errors import DeconvisError, close_matches
from deconvis.training.evolution import evolution_figure, patch_tiles, rec_tiles
from deconvis.training.snapshot_features import FEATURE_SELECTIONS, FeaturesSpec, resolve_features, spec_repr
from deconvis.training.snapshot_parts import (Column, check_epochs, fingerprint, probe_tensor,
                                              open_summary_writer, preserve_training_state)

__all__ = ["SnapshotCallback", "Column", "preserve_training_state", "open_summary_writer", "ZF_EPOCHS",
           "FEATURE_SELECTIONS", "STATE_FILE", "SUMMARY_FILE", "SNAPSHOT_WEIGHTS_DIR"]

log = logging.getLogger("deconvis.training.snapshots")

ZF_EPOCHS: Tuple[int, ...] = (1, 2, 5, 10, 20, 30, 40, 64)
STATE_FILE = "snapshots.pt"
SUMMARY_FILE = "snapshots.json"
STATE_VERSION = 1
#: where ``deconvis train`` saves the weights of each snapshot epoch (``epoch_NNN.pt``, checkpoint
#: format), for ``deconvis visualize --checkpoints`` to follow every unit across them
SNAPSHOT_WEIGHTS_DIR = "snapshot_weights"


# ------------------------------------------------------------------------------ callback
class SnapshotCallback:
    """ZF Fig. 4 feature evolution, recorded during training.

    Args:
        model: the network being trained (a chain CNN :class:`DeconvNet` can mirror).
        probe_images: fixed probe set, normalised network input [N, C, H, W] (or a list/dataset
            of [C, H, W] images); the strongest activation of each feature is searched over it.
        layers: layers to show (aliases ``conv1``.. or module names); must have spatial maps.
        features_per_layer: an int N (N features per layer, chosen by ``select``), a list of
            channel ids (the same for every layer), or a dict layer -> channel ids.
        select: how an int N picks channels: ``"top"`` (the N with the largest probe-set maximum
            at the *first* snapshot), ``"first"`` (channels 0..N-1) or ``"spread"`` (N evenly
            spaced ids). Once chosen, the features stay fixed for all later snapshots.
        epochs: epoch numbers (1 = end of the first epoch) to snapshot, strictly increasing; or
            ``"all"``. Default: ZF's 1, 2, 5, 10, 20, 30, 40, 64.
        out_dir: folder for the state and figures (``None``: keep in memory only).
        rule: backward rule of the projection: ``deconvnet`` (ZF), ``guided`` or ``gradient``.
        tensorboard: ``None``, a ``SummaryWriter``, or a log dir to open one in.
        every_n_steps: also snapshot when ``on_step_end(step)`` gets a multiple of this.
        tile_size: side of the square tiles in the figures, pixels (RF boxes are resized,
            nearest when enlarging, area when shrinking).
        mean, std: per-channel normalisation of the probe images, to show the patches in their
            own colours; ``None`` stretches each patch to its own range instead.
        batch_size: probe images per forward pass when searching.
        resume: continue from the state in ``out_dir`` (must have been made with the same
            layers, features, rule, tile size and probe images); ``False`` starts over.
    """

    def __init__(self, model: nn.Module, probe_images: Any, layers: Sequence[str],
                 features_per_layer: FeaturesSpec = 8, select: str = "top",
                 epochs: Union[Sequence[int], str] = ZF_EPOCHS, out_dir: Optional[str] = None,
                 rule: str = "deconvnet", tensorboard: Any = None, every_n_steps: Optional[int] = None,
                 tile_size: int = 48, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, batch_size: int = 64, resume: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise DeconvisError(f"SnapshotCallback needs the model (torch.nn.Module) first, got {type(model).__name__}")
        rule = Rule.parse(rule).value
        if select not in FEATURE_SELECTIONS:
            raise DeconvisError(f"unknown feature selection {select!r}; choose {', '.join(FEATURE_SELECTIONS)}"
                                + close_matches(str(select), FEATURE_SELECTIONS))
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise DeconvisError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 8:
            raise DeconvisError(f"tile_size must be an integer >= 8 pixels, got {tile_size!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DeconvisError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.epochs = check_epochs(epochs)
        self.every_n_steps = every_n_steps
        self.rule = rule
        self.select = select
        self.tile_size = tile_size
        self.batch_size = batch_size
        self.out_dir = out_dir
        self.probe = probe_tensor(probe_images)
        for name, v in (("mean", mean), ("std", std)):
            if v is not None and len(v) != self.probe.shape[1]:
                raise DeconvisError(f"{name} has {len(v)} values but the probe images have {self.probe.shape[1]} channels")
        if std is not None and any(float(s) <= 0 for s in std):
            raise DeconvisError(f"std values must be positive, got {list(std)}")
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]

        self.model = model
        self.dn = DeconvNet(model)          # built once; shares the model's parameters
        if isinstance(layers, str):
            layers = [s.strip() for s in layers.split(",") if s.strip()]
        if not layers:
            raise DeconvisError("layers is empty; name at least one layer, e.g. conv1"
                                + close_matches("conv", self.dn.aliases))
        self.layers: List[str] = []
        for l in layers:
            name = self.dn.resolve(str(l))
            if name in self.layers:
                raise DeconvisError(f"layer {l!r} is listed twice (it is {name!r})")
            self.layers.append(name)
        self.display = {l: self.dn.display_name(l) for l in self.layers}

        # one forward of one probe image: channel counts and spatial maps, before any training
        with preserve_training_state(model):
            acts = self.dn.activations(self.probe[:1], self.layers)
        self.channels: Dict[str, int] = {}
        for l in self.layers:
            if acts[l].dim() != 4:
                raise DeconvisError(f"layer {self.display[l]!r} ({l}) has no spatial map (shape "
                                    f"{list(acts[l].shape)}); choose conv or pool layers")
            self.channels[l] = int(acts[l].shape[1])
        self.features: Dict[str, Optional[List[int]]] = resolve_features(
            features_per_layer, self.layers, self.display, self.channels, select, self.dn.resolve)
        self.n_features: Dict[str, int] = {l: (len(f) if f is not None else int(features_per_layer))  # type: ignore[arg-type]
                                           for l, f in self.features.items()}

        self.writer = open_summary_writer(tensorboard)
        self.columns: List[Column] = []
        self.history: List[Tuple[str, float]] = []  # (label, seconds incl. drawing/saving) per snapshot
        self.figures: Dict[str, np.ndarray] = {}
        self._config = {"layers": list(self.layers), "rule": rule, "tile_size": tile_size, "select": select,
                        "features_spec": spec_repr(features_per_layer), "probe": fingerprint(self.probe),
                        "mean": self.mean, "std": self.std}
        if out_dir is not None and resume:
            self._load_state()

    # -------------------------------------------------------------- persistence
    def _state_path(self) -> str:
        assert self.out_dir is not None
        return os.path.join(self.out_dir, STATE_FILE)

    def _load_state(self) -> None:
        path = self._state_path()
        if not os.path.isfile(path):
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DeconvisError(f"cannot read snapshot state {path!r} ({type(exc).__name__}: {exc}); "
                                "delete it or pass resume=False") from exc
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DeconvisError(f"{path!r} is not a deconvis snapshot state (version {STATE_VERSION}); "
                                "use another out_dir or resume=False")
        old = state["config"]
        for key, value in self._config.items():
            if old.get(key) != value:
                raise DeconvisError(f"{path!r} was made with a different {key} ({old.get(key)!r}, now "
                                    f"{value!r}); use another out_dir, or resume=False to start over")
        self.features = {l: [int(c) for c in state["features"][l]] for l in self.layers}
        self.n_features = {l: len(f) for l, f in self.features.items()}  # type: ignore[arg-type]
        self.columns = [Column.from_state(c) for c in state["columns"]]
        self.figures = {l: self.render(l) for l in self.layers}
        log.info("resumed %d snapshot(s) from %s: %s", len(self.columns), path,
                 ", ".join(c.label for c in self.columns))

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: config, the fixed features, every column's tiles."""
        return {"version": STATE_VERSION, "config": self._config,
                "features": {l: list(f or []) for l, f in self.features.items()},
                "columns": [c.to_state() for c in self.columns]}

    def _save(self) -> None:
        if self.out_dir is None:
            return
        atomic.save_torch(self.state_dict(), self._state_path())
        for l in self.layers:
            atomic.write_png(self.figure_path(l), self.figures[l])
        atomic.write_json(os.path.join(self.out_dir, SUMMARY_FILE), self.summary())

    def figure_path(self, layer: str) -> str:
        """``out_dir/evolution_<layer alias>.png``."""
        assert self.out_dir is not None
        name = self.display[self.dn.resolve(layer)].replace("/", "_")
        return os.path.join(self.out_dir, f"evolution_{name}.png")

    def summary(self) -> Dict[str, Any]:
        """JSON-able record: layers, features, per snapshot its cost and each feature's unit."""
        return {
            "layers": {self.display[l]: l for l in self.layers},
            "rule": self.rule,
            "features": {self.display[l]: f for l, f in self.features.items()},
            "snapshots": [{
                "label": c.label, "epoch": c.epoch, "step": c.step, "seconds": round(c.seconds, 4),
                "units": {self.display[l]: [{"image": int(u[0]), "channel": int(u[1]), "y": int(u[2]),
                                             "x": int(u[3]), "value": float(v), "box": [int(b) for b in bx]}
                                            for u, v, bx in zip(c.units[l], c.value[l], c.boxes[l])]
                          for l in self.layers},
            } for c in self.columns],
        }

    # -------------------------------------------------------------- hooks
    def wants_epoch(self, epoch: int) -> bool:
        return self.epochs is None or epoch in self.epochs

    def on_epoch_end(self, epoch: int, model: Optional[nn.Module] = None) -> Optional[Column]:
        """Call after epoch ``epoch`` (1-based) finished; snapshots when it is a chosen epoch."""
        if not self.wants_epoch(int(epoch)):
            return None
        return self.snapshot(epoch=int(epoch), model=model)

    def on_step_end(self, step: int, model: Optional[nn.Module] = None) -> Optional[Column]:
        """Call after optimiser step ``step`` (1-based global count); snapshots every
        ``every_n_steps`` steps (never when that is None)."""
        if self.every_n_steps is None or int(step) < 1 or int(step) % self.every_n_steps:
            return None
        return self.snapshot(step=int(step), model=model)

    def close(self) -> None:
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()

    # -------------------------------------------------------------- the snapshot
    def _use_model(self, model: Optional[nn.Module]) -> None:
        if model is not None and model is not self.model:
            dn = DeconvNet(model)
            for l in self.layers:
                dn.resolve(l)
            self.model, self.dn = model, dn

    def _strongest(self) -> Dict[str, Tuple[Tensor, Tensor]]:
        """Per layer, per channel: the probe-set maximum (float [C]) and its unit (int64 [C, 4] =
        image, channel, y, x), by mining's top-1 (:class:`deconvis.mining.TopK`): ties go to the
        smaller image index, then row-major first."""
        topk = TopK(self.layers, 1, self.dn_device())
        for start in range(0, len(self.probe), self.batch_size):
            acts = self.dn.activations(self.probe[start:start + self.batch_size], self.layers)
            topk.update(acts, torch.arange(start, start + len(next(iter(acts.values())))))
        best: Dict[str, Tuple[Tensor, Tensor]] = {}
        for l in self.layers:
            w = topk.winners(l)
            c = w["values"].shape[0]
            unit = torch.stack([w["images"][:, 0], torch.arange(c), w["ys"][:, 0], w["xs"][:, 0]], 1)
            best[l] = (w["values"][:, 0].to(torch.float32), unit)
        return best

    def _patch_images(self, x: Tensor) -> Tensor:
        """Normalised probe images -> display values in [0, 1] (or None-normalised: raw)."""
        if self.mean is None or self.std is None:
            return x
        return unnormalize(x, self.mean, self.std)

    def snapshot(self, epoch: Optional[int] = None, step: Optional[int] = None,
                 model: Optional[nn.Module] = None) -> Column:
        """Take one snapshot now (labelled by ``epoch`` or ``step``), render and save."""
        if epoch is None and step is None:
            raise DeconvisError("snapshot needs an epoch or a step number to label the column")
        self._use_model(model)
        t0 = time.perf_counter()
        with preserve_training_state(self.model):
            best = self._strongest()
            for l in self.layers:  # fix the features at the first snapshot
                if self.features[l] is None:
                    vals = best[l][0]
                    order = torch.sort(-vals, stable=True).indices[: self.n_features[l]]
                    self.features[l] = [int(c) for c in order]
            chosen = {l: best[l][1][torch.tensor(self.features[l])] for l in self.layers}
            values = {l: best[l][0][torch.tensor(self.features[l])] for l in self.layers}
            needed = sorted({int(i) for u in chosen.values() for i in u[:, 0]})
            remap = {g: k for k, g in enumerate(needed)}
            imgs = self.probe[needed]
            self.dn.forward(imgs, layers=self.layers)
            shown = self._patch_images(imgs.to(torch.float32))
            rec_t, patch_t, boxes_t = {}, {}, {}
            for l in self.layers:
                units = chosen[l].clone()
                units[:, 0] = torch.tensor([remap[int(i)] for i in units[:, 0]])
                rec, boxes = self.dn.project_window(l, units.to(self.dn_device()), rule=self.rule)
                rec, boxes = rec.detach().to(torch.float32).cpu(), boxes.cpu()
                fired = rec.flatten(1).abs().amax(1) > 0  # a dead unit projects to nothing
                rec_t[l] = torch.from_numpy(rec_tiles(rec, self.tile_size))
                patch_t[l] = torch.from_numpy(patch_tiles(shown, units[:, 0], boxes, self.tile_size,
                                                          stretch=self.mean is None, fired=fired))
                boxes_t[l] = boxes.to(torch.int64)
            self.dn.release()  # drop the recorded switches: nothing retained between snapshots
        seconds = time.perf_counter() - t0
        label = str(epoch) if epoch is not None else f"step {step}"
        col = Column(label=label, epoch=epoch, step=step, seconds=seconds, rec=rec_t, patch=patch_t,
                     units={l: chosen[l].to(torch.int64) for l in self.layers}, boxes=boxes_t,
                     value={l: values[l].to(torch.float32) for l in self.layers})
        # a rerun of an epoch/step (after a resumed training run) replaces that column and later ones
        if epoch is not None:
            self.columns = [c for c in self.columns if c.epoch is None or c.epoch < epoch]
        else:
            self.columns = [c for c in self.columns if c.step is None or c.step < step]  # type: ignore[operator]
        self.columns.append(col)
        self.figures = {l: self.render(l) for l in self.layers}
        self._save()
        self._log_tensorboard(col, epoch if epoch is not None else step)
        total = time.perf_counter() - t0
        self.history.append((label, total))
        log.info("snapshot %s: %.2f s (%.2f s search + projection, %.2f s drawing and saving)",
                 label, total, seconds, total - seconds)
        return col

    def dn_device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    # -------------------------------------------------------------- output
    def render(self, layer: str) -> np.ndarray:
        """The evolution figure of ``layer`` so far: uint8 RGB [H, W, 3] (see
        :func:`deconvis.training.evolution.evolution_figure` for the layout)."""
        l = self.dn.resolve(layer)
        feats = self.features[l] or []
        return evolution_figure([c.rec[l].numpy() for c in self.columns],
                                [c.patch[l].numpy() for c in self.columns],
                                col_labels=[c.label for c in self.columns],
                                row_labels=[f"#{f}" for f in feats],
                                title=f"{self.display[l]} ({self.rule})")

    def _log_tensorboard(self, col: Column, step: Optional[int]) -> None:
        if self.writer is None:
            return
        for l in self.layers:
            name = self.display[l]
            self.writer.add_image(f"deconvis/evolution/{name}", self.figures[l], global_step=step,
                                  dataformats="HWC")
            self.writer.add_image(f"deconvis/snapshot/{name}",
                                  evolution_figure([col.rec[l].numpy()], [col.patch[l].numpy()],
                                                   col_labels=[col.label], row_labels=None, title=None),
                                  global_step=step, dataformats="HWC")
        self.writer.add_scalar("deconvis/snapshot_seconds", col.seconds, global_step=step)
