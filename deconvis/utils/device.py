"""Pick the device for a run, and size batches by the memory it has.

``resolve_device("auto")`` gives CUDA when present, then Apple MPS, then the CPU.
``batched(fn, items, batch_size, ...)`` runs ``fn`` over chunks of ``items`` and, on an
out-of-memory error, halves the chunk and carries on (saying so once), so one oversized batch
never loses a run.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Tuple, TypeVar

import torch
from torch import nn

from deconvis.errors import DeconvisError

T = TypeVar("T")
CPU_BUDGET_BYTES = 2 << 30  # working memory a CPU projection batch may take


def resolve_device(name: Optional[str] = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; otherwise the named device, checked to exist."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise DeconvisError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeconvisError(f"device {name!r} asked for but CUDA is not available here; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeconvisError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeconvisError("device 'mps' asked for but MPS is not available here; use --device cpu or auto")
    return dev


def memory_budget(device: torch.device, fraction: float = 0.5) -> int:
    """Bytes a batch may use on ``device``: a fraction of free CUDA memory, else a CPU budget."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return CPU_BUDGET_BYTES


def auto_batch_size(bytes_per_item: int, device: torch.device, cap: int = 1024) -> int:
    """Largest batch (1..cap) whose working memory fits :func:`memory_budget`."""
    return int(max(1, min(cap, memory_budget(device) // max(1, bytes_per_item))))


def is_oom(exc: Optional[BaseException]) -> bool:
    """An out-of-memory error, also when wrapped (a DeconvisError raised ``from`` the original)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if oom is not None and isinstance(exc, oom):
            return True
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__
    return False


def model_dtype_device(model: nn.Module) -> Tuple[torch.dtype, torch.device]:
    """dtype and device of the model's first floating-point parameter or buffer (default dtype, CPU
    for a model without any)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def batched(fn: Callable[[torch.Tensor], T], items: torch.Tensor, batch_size: int,
            what: str = "batch") -> List[T]:
    """``[fn(chunk) for chunk in items.split(batch_size)]``, halving the chunk on out-of-memory."""
    out: List[T] = []
    start, size, warned = 0, max(1, int(batch_size)), False
    while start < len(items):
        chunk = items[start:start + size]
        try:
            out.append(fn(chunk))
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not is_oom(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if size == 1:
                raise DeconvisError(f"out of memory for a single {what} on this device; use a smaller "
                                    "input size, fewer layers, or --device cpu") from exc
            size = max(1, size // 2)
            if not warned:
                warnings.warn(f"out of memory: retrying with {what} size {size}", RuntimeWarning, stacklevel=2)
                warned = True
            continue
        start += len(chunk)
    return out
