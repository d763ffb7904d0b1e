"""Projection: re-forward the winners' images, project every winner with
``DeconvNet.project_window`` and write one sprite per channel (``tiles/<layer>/c<channel>.<png|jpg>``,
:mod:`deconvis.render.sprites`) on a background thread, which also writes the unit pages'
thumbnail of every image the projection decodes and, in a one-process run, composes each layer's
grid sheets as its channels complete (:class:`_SheetPages`); under torchrun each rank takes whole
(layer, channel) groups.

Progress: every rank keeps its own ``projection.rank<r>.json`` (atomic, at most every
:data:`SAVE_EVERY_S` and at the end) listing the channels whose sprite it has written, with their
boxes. Rank 0 merges every rank's file when it plans a resumed projection, so after a crash no
rank's finished channels are projected again (a channel is the unit of work: its k winners are
projected together, and a channel whose sprite was not yet written is projected again).
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from deconvis.io.atomic import write_image, write_text
from deconvis.io.images import ImageDataset
from deconvis.render import projection
from deconvis.render import sheets as render
from deconvis.render import sprites
from deconvis.render.writer import BackgroundWriter
from deconvis.runs import distributed as dist_mod
from deconvis.runs import precision
from deconvis.runs import unit_pages
from deconvis.runs.distributed import DistInfo
from deconvis.runs.phases.prepare import Context
from deconvis.runs.phases.render import sheet_ext, sheets_hash
from deconvis.runs.phases.rundir import PROGRESS_GLOB, channel_done, progress_filename
from deconvis.runs.results import ChannelResult, LayerResult, Results, Winner

log = logging.getLogger("deconvis")

#: during projection, each rank's progress file is re-written at most this often (seconds)
SAVE_EVERY_S = 30.0
#: outputs of one auto-sized projection call may take this many bytes (DeconvNet sizes the work
#: inside a call by free memory and halves it on out-of-memory; this bounds what it returns)
AUTO_PROJECT_BYTES = {"cuda": 1 << 30}
AUTO_PROJECT_BYTES_DEFAULT = 256 << 20
#: sprites waiting for the writer thread before the projection waits for it (bounds memory)
WRITER_PENDING = 64
#: the unit pages' thumbnails go to a thread of their own (at most this many wait; each holds its
#: decoded batch): queued behind the sprites and sheets they blocked the projection (0.8 s of 40 s
#: at 1000 images)
THUMBS_PENDING = 128
#: compose each layer's sheets on the writer thread as its channels complete (:class:`_SheetPages`)
SHEETS_WHILE_PROJECTING = True

#: one finished channel: (layer name, channel, sprite path, cell [h, w], rf [h, w], [(rank, box, clipped)])
Entry = Tuple[str, int, str, List[int], List[int], List[Tuple[int, List[int], List[int]]]]


def _winners(res: Results) -> Dict[Tuple[str, int, int], Tuple[LayerResult, Winner]]:
    """(layer name, channel, rank) -> (its layer, the winner) over all of ``res``."""
    return {(lr.name, u.channel, w.rank): (lr, w) for lr in res.layers for u in lr.units for w in u.winners}


def _units(res: Results) -> Dict[Tuple[str, int], Tuple[LayerResult, ChannelResult]]:
    """(layer name, channel) -> (its layer, the channel's result)."""
    return {(lr.name, u.channel): (lr, u) for lr in res.layers for u in lr.units}


def read_progress(run_dir: str, projection_hash: str, prefix: str = "projection") -> List[Entry]:
    """The finished channels every rank's progress file lists (files of another projection, or
    unreadable ones, are skipped: their channels are projected again); ``prefix``
    ``projection-bottom``: the bottom-k's files."""
    out: List[Entry] = []
    for path in sorted(glob.glob(os.path.join(run_dir, PROGRESS_GLOB.replace("projection", prefix, 1)))):
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError):
            log.warning("ignoring unreadable projection progress file %s", path)
            continue
        if isinstance(d, dict) and d.get("projection_hash") == projection_hash:
            out.extend(tuple(e) for e in d.get("channels", []))  # type: ignore[misc]
    return out


def apply_entries(res: Results, entries: List[Entry]) -> None:
    """Fill finished channels (:data:`Entry`) into ``res``: sprite, cell, RF and boxes."""
    units = _units(res)
    for layer, channel, sprite, cell, rf, boxes in entries:
        found = units.get((layer, int(channel)))
        if found is None:
            continue
        lr, u = found
        by_rank = {w.rank: w for w in u.winners}
        for rank, box, clipped in boxes:
            w = by_rank.get(int(rank))
            if w is not None:
                w.box, w.box_clipped, w.tiles = list(box), list(clipped), None
        u.sprite = sprite
        if lr.cell is None:
            lr.cell = list(cell)
        if lr.rf is None:
            lr.rf = list(rf)


def remove_progress(run_dir: str) -> None:
    """Drop every rank's progress files, top and bottom (``results.json`` holds their content now)."""
    for path in glob.glob(os.path.join(run_dir, PROGRESS_GLOB)) + glob.glob(os.path.join(run_dir, "projection-bottom.rank*.json")):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def plan_projection(ctx: Context, res: Results, progress: Optional[List[Entry]] = None) -> List[render.TileJob]:
    """The winners still to project (all of them after a rule change), in (layer, channel, rank)
    order, whole channels at a time; ``progress`` (:func:`read_progress`) fills in the channels
    any rank finished before a crash. Every rank computes the same list before any rank writes."""
    cfg = ctx.cfg
    if res.projection_hash != ctx.projection_hash:
        if res.projection_hash and ctx.info.is_main:
            log.info("projection rule changed (%s -> %s): re-projecting every unit", res.rule, cfg.rule)
        for lr in res.layers:
            for u in lr.units:
                u.sprite = None
                for w in u.winners:
                    w.box = w.box_clipped = w.tiles = None
        res.projection_hash, res.rule = ctx.projection_hash, cfg.rule
    if progress:
        apply_entries(res, progress)
    return [render.TileJob(lr.name, u.channel, w.rank, w.image, w.y, w.x, w.activation)
            for lr in res.layers for u in lr.units if not channel_done(ctx.run_dir, u) for w in u.winners]


def split_jobs(jobs: List[render.TileJob], info: DistInfo) -> List[render.TileJob]:
    """This rank's share of ``jobs``: whole (layer, channel) groups, dealt round-robin (so every
    rank gets channels of every layer, and the work of deep and shallow layers spreads evenly)."""
    if not info.enabled:
        return list(jobs)
    groups: Dict[Tuple[str, int], List[render.TileJob]] = {}
    for j in jobs:
        groups.setdefault((j.layer, j.channel), []).append(j)
    return [j for key in dist_mod.split_for_rank(list(groups), info) for j in groups[key]]


def project_chunk(ctx: Context) -> int:
    """Units per ``project_window`` call: ``project_batch``, or for 0/None (auto) as many as the
    largest receptive-field window of the mined layers allows within the output budget."""
    if ctx.cfg.project_batch:
        return int(ctx.cfg.project_batch)
    elem = torch.empty((), dtype=ctx.dtype).element_size()
    biggest = 1
    h, w = ctx.preprocess.crop
    for spec in ctx.specs:
        rh, rw = spec.rf_size or spec.input_size  # the tile's box, input pixels
        biggest = max(biggest, 3 * min(rh, h) * min(rw, w) * elem)
    budget = AUTO_PROJECT_BYTES.get(ctx.device.type, AUTO_PROJECT_BYTES_DEFAULT)
    return int(max(16, min(4096, budget // biggest)))


class _Progress:
    """This rank's finished channels (sprites on disk), written to its progress file."""

    def __init__(self, run_dir: str, info: DistInfo, projection_hash: str, prefix: str = "projection"):
        self.path = os.path.join(run_dir, progress_filename(info, prefix))
        self.projection_hash = projection_hash
        self.entries: List[Entry] = []
        self.lock = threading.Lock()
        self.last = time.monotonic()
        self.written = 0

    def add(self, entry: Entry) -> None:
        with self.lock:
            self.entries.append(entry)

    def save(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < SAVE_EVERY_S:
            return
        with self.lock:
            entries = list(self.entries)
        if entries and (force or len(entries) != self.written):
            write_text(self.path, json.dumps({"projection_hash": self.projection_hash, "channels": entries},
                                             separators=(",", ":")))
            self.written = len(entries)
        self.last = time.monotonic()


#: the suffix (+ process and thread id) of a staging file renamed aside for deletion
STAGING_TRASH = ".deleting-"


def _remove_files(paths: List[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


class _StagingFile(NamedTuple):
    """One layer's staging file, open."""

    fd: int
    rows: Dict[int, int]  # channel -> row
    path: str
    cell: Tuple[int, int]  # (h, w) of a tile, pixels
    mm: Any  # a mapping of the file, only for hole punching (never read or written); None without
    row_bytes: int


class _Staging:
    """The tiles of channels not yet complete, in one array file per layer
    (``tiles/<layer>/.staging.rank<r>.npy``, uint8 ``[channels, k, 2, h, w, 3]``, headerless): a
    channel completes when its last winner's image is forwarded; until then the page cache, not
    the process, holds its tiles (bounded memory on VGG-sized runs). Tiles go in with ``pwrite``
    and a complete channel comes out with one ``preadv`` (:meth:`put`, :meth:`read`: several times
    cheaper than writing through a shared mapping, whose first touch of each page is a fault and a
    filesystem call). Once read, a channel's rows are released (:meth:`release`: a hole punched in
    the file, so the kernel neither writes them back nor keeps them). Removed when the projection
    ends (:meth:`close`)."""

    def __init__(self, run_dir: str, rank: int, k: int):
        self.run_dir, self.rank, self.k = run_dir, rank, k
        self.layers: Dict[str, _StagingFile] = {}

    def slot(self, lr: LayerResult, channels: List[int]) -> Dict[int, int]:
        """Open (once) the file of ``lr``'s ``channels``; returns channel -> row."""
        if lr.name not in self.layers:
            h, w = (int(v) for v in lr.cell)  # type: ignore[union-attr]
            path = os.path.join(self.run_dir, "tiles", render.safe_name(lr.label), f".staging.rank{self.rank}.npy")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _remove_files(glob.glob(glob.escape(path + STAGING_TRASH) + "*"))  # left by a run killed while deleting
            row_bytes = self.k * 2 * h * w * 3
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            size = max(1, len(channels) * row_bytes)
            os.ftruncate(fd, size)
            mm = None
            if hasattr(mmap, "MADV_REMOVE"):
                with contextlib.suppress(OSError, ValueError):
                    mm = mmap.mmap(fd, size)
            self.layers[lr.name] = _StagingFile(fd, {c: i for i, c in enumerate(channels)}, path, (h, w), mm, row_bytes)
        return self.layers[lr.name].rows

    def put(self, layer: str, channel: int, rank: int, side: int, tile: np.ndarray) -> None:
        """Store ``tile`` (uint8 [h, w, 3], the layer's cell) as (``rank``, ``side``: 0 rec, 1 img)
        of ``channel``."""
        f = self.layers[layer]
        h, w = f.cell
        os.pwrite(f.fd, np.ascontiguousarray(tile, dtype=np.uint8), f.rows[channel] * f.row_bytes + (rank * 2 + side) * h * w * 3)

    def read(self, layer: str, channel: int) -> np.ndarray:
        """``channel``'s tiles, uint8 [k, 2, h, w, 3] (a copy; ranks never put read as zeros)."""
        f = self.layers[layer]
        out = np.empty((self.k, 2) + f.cell + (3,), dtype=np.uint8)
        got = os.preadv(f.fd, [out], f.rows[channel] * f.row_bytes)
        if got != f.row_bytes:
            raise OSError(f"staging file {f.path}: read {got} of {f.row_bytes} bytes")
        return out

    def release(self, layer: str, channel: int) -> None:
        """Drop the pages of ``channel``'s row (read; nothing reads it again): a hole punched in
        the file (``MADV_REMOVE`` on a mapping never touched; skipped where the filesystem cannot)."""
        f = self.layers.get(layer)
        if f is None or f.mm is None:
            return
        start = f.rows[channel] * f.row_bytes
        a, b = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + f.row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if b > a:
            with contextlib.suppress(OSError, ValueError):
                f.mm.madvise(mmap.MADV_REMOVE, a, b - a)

    def close(self) -> None:
        """Close the files and remove them: each is renamed aside at once (a later staging of the
        same layer never meets it) and deleted on a background thread, since unlinking a large
        file whose pages were written back takes the filesystem a while (seconds for AlexNet's
        layers); the process waits for the thread before it exits."""
        found = list(self.layers.values())
        self.layers.clear()
        aside = []
        for f in found:
            if f.mm is not None:
                f.mm.close()
            os.close(f.fd)
            trash = f"{f.path}{STAGING_TRASH}{os.getpid()}-{threading.get_ident()}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(f.path, trash)
                aside.append(trash)
        if aside:
            threading.Thread(target=_remove_files, args=(aside,), name="deconvis-staging", daemon=False).start()


@dataclass
class _LayerPages:
    """One layer's sheets while they are composed (:class:`_SheetPages`)."""

    layout: Optional[render.SheetLayout] = None  # set at the layer's first complete channel
    blocks: Dict[int, Dict[int, Any]] = field(default_factory=dict)  # open page -> {channel: block}
    written: Dict[int, str] = field(default_factory=dict)  # page -> sheet path


class _SheetPages:
    """Each layer's grid sheets, composed while the projection runs: as a channel's sprite is
    written its block (the tiles resized, :func:`deconvis.render.sheets.sheet_block`) is cut from
    the sprite in memory, and a page is rendered and written (atomically) once its channels are
    all there. Channels complete in the jobs' order (:func:`deconvis.render.projection.completion_order`),
    so few pages are open at a time, and the render phase neither reads the sprites back nor
    waits for the sheets. Only for layers whose every channel this call projects; :meth:`finish`
    records their sheets (with their hash, so the render phase finds them current); any other
    layer is rendered from the sprites by the render phase as before. Used by the writer thread."""

    def __init__(self, run_dir: str, res: Results, cfg: Any, expected: Dict[Tuple[str, int], int]):
        self.run_dir, self.res, self.cfg = run_dir, res, cfg
        self.n_images = res.images.get("readable", res.images.get("count"))
        self.per = max(1, int(cfg.per_sheet))
        self.layers: Dict[str, _LayerPages] = {lr.name: _LayerPages() for lr in res.layers
                                               if lr.units and all((lr.name, u.channel) in expected for u in lr.units)}
        self.page_of = {(lr.name, u.channel): i // self.per for lr in res.layers if lr.name in self.layers
                        for i, u in enumerate(lr.units)}

    def add(self, lr: LayerResult, u: ChannelResult, sprite: np.ndarray) -> None:
        """Channel ``u`` of ``lr`` is complete (``sprite``: its pixels): keep its block, write its
        page when the page is complete."""
        st = self.layers.get(lr.name)
        if st is None:
            return
        cfg, k = self.cfg, self.res.k
        if st.layout is None:  # the layer's RF is known once one of its channels completes
            st.layout = render.layer_layout(lr, k=k, per_sheet=self.per, columns=cfg.sheet_columns,
                                        min_tile=cfg.min_tile, max_tile=cfg.max_tile)
        p = self.page_of[(lr.name, u.channel)]
        blocks = st.blocks.setdefault(p, {})
        blocks[u.channel] = render.sheet_block(lr, u, self.run_dir, st.layout, sprite)
        chunk = render.page_units(lr, p, self.per)
        if len(blocks) < len(chunk):
            return
        del st.blocks[p]
        sheet = render.render_sheet([(c.channel, blocks[c.channel]) for c in chunk], st.layout,
                                    render.page_title(lr, p, render.page_count(lr, self.per), k, self.n_images,
                                                      self.per))
        rel = render.sheet_name(lr.label, p + 1, sheet_ext(self.cfg, lr))
        write_image(os.path.join(self.run_dir, rel), sheet)
        st.written[p] = rel

    def finish(self) -> None:
        """Record the sheets of every layer whose pages were all written (after the last
        :meth:`add`; the boxes of every winner are set)."""
        for lr in self.res.layers:
            st = self.layers.get(lr.name)
            pages = render.page_count(lr, self.per)
            if st is None or len(st.written) != pages:
                continue
            sheets = [st.written[p] for p in range(pages)]
            for old in set(lr.sheets) - set(sheets):  # pages of an earlier, longer layout
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.run_dir, old))
            lr.sheets, lr.sheets_hash = sheets, sheets_hash(self.res, lr, self.cfg)


def _write_sprite(run_dir: str, entry: Entry, tiles: Dict[int, sprites.Tile], k: int, progress: _Progress,
                  pages: Optional[_SheetPages] = None, unit: Optional[Tuple[LayerResult, ChannelResult]] = None) -> None:
    """Compose and write one channel's sprite (on the writer thread), then count it as done; with
    ``pages``, add the channel (``unit``: its layer and result) to its layer's sheets."""
    sheet = sprites.compose(tiles, k, entry[3])
    write_image(os.path.join(run_dir, entry[2]), sheet, durable=False)  # atomic; re-creatable
    progress.add(entry)
    if pages is not None and unit is not None:
        pages.add(unit[0], unit[1], sheet)


def project_phase(ctx: Context, res: Results, jobs: Optional[List[render.TileJob]] = None,
                  poll: Optional[Callable[[], None]] = None, replay: Optional[Any] = None,
                  prefix: str = "projection", defer: Optional[List[Callable[[], None]]] = None) -> int:
    """Project ``jobs`` (default: every winner not yet projected, see :func:`plan_projection`;
    whole channels), writing one sprite per channel and filling the boxes in ``res``; returns how
    many winners were projected. ``replay`` (a :class:`deconvis.render.projection.Replay`) receives
    the replay check. ``prefix``: this rank's progress file (``projection-bottom`` for the
    bottom-k, :mod:`deconvis.runs.phases.bottom`). ``defer`` (a list): once every unit is
    projected, the writing of the last sprites and sheets goes on on the writer thread and the
    call that waits for it (and then saves the progress and records the sheets) is appended to
    ``defer`` for the caller to make, instead of being waited for here (without ``defer``, or after
    an error, it is made here)."""
    cfg, info = ctx.cfg, ctx.info
    if jobs is None:
        jobs = plan_projection(ctx, res)
    if not jobs:
        return 0
    h, w_img = ctx.preprocess.crop
    index = _winners(res)
    units = _units(res)
    expected: Dict[Tuple[str, int], int] = {}
    for j in jobs:
        expected[(j.layer, j.channel)] = expected.get((j.layer, j.channel), 0) + 1
    pending: Dict[Tuple[str, int], List[int]] = {}  # ranks of a channel staged so far
    channels_of: Dict[str, List[int]] = {}
    for layer, c in expected:
        channels_of.setdefault(layer, []).append(c)
    staging = _Staging(ctx.run_dir, info.rank, res.k)
    progress = _Progress(ctx.run_dir, info, ctx.projection_hash, prefix)
    lossless = bool(getattr(cfg, "lossless", False))
    log.info("projecting %d units (rule %s)", len(jobs), cfg.rule)
    writer = BackgroundWriter(threads=1, max_pending=WRITER_PENDING)
    thumbs = BackgroundWriter(threads=1, max_pending=THUMBS_PENDING, name="deconvis-thumbs")
    # the sheets as the channels complete: one process, the top-k (the bottom-k has no sheets)
    pages = (_SheetPages(ctx.run_dir, res, cfg, expected)
             if SHEETS_WHILE_PROJECTING and prefix == "projection" and not info.enabled else None)

    def sink(job: render.TileJob, rec, img, box) -> None:
        lr, wnr = index[(job.layer, job.channel, job.rank)]
        clipped, _ = render.clip_box(box, h, w_img)
        wnr.box, wnr.box_clipped, wnr.tiles = list(box), list(clipped), None
        if lr.rf is None:
            lr.rf = [box[1] - box[0], box[3] - box[2]]
        if lr.cell is None:
            lr.cell = [int(rec.shape[0]), int(rec.shape[1])]
        key = (job.layer, job.channel)
        staging.slot(lr, channels_of[job.layer])
        ch, cw = lr.cell
        for side, t in enumerate((rec, img)):
            if t.shape[:2] != (ch, cw):  # never for one layer's boxes: keep the tile's top left, grey around
                cell = np.full((ch, cw, 3), sprites.GREY, dtype=np.uint8)
                th, tw = min(t.shape[0], ch), min(t.shape[1], cw)
                cell[:th, :tw] = t[:th, :tw]
                t = cell
            staging.put(job.layer, job.channel, job.rank, side, t)
        got = pending.setdefault(key, [])
        got.append(job.rank)
        if len(got) == expected[key]:
            del pending[key]
            row = staging.read(job.layer, job.channel)
            staging.release(job.layer, job.channel)
            got = {r: (row[r, 0], row[r, 1]) for r in got}
            u = units[key][1]
            u.sprite = sprites.sprite_path(render.safe_name(lr.label), job.channel, sprites.sprite_ext(lr.cell, lossless))
            entry: Entry = (lr.name, job.channel, u.sprite, list(lr.cell), list(lr.rf),
                            [(w.rank, w.box, w.box_clipped) for w in u.winners])
            writer.submit(_write_sprite, ctx.run_dir, entry, got, res.k, progress, pages, units[key])
        progress.save()
        if poll is not None:
            poll()

    def thumb(image: int, shown: np.ndarray) -> None:  # the unit pages' thumbnail, from the decode at hand
        if not os.path.isfile(os.path.join(ctx.run_dir, unit_pages.thumb_path(image))):
            thumbs.submit(unit_pages.write_thumb, ctx.run_dir, image, shown)

    def finish(ok: bool) -> None:
        """Wait for the sprite writer, record the sheets (``ok``: every unit projected), save the progress."""
        try:
            writer.close()
            if ok and pages is not None:
                pages.finish()
        finally:
            progress.save(force=True)  # what was written, even when the projection failed
            staging.close()

    ok = False
    try:
        # thumbnails all written at the end (a later pass finds them on disk), or after the
        # projection's error dropped (its error is the one to report): BackgroundWriter's exit
        with thumbs:
            n = projection.project_jobs(ctx.dn, ImageDataset(ctx.source, ctx.preprocess), jobs, rule=cfg.rule,
                                        batch_size=cfg.batch_size, project_batch=project_chunk(ctx),
                                        device=ctx.device, dtype=ctx.dtype, sink=sink,
                                        progress=cfg.progress and info.is_main,
                                        workers=precision.workers(cfg, info), replay=replay, on_image=thumb)
        ok = True
    finally:
        if not (ok and defer is not None):
            finish(ok)
    if defer is not None:
        defer.append(lambda: finish(True))
    return n


def projection_updates(res: Results, jobs: List[render.TileJob]) -> Dict[str, Any]:
    """What projecting ``jobs`` filled into ``res`` (finished channels), to send to the other ranks."""
    units = _units(res)
    entries: List[Entry] = []
    for key in dict.fromkeys((j.layer, j.channel) for j in jobs):
        lr, u = units[key]
        if u.sprite is not None:
            entries.append((lr.name, u.channel, u.sprite, list(lr.cell or []), list(lr.rf or []),
                            [(w.rank, w.box, w.box_clipped) for w in u.winners]))
    return {"channels": entries, "units": sum(len(units[(e[0], e[1])][1].winners) for e in entries)}


def apply_projection_updates(res: Results, updates: List[Dict[str, Any]]) -> None:
    """Fill every rank's :func:`projection_updates` into ``res``."""
    for upd in updates:
        apply_entries(res, upd["channels"])
