"""Pick the device for a run, and size batches by the memory it has.

``resolve_device("auto")`` gives CUDA when present, then Apple MPS, then the CPU; ``activate``
makes ``cuda:N`` current (``use_device`` does both, for every command that picks a device); ``tf32`` sets the TensorFloat-32 policy for a block; ``default_workers``
and ``bf16_native`` answer the questions a GPU run asks at its start.
``batched(fn, items, batch_size, ...)`` runs ``fn`` over chunks of ``items`` and, on an
out-of-memory error, halves the chunk and carries on (saying so once), so one oversized batch
never loses a run.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar

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


def activate(device: torch.device) -> None:
    """Make ``cuda:N`` the current CUDA device, so that CUDA events, streams, ``empty_cache`` and
    the DataLoader's pin-memory thread use it rather than GPU 0; nothing for other devices."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def use_device(name: Optional[str] = "auto") -> torch.device:
    """:func:`resolve_device`, then :func:`activate`: what every command that picks a device calls,
    so ``cuda:N`` is current for all its CUDA work (not only under torchrun)."""
    device = resolve_device(name)
    activate(device)
    return device


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: CUDA compute capability 8.0+ (Ampere), not
    the emulation older GPUs accept (``is_bf16_supported()`` says yes there); CPU and MPS yes."""
    if device.type != "cuda":
        return True
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def default_workers(device: torch.device, procs_per_node: int = 1, cpus: Optional[int] = None) -> int:
    """DataLoader workers for ``--workers auto``: 0 on the CPU (decoding would take cores from the
    forward), else the node's CPUs shared by its processes, at most 8 (a GPU starves on 0)."""
    if device.type == "cpu":
        return 0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(max(1, min(8, cpus // max(1, procs_per_node) - 1)))


@contextlib.contextmanager
def tf32(allow: bool) -> Iterator[None]:
    """Inside: TensorFloat-32 convs and matmuls on (Ampere+) CUDA allowed or not, as asked; the
    previous settings come back on leaving. No effect on the CPU."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(allow)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def memory_budget(device: torch.device, fraction: float = 0.5) -> int:
    """Bytes a batch may use on ``device``: a fraction of the CUDA memory that is free or held
    unused in PyTorch's cache (reserved - allocated), else a CPU budget."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int((free + max(0, cached)) * fraction)
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
