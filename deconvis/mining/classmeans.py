"""Per channel, the mean over each class's images of the channel's maximum: streaming sums
collected while mining when the image set has labels (an ImageFolder tree), so a unit page can
list the classes a channel responds to most.

Sums over images: states of disjoint image sets merge by addition (ranks, resumed checkpoints)
and equal one pass over their union, like :mod:`deconvis.mining.unitstats`.
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import torch
from torch import Tensor

#: classes listed per channel in ``results.json`` and on the unit pages
TOP_CLASSES = 5


class ClassMeans:
    """Per class sums of one layer's per-image channel maxima.

    ``sums`` float64 ``[C, K]`` (the maxima of the class's images), ``counts`` int64 ``[C, K]``
    (how many were finite: a NaN/inf maximum is left out, as in the unit statistics)."""

    FIELDS = ("sums", "counts")

    def __init__(self, channels: int, classes: int, device: "str | torch.device" = "cpu"):
        dev = torch.device(device)
        self.sums = torch.zeros(channels, classes, dtype=torch.float64, device=dev)
        self.counts = torch.zeros(channels, classes, dtype=torch.int64, device=dev)

    @torch.inference_mode()
    def update(self, vals: Tensor, labels: Tensor) -> None:
        """Fold the maxima ``vals [N, C]`` of N images with class indices ``labels [N]`` (int64;
        a negative label: an image without a class, left out)."""
        v = vals.to(device=self.sums.device, dtype=torch.float64)
        lab = labels.to(device=self.sums.device, dtype=torch.int64)
        ok = torch.isfinite(v) & (lab >= 0)[:, None]          # [N, C]
        idx = lab.clamp_min(0)
        self.sums.index_add_(1, idx, torch.where(ok, v, torch.zeros_like(v)).T)
        self.counts.index_add_(1, idx, ok.T.to(torch.int64))

    def merge(self, other: "ClassMeans") -> "ClassMeans":
        """Add ``other`` (a disjoint image set) into this state, in place; returns ``self``."""
        self.sums = self.sums + other.sums.to(self.sums.device)
        self.counts = self.counts + other.counts.to(self.sums.device)
        return self

    def state_dict(self) -> Dict[str, Tensor]:
        return {f: getattr(self, f).detach().cpu().clone() for f in self.FIELDS}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Tensor], device: "str | torch.device" = "cpu") -> "ClassMeans":
        c, k = d["sums"].shape
        s = cls(int(c), int(k), device)
        s.sums, s.counts = d["sums"].to(s.sums.device), d["counts"].to(s.sums.device)
        return s

    def means(self) -> Tensor:
        """``[C, K]`` float64 on the CPU: each class's mean maximum (NaN for a class without images)."""
        counts = self.counts.cpu()
        return (self.sums.cpu() / counts.clamp_min(1)).masked_fill(counts == 0, float("nan"))

    def summary(self, top: int = TOP_CLASSES) -> List[List[List[float]]]:
        """Per channel, the ``top`` classes with the highest mean maximum, best first, as
        ``[[class index, mean, images], ...]`` (ties: the smaller class index first)."""
        means, counts = self.means(), self.counts.cpu()
        key = means.nan_to_num(float("-inf"))
        k = min(top, key.shape[1])
        order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
        out = []
        for c, row in enumerate(order.tolist()):
            out.append([[int(j), float(means[c, j]), int(counts[c, j])] for j in row if int(counts[c, j]) > 0])
        return out
