"""Streaming per-channel statistics of the unit's maximum over an image set, collected while
mining (the unit pages show them): a histogram on fixed symmetric-log bins, the share of images
where the channel fires (maximum > 0), and the first and second moments with the cross products
between channels (their Pearson correlation over the image set).

Everything is a sum over images, so states of disjoint image sets merge by addition (ranks,
resumed checkpoints) and the result equals one pass over the union.
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import torch
from torch import Tensor

#: histogram bin edges (activation units): 0 and +-10^e for e = -3, -2.875, ..., 4; bin i holds
#: edges[i-1] <= v < edges[i] (bin 0 below -1e4, the last bin at or above 1e4)
EDGES: List[float] = sorted({0.0} | {s * 10.0 ** (e / 8) for e in range(-24, 33) for s in (1.0, -1.0)})
BINS = len(EDGES) + 1


class UnitStats:
    """Sums over images of one layer's per-image channel maxima ``[N, C]``.

    ``hist`` int64 ``[C, BINS]``; ``fired`` int64 ``[C]`` (maximum > 0); ``count`` int64 ``[C]``
    (finite maxima); ``rows`` images whose maxima were finite in every channel, over which
    ``s1`` ``[C]``, ``s2`` ``[C]`` and ``cross`` ``[C, C]`` (float64) are summed.
    """

    FIELDS = ("hist", "fired", "count", "rows", "s1", "s2", "cross")

    def __init__(self, channels: int, device: "str | torch.device" = "cpu"):
        dev = torch.device(device)
        self.edges = torch.tensor(EDGES, dtype=torch.float64, device=dev)
        self.hist = torch.zeros(channels, BINS, dtype=torch.int64, device=dev)
        self.fired = torch.zeros(channels, dtype=torch.int64, device=dev)
        self.count = torch.zeros(channels, dtype=torch.int64, device=dev)
        self.rows = torch.zeros((), dtype=torch.int64, device=dev)
        self.s1 = torch.zeros(channels, dtype=torch.float64, device=dev)
        self.s2 = torch.zeros(channels, dtype=torch.float64, device=dev)
        self.cross = torch.zeros(channels, channels, dtype=torch.float64, device=dev)

    @torch.inference_mode()
    def update(self, vals: Tensor) -> None:
        """Fold the maxima ``vals [N, C]`` of N images (NaN/inf entries are left out)."""
        v = vals.to(device=self.hist.device, dtype=torch.float64)
        n, c = v.shape
        finite = torch.isfinite(v)
        bins = torch.bucketize(v.nan_to_num(0.0, 0.0, 0.0), self.edges, right=True)
        flat = (torch.arange(c, device=v.device) * BINS + bins).masked_select(finite)
        self.hist += torch.bincount(flat, minlength=c * BINS).view(c, BINS)
        self.fired += ((v > 0) & finite).sum(0)
        self.count += finite.sum(0)
        rows = finite.all(1)
        w = v[rows]
        self.rows += rows.sum()
        self.s1 += w.sum(0)
        self.s2 += (w * w).sum(0)
        self.cross += w.T @ w

    def merge(self, other: "UnitStats") -> "UnitStats":
        """Add ``other`` (a disjoint image set) into this state, in place; returns ``self``."""
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f).to(self.hist.device))
        return self

    def state_dict(self) -> Dict[str, Tensor]:
        return {f: getattr(self, f).detach().cpu().clone() for f in self.FIELDS}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Tensor], device: "str | torch.device" = "cpu") -> "UnitStats":
        s = cls(int(d["hist"].shape[0]), device)
        for f in cls.FIELDS:
            setattr(s, f, d[f].to(s.hist.device))
        return s

    def correlation(self) -> Tensor:
        """Pearson correlation ``[C, C]`` (float64, CPU) of the channels' maxima over the images;
        NaN for a channel that never varied (or fewer than 2 images)."""
        n = float(self.rows)
        if n < 2:
            return torch.full(self.cross.shape, float("nan"), dtype=torch.float64)
        mean = self.s1.cpu() / n
        cov = self.cross.cpu() / n - mean[:, None] * mean[None, :]
        var = (self.s2.cpu() / n - mean * mean).clamp_min(0)
        std = var.sqrt()
        r = cov / (std[:, None] * std[None, :])
        return r.masked_fill((std[:, None] <= 1e-12 * (1 + mean.abs()[:, None])) | (std[None, :] <= 1e-12 * (1 + mean.abs()[None, :])),
                             float("nan")).clamp(-1, 1)

    def summary(self, top: int = 5) -> Dict[str, object]:
        """JSON-ready columns per channel: ``hist`` as ``[first bin, [counts...]]`` (zeros trimmed),
        ``fired`` share of images where the maximum is > 0 (null without images), ``mean`` of the
        maxima, ``correlated`` the ``top`` most correlated other channels ``[[channel, r], ...]``."""
        hist = self.hist.cpu()
        out_hist = []
        for row in hist.tolist():
            nz = [i for i, h in enumerate(row) if h]
            out_hist.append([nz[0], row[nz[0]:nz[-1] + 1]] if nz else [0, []])
        count = self.count.cpu().double()
        fired = (self.fired.cpu().double() / count.clamp_min(1)).tolist()
        fired = [f if n else None for f, n in zip(fired, count.tolist())]
        mean = (self.s1.cpu() / max(1, int(self.rows))).tolist() if int(self.rows) else [None] * len(fired)
        r = self.correlation()
        r.fill_diagonal_(float("nan"))
        key = r.nan_to_num(-2.0)
        k = min(top, max(0, r.shape[0] - 1))
        vals, idx = key.topk(k, dim=1) if k else (key[:, :0], key[:, :0].long())
        corr = [[[int(j), round(float(v), 4)] for v, j in zip(vr, jr) if v > -2] for vr, jr in zip(vals.tolist(), idx.tolist())]
        return {"images": int(self.count.max()) if self.count.numel() else 0, "edges": EDGES, "hist": out_hist,
                "fired": fired, "mean": mean, "correlated": corr}
