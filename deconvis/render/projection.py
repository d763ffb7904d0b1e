"""Project the winners: re-forward their images, project each unit, cut two uint8 tiles.

For every job (layer, channel, rank, image, y, x) the image is decoded again (a DataLoader, with
``workers`` processes; channel by channel in the jobs' order, :func:`completion_order`), forwarded in batches of distinct images only as deep as the deepest layer
its jobs need, and each unit is projected with ``DeconvNet.project_window``. On an out-of-memory
error a batch of images is forwarded in halves (and later batches too); every job is handed to the
sink exactly once. Per chunk of units the device is synchronised twice: once for the uint8 tiles
(built on the device, 1 byte per pixel copied) and once for the boxes and the replay values
(geometry is plain Python ints, the unit list is checked on the host).

Replay check: a job that carries its mined ``activation`` is compared with the value the
re-forward gives at the same (channel, y, x) (:class:`Replay`): a changed image set or model
between mining and projection shows as mismatches instead of silently wrong sheets.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deconvis.errors import DeconvisError
from deconvis.io.images import ImageDataset, UnreadableImage, normalize_batch
from deconvis.io.prefetch import Prefetch
from deconvis.mirror.deconvnet import cut_boxes
from deconvis.render.display import to_uint8_tensor
from deconvis.render.writer import BackgroundWriter
from deconvis.render import sheets
from deconvis.render.sheets import Box, TileJob, TileSink
from deconvis.utils.device import is_oom

Key = Tuple[str, int, int]

#: chunks of projected units that may wait for the tile thread (0: stretch and sink on the caller's
#: thread, as on a GPU); each holds its float reconstructions, [M, C, h, w]
HANDOFF_CHUNKS = 2
log = logging.getLogger("deconvis")


@dataclass
class Replay:
    """Counts of the replay check: a recomputed activation ``b`` matches the mined ``a`` when
    ``|a - b| <= rtol * max(|a|, |b|, scale[layer])`` (``rtol`` 0: bitwise equal); ``scale`` is
    the layer's strongest mined activation, since rounding errors scale with the layer's values,
    not with one small winner's. ``examples`` keeps the first few mismatches as (layer, channel,
    image, mined, recomputed)."""

    rtol: float = 0.0
    scale: Dict[str, float] = field(default_factory=dict)
    checked: int = 0
    mismatches: int = 0
    worst: float = 0.0  # largest relative difference seen
    examples: List[Tuple[str, int, int, float, float]] = field(default_factory=list)

    def add(self, job: TileJob, recomputed: float) -> None:
        a = job.activation
        if a is None or not math.isfinite(a):
            return
        self.checked += 1
        diff = abs(a - recomputed)
        scale = max(abs(a), abs(recomputed), self.scale.get(job.layer, 0.0))
        rel = diff / scale if scale > 0 else 0.0
        if not math.isfinite(recomputed):
            rel = math.inf
        self.worst = max(self.worst, rel)
        if rel > self.rtol:
            self.mismatches += 1
            if len(self.examples) < 5:
                self.examples.append((job.layer, job.channel, job.image, a, recomputed))

    def merge(self, other: "Replay") -> "Replay":
        self.checked += other.checked
        self.mismatches += other.mismatches
        self.worst = max(self.worst, other.worst)
        self.examples = (self.examples + other.examples)[:5]
        return self


class _Decoded(Dataset):
    """``(displayed uint8 [h, w, 3], id)`` of chosen images (id ``-1 - i``: unreadable); batches
    are normalised whole (:func:`deconvis.io.images.normalize_batch`)."""

    def __init__(self, dataset: ImageDataset, ids: Sequence[int]):
        self.dataset, self.ids = dataset, list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int):
        i = self.ids[j]
        try:
            shown = self.dataset.display(i)
        except UnreadableImage:
            h, w = self.dataset.preprocess.crop
            return torch.zeros(h, w, 3, dtype=torch.uint8), -1 - i
        return torch.from_numpy(np.ascontiguousarray(shown)), i


def _local_crop(dn, layer: str, rec: torch.Tensor, boxes: torch.Tensor, units: torch.Tensor,
                size: Tuple[int, int], noted: Set[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """For a layer that sees the whole image only through a squeeze-excitation gate (its
    projection is full-image), cut ``rec`` [M, C, H, W] and ``boxes`` [M, 4] down to the local
    field of the conv path around each unit (the gate detached): the patch that drives the unit
    locally (:meth:`deconvis.graph.rf.RFTable.crop_box`). Other layers pass through unchanged;
    the first cut of each layer is logged (``noted``)."""
    if not hasattr(dn, "receptive_fields"):
        return rec, boxes
    row = dn.receptive_fields(size)[layer]
    if row.local is None or tuple(rec.shape[-2:]) != tuple(size):
        return rec, boxes
    if layer not in noted:
        noted.add(layer)
        log.info("layer %s sees the whole image through a gate: tiles show the local field of its conv path "
                 "(%dx%d px, the gate detached)", layer, *row.local.rf)
    local = torch.tensor([row.local.box(y, x) for y, x in units[:, 2:4].tolist()], dtype=torch.long)
    return cut_boxes(rec, local), local


def completion_order(jobs: Sequence[TileJob]) -> List[int]:
    """The jobs' images in the order that completes their channels earliest: the channels in the
    order of ``jobs``, each adding its images not listed yet (ascending). A channel is complete
    once its last image is forwarded, so its sprite can be written (and its memory reused) while
    later channels project, instead of nearly every channel completing in the last batches (as
    in image order, where a channel's last winner is on average near the end)."""
    images: Dict[Tuple[str, int], Set[int]] = {}
    for j in jobs:
        images.setdefault((j.layer, j.channel), set()).add(j.image)
    order: Dict[int, None] = {}
    for ids in images.values():
        for i in sorted(ids):
            order.setdefault(i)
    return list(order)


def project_jobs(
    dn,
    dataset: ImageDataset,
    jobs: Sequence[TileJob],
    *,
    rule: str = "deconvnet",
    batch_size: int = 16,
    project_batch: int = 64,
    device: "str | torch.device" = "cpu",
    dtype: torch.dtype = torch.float32,
    sink: TileSink,
    progress: bool = True,
    workers: int = 0,
    replay: Optional[Replay] = None,
    on_image: Optional[Callable[[int, np.ndarray], None]] = None,
) -> int:
    """Project every job and hand ``(job, rec uint8 [rh, rw, 3], img uint8 [rh, rw, 3], box)`` to
    ``sink`` (once per job). Images are forwarded once per batch of ``batch_size`` distinct images
    (halved on out-of-memory), in :func:`completion_order`, up to the deepest layer their jobs need; units go to
    ``dn.project_window`` in chunks of ``project_batch`` per layer. ``replay`` (optional) receives
    the replay check of the jobs that carry an ``activation``; ``on_image`` (optional) receives each
    decoded image once, ``(image id, displayed uint8 [h, w, 3])``, before its jobs are projected.
    Returns the number of jobs done."""
    from tqdm.auto import tqdm  # start-up time: tqdm.auto probes for Jupyter

    device = torch.device(device)
    by_image: Dict[int, List[TileJob]] = {}
    for j in jobs:
        by_image.setdefault(j.image, []).append(j)
    order = {name: i for i, name in enumerate(getattr(dn, "layer_names", []))}
    done: Set[Key] = set()
    noted: Set[str] = set()  # gated layers already logged
    size = [max(1, int(batch_size))]
    geo_dtype = torch.float32 if device.type == "mps" else torch.float64
    bar = tqdm(total=len(jobs), unit="unit", desc="projecting", disable=not progress, dynamic_ncols=True)

    def run(shown: List[np.ndarray], x: torch.Tensor, ids: List[int]) -> None:
        per_layer: Dict[str, List[Tuple[int, TileJob]]] = {}
        for b, i in enumerate(ids):
            for j in by_image[i]:
                if (j.layer, j.channel, j.rank) not in done:
                    per_layer.setdefault(j.layer, []).append((b, j))
        if not per_layer:
            return
        layers = sorted(per_layer, key=lambda n: order.get(n, 0))
        acts = dn.forward(x.to(device=device, dtype=dtype), layers=layers)
        for layer in layers:
            items = per_layer[layer]
            act = acts[layer]
            for c0 in range(0, len(items), project_batch):
                chunk = items[c0:c0 + project_batch]
                units = torch.tensor([[b, j.channel, j.y, j.x] for b, j in chunk], dtype=torch.long)  # host
                # (any dense layout: the tiles' stretch reads it as it is, channels-last is faster)
                rec, boxes = dn.project_window(layer, units, rule=rule, memory_format=torch.preserve_format)
                rec, boxes = _local_crop(dn, layer, rec, boxes, units, tuple(x.shape[-2:]), noted)  # SE-gated
                if handoff is None:  # a device: the tiles' stretch runs there, 1 byte per pixel copied
                    rec = to_uint8_tensor(rec).cpu()                 # sync 1: uint8 tiles
                u = units.to(act.device, non_blocking=True)
                vals = act[u[:, 0], u[:, 1], u[:, 2], u[:, 3]] if act.dim() == 4 else act[u[:, 0], u[:, 1]]
                geo = torch.cat([boxes.to(device=vals.device, dtype=geo_dtype),  # sync 2: boxes + replay values
                                 vals.to(geo_dtype)[:, None]], 1).cpu().tolist()
                done.update((j.layer, j.channel, j.rank) for _, j in chunk)
                if handoff is None:
                    deliver(chunk, rec, geo, shown)
                else:
                    handoff.submit(deliver, chunk, rec, geo, shown)

    def deliver(chunk: List[Tuple[int, TileJob]], rec: torch.Tensor, geo: List[List[float]],
                shown: List[np.ndarray]) -> None:
        """Hand one chunk's tiles to ``sink`` (``rec``: float reconstructions [M, C, h, w] on the
        CPU, stretched here, or the uint8 tiles [M, h, w, C] already)."""
        tiles = (rec if rec.dtype == torch.uint8 else to_uint8_tensor(rec)).numpy()
        for (b, j), r, g in zip(chunk, tiles, geo):
            box: Box = (int(g[0]), int(g[1]), int(g[2]), int(g[3]))
            sink(j, np.ascontiguousarray(r), sheets.crop_padded(shown[b], box), box)
            if replay is not None:
                replay.add(j, float(g[4]))
        bar.update(len(chunk))

    def run_halving(shown: List[np.ndarray], x: torch.Tensor, ids: List[int]) -> None:
        start = 0
        while start < len(ids):
            n = size[0]
            try:
                run(shown[start:start + n], x[start:start + n], ids[start:start + n])
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                if not is_oom(exc) or n == 1:
                    if is_oom(exc):
                        raise DeconvisError("out of memory re-forwarding a single image for projection on "
                                            f"{device}; use fewer layers, a smaller --crop or --device cpu") from exc
                    raise
                dn.release()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                size[0] = max(1, n // 2)
                warnings.warn(f"out of memory while projecting: forwarding {size[0]} images at a time",
                              RuntimeWarning, stacklevel=2)
                continue
            start += n

    # on the CPU the tiles' stretch and the sink run on a thread of their own, beside the next
    # chunk's projection (:data:`HANDOFF_CHUNKS` chunks at most wait; their order is kept)
    handoff = (BackgroundWriter(threads=1, max_pending=HANDOFF_CHUNKS, name="deconvis-tiles")
               if device.type == "cpu" and HANDOFF_CHUNKS > 0 else None)
    loader: Iterable = DataLoader(_Decoded(dataset, completion_order(jobs)), batch_size=max(1, int(batch_size)),
                                  shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    if workers == 0:  # no worker processes: a thread decodes the next batches meanwhile
        loader = Prefetch(loader, name="deconvis-decode")
    # the model does not change while its winners project: the filters are prepared once
    fixed = dn.fixed_weights() if hasattr(dn, "fixed_weights") else contextlib.nullcontext()
    try:
        with fixed:
            for shown_t, ids_t in loader:
                ids = [int(i) for i in ids_t]
                bad = [-1 - i for i in ids if i < 0]
                if bad:
                    raise DeconvisError(f"image {bad[0]} ({dataset.source.path(bad[0])}) won during mining but cannot "
                                        "be read any more; the image set changed: re-run with --fresh")
                shown = [s.numpy() for s in shown_t]
                x = normalize_batch(shown_t.to(device, non_blocking=True), dataset.preprocess)
                if on_image is not None:
                    for i, s in zip(ids, shown):
                        on_image(i, s)
                run_halving(shown, x, ids)
        if handoff is not None:
            handoff.close()  # every chunk delivered (and the first error of any raised)
    finally:
        if handoff is not None:
            handoff.abandon()
        bar.close()
        dn.release()
    return len(done)
