"""ZF 2014 Sec. 3 filter renormalisation: after each optimiser step, every conv filter whose RMS
exceeds a fixed radius (ZF: 1e-1) is rescaled so that its RMS equals the radius.

The RMS of filter ``o`` of a conv weight ``W`` [C_out, C_in/groups, kh, kw] is
``sqrt(mean(W[o] ** 2))``. Filters at or below the radius are left as they are; biases are not
touched. Use :func:`renormalise_filters` directly, :class:`FilterRenorm` as a plain-loop callback
(``on_step_end(step, model)``, the protocol of
:class:`~deconvis.training.snapshots.SnapshotCallback`), or
``deconvis.training.lightning.FilterRenormLightningCallback`` under Lightning.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from deconvis.errors import DeconvisError

#: ZF's radius
ZF_RADIUS = 0.1


@torch.no_grad()
def renormalise_filters(model: nn.Module, radius: float = ZF_RADIUS) -> int:
    """Rescale, in place, every filter of every ``nn.Conv1d/2d/3d`` of ``model`` whose RMS exceeds
    ``radius`` to RMS ``radius``. Returns how many filters were rescaled."""
    if not radius > 0:
        raise DeconvisError(f"filter radius {radius} must be positive (ZF use 0.1)")
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight
            rms = w.detach().pow(2).mean(dim=tuple(range(1, w.dim()))).sqrt()
            over = rms > radius
            if bool(over.any()):
                scale = torch.where(over, radius / rms.clamp_min(1e-30), torch.ones_like(rms))
                w.mul_(scale.view((-1,) + (1,) * (w.dim() - 1)))
                n += int(over.sum())
    return n


class FilterRenorm:
    """Plain-loop callback: call ``on_step_end(step, model)`` after each ``optimizer.step()``.

    ``radius``: the RMS bound (ZF: 0.1); ``every_n_steps``: renormalise every N steps (1: every
    step, as ZF). ``rescaled`` counts the filters rescaled so far; ``last`` those of the last call.
    """

    def __init__(self, radius: float = ZF_RADIUS, every_n_steps: int = 1) -> None:
        if not radius > 0:
            raise DeconvisError(f"filter radius {radius} must be positive (ZF use 0.1)")
        if every_n_steps < 1:
            raise DeconvisError(f"every_n_steps {every_n_steps} must be >= 1")
        self.radius = float(radius)
        self.every_n_steps = int(every_n_steps)
        self.rescaled = 0
        self.last: Optional[int] = None

    def on_step_end(self, step: int, model: nn.Module) -> Optional[int]:
        """Renormalise when ``step`` is a multiple of ``every_n_steps``; returns the number of
        filters rescaled (None when skipped)."""
        if int(step) % self.every_n_steps:
            return None
        self.last = renormalise_filters(model, self.radius)
        self.rescaled += self.last
        return self.last

    __call__ = on_step_end
