"""Streaming top-k mining: :func:`mine` streams an image set once through the network and folds
every batch into a :class:`~deconvis.mining.topk.TopK` (the state, its ordering and merging are
described in :mod:`deconvis.mining.topk`, re-exported here); :func:`hooked_activations` gets the
layer outputs of any ``nn.Module``.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from deconvis.errors import DeconvisError, close_matches
from deconvis.mining.timing import MiningTimes, Clock
from deconvis.mining.topk import EMPTY, TopK, channel_maxima
from deconvis.utils.device import is_oom

ActivationFn = Callable[[Tensor], Mapping[str, Tensor]]

__all__ = ["ActivationFn", "EMPTY", "MiningTimes", "TopK", "channel_maxima", "hooked_activations", "mine"]


def mine(
    activations: ActivationFn,
    batches: Iterable[Tuple[Tensor, Tensor]],
    topk: TopK,
    *,
    channels: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    checkpoint_every: int = 0,
    on_checkpoint: Optional[Callable[[TopK], None]] = None,
    checkpoint_seconds: float = 0.0,
    now: Callable[[], float] = time.monotonic,
    total: Optional[int] = None,
    progress: bool = True,
    desc: str = "mining",
    times: Optional[MiningTimes] = None,
    profile: bool = False,
    on_batch: Optional[Callable[[int], None]] = None,
    batch_size: Optional[int] = None,
) -> TopK:
    """Stream ``batches`` once through ``activations`` and fold them into ``topk``.

    ``batches`` yields ``(images [B, 3, H, W], ids [B])`` with global dataset indices; a negative
    id ``-1 - i`` marks item ``i`` as unreadable (skipped, recorded in ``topk.skipped``).
    ``activations(images)`` returns ``{layer: [B, C, h, w]}`` for (at least) ``topk.layers`` --
    e.g. ``lambda x: dn.activations(x, layers)``. ``channels`` keeps only the first N channels of
    every layer. Images move to ``topk.device`` (and ``dtype`` if given); on an out-of-memory
    error the batch is forwarded in halves (and later batches too). ``on_checkpoint(topk)``
    runs every ``checkpoint_every`` batches and whenever ``checkpoint_seconds`` have passed on
    ``now()`` since the last checkpoint (or the start; 0 turns either off), and not at the end: the
    caller saves the final state. ``total`` (items to stream) sizes the progress bar, which starts at ``topk.seen``.

    ``batch_size``: every forward gets exactly this many images (a short batch -- the last of a
    shard, or one with unreadable images removed -- is padded with zero images whose activations
    are dropped), so an image's activations do not depend on which batch it lands in: cuDNN and
    oneDNN pick kernels by shape, and byte-identical images must tie exactly (broken by image
    index) whatever the number of processes. Not covered: two ranks that halved their chunk after
    out-of-memory errors at different times (the chunk, then padded to its new size, differs).

    ``times`` (a :class:`MiningTimes`) receives where the time went; nothing in the loop waits
    for the device (no host sync per batch) unless ``profile``, which synchronises around every
    step for exact per-batch times (kept in ``times.per_batch`` as (load, forward, top-k)
    seconds). ``on_batch(n_batches)`` runs after every batch (e.g. to poll for a failure of
    another rank).
    """
    from tqdm.auto import tqdm  # start-up time: tqdm.auto probes for Jupyter

    times = times if times is not None else MiningTimes()
    clock = Clock(topk.device, profile)
    times.clock = clock.kind
    chunk = [0]  # images per forward; shrinks (and stays small) after an out-of-memory error

    def fold(images: Tensor, ids: Tensor, mark: object) -> Tuple[float, float]:
        """Forward + update in chunks; ``mark`` was taken before the copy to the device. Returns
        (forward, top-k) seconds of this batch (host clocks only)."""
        start, n = 0, int(ids.shape[0])
        size = chunk[0] or batch_size or n
        t_fwd = t_upd = 0.0
        while start < n:
            part = images[start:start + size]
            n_part = int(part.shape[0])
            if batch_size and n_part < size:  # the same shape for every forward: see the docstring
                part = torch.cat((part, part.new_zeros((size - n_part, *part.shape[1:]))))
            try:
                acts = activations(part)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                if not is_oom(exc) or size == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                size = max(1, size // 2)
                chunk[0] = size
                warnings.warn(f"out of memory while mining: forwarding {size} images at a time",
                              RuntimeWarning, stacklevel=3)
                continue
            if n_part < int(part.shape[0]):
                acts = {name: a[:n_part] for name, a in acts.items()}
            if channels is not None:
                acts = {name: a[:, :channels] for name, a in acts.items()}
            m_fwd = clock.mark()
            topk.update(acts, ids[start:start + n_part])  # after the forward: a retry never counts twice
            m_upd = clock.mark()
            t_fwd += clock.span(times, "forward", mark, m_fwd)
            t_upd += clock.span(times, "topk", m_fwd, m_upd)
            mark = m_upd
            start += n_part
        return t_fwd, t_upd

    bar = tqdm(total=total, initial=topk.seen, unit="img", desc=desc, disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    n_batches = 0
    t_start = time.perf_counter()
    last_checkpoint = now()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.callback(bar.close)
        it = iter(batches)
        while True:
            t_wait = time.perf_counter()
            try:
                images, ids = next(it)
            except StopIteration:
                break
            t_load = time.perf_counter() - t_wait
            times.load += t_load
            ids = torch.as_tensor(ids, dtype=torch.int64)
            n_items = int(ids.shape[0])
            ids_cpu = ids.cpu()
            bad = ids_cpu < 0
            if bool(bad.any()):  # ids come from the loader on the host: no device sync
                topk.skipped.extend((-1 - ids_cpu[bad]).tolist())
                keep = ~bad
                images, ids = images[keep], ids_cpu[keep]
            t_fwd = t_upd = 0.0
            if ids.shape[0]:
                mark = clock.mark()
                images = images.to(topk.device, non_blocking=True)
                if dtype is not None:
                    images = images.to(dtype)
                t_fwd, t_upd = fold(images, ids, mark)
            topk.seen += n_items
            times.images += n_items
            bar.update(n_items)
            n_batches += 1
            times.batches += 1
            if profile:
                times.per_batch.append((t_load, t_fwd, t_upd))
            if on_checkpoint is not None and (
                    (checkpoint_every and n_batches % checkpoint_every == 0)
                    or (checkpoint_seconds > 0 and now() - last_checkpoint >= checkpoint_seconds)):
                on_checkpoint(topk)
                last_checkpoint = now()
            if on_batch is not None:
                on_batch(n_batches)
        clock.harvest(times, block=True)
    times.total += time.perf_counter() - t_start
    return topk


def hooked_activations(model: nn.Module, layers: Sequence[str]) -> ActivationFn:
    """An ``images -> {layer: output}`` callable for any ``nn.Module`` via forward hooks on the
    named submodules (``model.named_modules()`` names). Runs the whole model; DeconvNet's
    ``activations`` is faster for chain nets (it stops at the deepest layer)."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise DeconvisError(f"model has no module {missing[0]!r}" + close_matches(missing[0], modules))

    def run(images: Tensor) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        handles = []
        for name in layers:
            def hook(_m, _inp, output, name=name):
                out[name] = output.clone() if name not in out else out[name]
            handles.append(modules[name].register_forward_hook(hook))
        try:
            model(images)
        finally:
            for h in handles:
                h.remove()
        return out

    return run
