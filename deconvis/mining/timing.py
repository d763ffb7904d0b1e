"""Where mining time goes: :class:`MiningTimes` and the clock that fills it without a host sync
per batch (CUDA events read once completed), or with one (``profile``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch


@dataclass
class MiningTimes:
    """Where :func:`mine`'s time went, in seconds.

    * ``load``: waiting for the next batch from ``batches`` (decoding + preprocessing when the
      DataLoader has no workers; with workers, only what they could not hide); host wall time.
    * ``forward``: copy to the device + the forward to the deepest mined layer.
    * ``topk``: channel maxima + top-k update.
    * ``total``: wall time of the whole loop; ``other = total - load - forward - topk``
      (progress bar, checkpoints, skipped items; negative when device work overlapped the host).

    ``clock`` says how ``forward``/``topk`` were measured: ``"host"`` (wall time: exact on the CPU,
    where the work is synchronous), ``"cuda-events"`` (GPU time between CUDA events, read when they
    have completed: no host sync per batch; it overlaps ``load``, which the GPU hides) or
    ``"synced"`` (``profile``: the device is synchronised around every step, exact but slower).
    """

    load: float = 0.0
    forward: float = 0.0
    topk: float = 0.0
    total: float = 0.0
    batches: int = 0
    images: int = 0
    clock: str = "host"
    per_batch: List[Tuple[float, float, float]] = field(default_factory=list)  # profile only

    @property
    def other(self) -> float:
        return self.total - self.load - self.forward - self.topk

    def to_dict(self) -> Dict[str, object]:
        return {"load": round(self.load, 4), "forward": round(self.forward, 4), "topk": round(self.topk, 4),
                "other": round(self.other, 4), "total": round(self.total, 4), "batches": self.batches,
                "images": self.images, "clock": self.clock}

    def summary(self) -> str:
        """``load 1.2 s (20%), forward 4.1 s (68%), top-k 0.5 s (8%), other 0.2 s; 41.3 img/s``."""
        tot = max(self.total, 1e-9)
        parts = [f"{name} {v:.2f} s ({100 * v / tot:.0f}%)"
                 for name, v in (("load", self.load), ("forward", self.forward), ("top-k", self.topk))]
        parts.append(f"other {self.other:.2f} s")
        clock = "" if self.clock == "host" else f" [{self.clock}]"
        return ", ".join(parts) + f"; {self.images / tot:.1f} img/s{clock}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Clock:
    """Marks and spans for :class:`MiningTimes` on ``device`` (see its ``clock``)."""

    def __init__(self, device: torch.device, profile: bool):
        self.device = device
        self.events = device.type == "cuda" and not profile
        self.sync = profile and device.type in ("cuda", "mps")
        self.kind = "cuda-events" if self.events else ("synced" if self.sync else "host")
        self.pending: List[Tuple[str, object, object]] = []

    def mark(self) -> object:
        if self.events:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        if self.sync:
            _synchronize(self.device)
        return time.perf_counter()

    def span(self, times: MiningTimes, name: str, a: object, b: object) -> float:
        """Add the span ``a -> b`` to ``times.<name>``; returns it (0 for events not read yet)."""
        if self.events:
            self.pending.append((name, a, b))
            self.harvest(times, block=False)
            return 0.0
        dt = float(b) - float(a)  # type: ignore[arg-type]
        setattr(times, name, getattr(times, name) + dt)
        return dt

    def harvest(self, times: MiningTimes, block: bool) -> None:
        """Read the completed events (all of them, waiting, when ``block``)."""
        while self.pending:
            name, a, b = self.pending[0]
            if block:
                b.synchronize()  # type: ignore[attr-defined]
            elif not b.query():  # type: ignore[attr-defined]  # non-blocking
                break
            setattr(times, name, getattr(times, name) + a.elapsed_time(b) / 1000.0)  # type: ignore[attr-defined]
            self.pending.pop(0)
