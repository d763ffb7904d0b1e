"""The parts of the feature-evolution callback (:mod:`deconvis.training.snapshots`) that are not
the callback: the guard that leaves training untouched, the checks of its inputs (probe images,
snapshot epochs), one snapshot's record (:class:`Column`) and the TensorBoard writer.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from deconvis.errors import DeconvisError


# ------------------------------------------------------------------------------ guards
@contextlib.contextmanager
def preserve_training_state(model: nn.Module) -> Iterator[None]:
    """Run the body with ``model`` in eval mode and no autograd; afterwards restore every
    module's train/eval flag and the RNG states (torch CPU, all initialised CUDA devices,
    Python ``random``, NumPy's global generator)."""
    modes = [(m, m.training) for m in model.modules()]
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=True), torch.no_grad():
            model.eval()
            yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        random.setstate(py_state)
        np.random.set_state(np_state)


# ------------------------------------------------------------------------------ inputs
def probe_tensor(probe: Any) -> Tensor:
    """Probe images as a float tensor [N, C, H, W] (from a tensor, a list of [C, H, W] tensors,
    or a dataset whose items are images or (image, label, ...) tuples)."""
    if isinstance(probe, Tensor):
        x = probe
    else:
        try:
            n = len(probe)
        except TypeError:
            raise DeconvisError(f"probe_images must be a tensor [N, C, H, W], a list of images or a dataset, "
                                f"got {type(probe).__name__}") from None
        items = []
        for i in range(n):
            item = probe[i]
            if isinstance(item, (tuple, list)):
                item = item[0]
            if not isinstance(item, Tensor):
                raise DeconvisError(f"probe_images item {i} is {type(item).__name__}, not an image tensor [C, H, W]")
            items.append(item)
        if not items:
            raise DeconvisError("probe_images is empty; give at least one image [N, C, H, W]")
        try:
            x = torch.stack(items)
        except RuntimeError as exc:
            raise DeconvisError(f"probe images differ in shape ({exc}); resize them to one size") from None
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise DeconvisError(f"probe_images must have shape [N, C, H, W], got {list(x.shape)}")
    if x.shape[0] == 0:
        raise DeconvisError("probe_images is empty; give at least one image [N, C, H, W]")
    if not x.is_floating_point():
        raise DeconvisError(f"probe_images must be float (normalised network input), got {x.dtype}")
    return x.detach().cpu().contiguous()


def check_epochs(epochs: Any) -> Optional[Tuple[int, ...]]:
    """Validate the snapshot epochs: 'all' -> None (every epoch), else strictly increasing ints >= 1."""
    if isinstance(epochs, str):
        if epochs == "all":
            return None
        raise DeconvisError(f"epochs must be a list of epoch numbers or 'all', got {epochs!r}")
    try:
        values = list(epochs)
    except TypeError:
        raise DeconvisError(f"epochs must be a list of epoch numbers, got {epochs!r}") from None
    if not values:
        raise DeconvisError("epochs is empty; give the epochs to snapshot, e.g. 1,2,5,10")
    for e in values:
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)):
            raise DeconvisError(f"epochs must be integers, got {e!r} in {values}")
        if e < 1:
            raise DeconvisError(f"epochs are counted from 1 (the end of the first epoch); got {e} in {values}")
    for a, b in zip(values, values[1:]):
        if b <= a:
            raise DeconvisError(f"epochs must be strictly increasing, got {b} after {a} in {values}")
    return tuple(int(e) for e in values)


def fingerprint(x: Tensor) -> str:
    """A short content hash of tensor ``x`` plus its shape: equal for equal probe images."""
    return hashlib.sha256(x.to(torch.float32).numpy().tobytes()).hexdigest()[:16] + f":{list(x.shape)}"


@dataclass
class Column:
    """One snapshot: per layer, uint8 tiles for every feature, plus where the unit was."""

    label: str
    epoch: Optional[int]
    step: Optional[int]
    seconds: float
    rec: Dict[str, Tensor]        # layer -> uint8 [F, t, t, 3] reconstruction tiles
    patch: Dict[str, Tensor]      # layer -> uint8 [F, t, t, 3] image patch tiles
    units: Dict[str, Tensor]      # layer -> int64 [F, 4] (probe index, channel, y, x)
    boxes: Dict[str, Tensor]      # layer -> int64 [F, 4] (y0, y1, x0, x1) half-open, unclipped
    value: Dict[str, Tensor]      # layer -> float32 [F] the activation projected

    def to_state(self) -> Dict[str, Any]:
        return {"label": self.label, "epoch": -1 if self.epoch is None else self.epoch,
                "step": -1 if self.step is None else self.step, "seconds": float(self.seconds),
                "rec": self.rec, "patch": self.patch, "units": self.units, "boxes": self.boxes,
                "value": self.value}

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> "Column":
        return cls(label=str(d["label"]), epoch=None if d["epoch"] < 0 else int(d["epoch"]),
                   step=None if d["step"] < 0 else int(d["step"]), seconds=float(d["seconds"]),
                   rec=dict(d["rec"]), patch=dict(d["patch"]), units=dict(d["units"]),
                   boxes=dict(d["boxes"]), value=dict(d["value"]))


def open_summary_writer(tensorboard: Any) -> Any:
    """``None``/``False`` -> None; a SummaryWriter (anything with ``add_image``) -> itself; a log
    dir -> a new ``torch.utils.tensorboard.SummaryWriter`` there. DeconvisError when the
    tensorboard package is missing."""
    if tensorboard is None or tensorboard is False:
        return None
    if hasattr(tensorboard, "add_image"):
        return tensorboard
    if isinstance(tensorboard, (str, os.PathLike)):
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency: tensorboard
        except ImportError as exc:
            raise DeconvisError("TensorBoard logging was asked for but the tensorboard package is not "
                                "installed: pip install tensorboard (or leave tensorboard off)") from exc
        return SummaryWriter(log_dir=os.fspath(tensorboard))
    raise DeconvisError(f"tensorboard must be None, a SummaryWriter or a log dir, got {type(tensorboard).__name__}")
