"""Projection of the winners, their patches, and ZF Fig. 2 style grid sheets.

For every winning unit (layer, channel, image, y, x) the image is forwarded again (batched) and
the unit projected down to pixel space with ``DeconvNet.project_window``
(:mod:`deconvis.render.projection`), which returns the
reconstruction on the unit's receptive-field box only and that box (half-open, unclipped, in
displayed-image pixels). Two tiles are cut on that same box:

* ``rec``: the reconstruction (zero outside the image), as uint8 via
  :func:`deconvis.render.display.to_uint8` (per-tile contrast stretch around zero: zero shows grey);
* ``img``: the displayed (preprocessed, un-normalised) image, neutral grey outside the image.

A channel's tiles are saved as one sprite (``tiles/<layer>/c<channel>.<png|jpg>``, channel 4
digits; column = rank, 0 = strongest; row 0 reconstructions, row 1 patches: :mod:`deconvis.render.sprites`)
and the sheets are composed from those files (one decode per channel, on a few threads), so
``--render-only`` needs neither the model nor the images. Runs of version 1 kept two files per
winner (``c<channel>_<rank>_{rec,img}.png``); they still render. Sheets are JPEG (quality 92,
4:4:4: 3x smaller and 10x faster to encode than PNG on these photographic grids), PNG with
``lossless`` and where the sheets enlarge small tiles 3x or more (:func:`sheet_format`). A sheet
holds ``per_sheet`` channels; each channel is a block of k reconstructions (left) beside its k
patches (right), labelled with the channel and each tile's activation.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from deconvis.graph.rf_geometry import clip_box as _clip_box
from deconvis.io.atomic import write_image
from deconvis.render import sprites
from deconvis.render.display import resize_tile
from deconvis.io.images import GREY

Box = Tuple[int, int, int, int]


# ---------------------------------------------------------------------------------------------
# geometry helpers (pure)

def clip_box(box: Sequence[int], h: int, w: int) -> Tuple[Box, Tuple[int, int, int, int]]:
    """Clip a half-open box ``(y0, y1, x0, x1)`` to an ``h x w`` image: ``(clipped box, pad)`` with
    ``pad = (top, bottom, left, right)`` pixels of the box outside the image (the geometry's
    :func:`deconvis.graph.rf.clip_box`, with the image size as two ints)."""
    y0, y1, x0, x1 = (int(v) for v in box)
    return _clip_box((y0, y1, x0, x1), (int(h), int(w)))


def crop_padded(img: np.ndarray, box: Sequence[int], fill: float = GREY) -> np.ndarray:
    """The ``(y1-y0) x (x1-x0)`` crop of ``img`` ``[H, W, C]`` at a half-open box that may run
    past the image; the outside is ``fill``."""
    y0, y1, x0, x1 = (int(v) for v in box)
    h, w = img.shape[:2]
    out = np.full((y1 - y0, x1 - x0) + img.shape[2:], fill, dtype=img.dtype)
    (cy0, cy1, cx0, cx1), _ = clip_box(box, h, w)
    if cy1 > cy0 and cx1 > cx0:
        out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = img[cy0:cy1, cx0:cx1]
    return out


def safe_name(label: str) -> str:
    """A file-name-safe version of a layer label (``features.1`` stays, ``a/b#2`` -> ``a_b_2``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def tile_paths(label: str, channel: int, rank: int) -> Dict[str, str]:
    """Relative paths (to the run folder) of a unit's two tiles in a version-1 run (one file each)."""
    base = f"tiles/{safe_name(label)}/c{channel:04d}_{rank}"
    return {"rec": f"{base}_rec.png", "img": f"{base}_img.png"}


# ---------------------------------------------------------------------------------------------
# projection of the winners

@dataclass(frozen=True)
class TileJob:
    """One winner to project: unit (channel, y, x) of ``layer`` in global image ``image``."""

    layer: str
    channel: int
    rank: int
    image: int
    y: int
    x: int
    activation: Optional[float] = None  # the mined value, for the replay check (None: not checked)


TileSink = Callable[[TileJob, np.ndarray, np.ndarray, Box], None]


# ---------------------------------------------------------------------------------------------
# sheets

read_rgb = sprites.read_rgb  # an image file as uint8 RGB, or None

#: :func:`sheet_block` resizes a channel's whole sprite in one call (the same pixels as tile by
#: tile: each tile covers a whole number of output pixels) rather than each of its 2k tiles
WHOLE_SPRITE_RESIZE = True


def load_tile(run_dir: str, layer, unit, winner, kind: str) -> Optional[np.ndarray]:
    """One saved tile, uint8 RGB ``[h, w, 3]``: ``kind`` ``rec`` or ``img`` of ``winner`` (a
    ``Winner`` of ``unit``, a ``ChannelResult`` of ``layer``), cut from the channel's sprite (or
    read from its own file in a version-1 run); None when it has no tiles."""
    cell = getattr(layer, "cell", None) or layer.rf
    if unit.sprite:
        sprite = read_rgb(os.path.join(run_dir, unit.sprite))
        return None if sprite is None or not cell else sprites.cut(sprite, winner.rank, sprites.ROWS.index(kind), cell)
    return read_rgb(os.path.join(run_dir, winner.tiles[kind])) if winner.tiles else None


def channel_tiles(unit, run_dir: str, k: int, cell: Optional[Sequence[int]], sprite: Optional[np.ndarray] = None
                  ) -> List[Optional[Tuple[np.ndarray, np.ndarray, float]]]:
    """``[(rec, img, activation) or None]`` per winner of ``unit`` (a ``ChannelResult``), read
    from its sprite (one decode; ``sprite``: the sprite's pixels already in memory) or, for a
    version-1 run, from its two files per winner; None for a winner without tiles (not
    projected, or its file is missing)."""
    if sprite is None and unit.sprite:
        sprite = read_rgb(os.path.join(run_dir, unit.sprite))
    out: List[Optional[Tuple[np.ndarray, np.ndarray, float]]] = []
    for w in unit.winners:
        rec = img = None
        if sprite is not None and cell and w.box is not None and w.rank < k:
            rec, img = sprites.cut(sprite, w.rank, 0, cell), sprites.cut(sprite, w.rank, 1, cell)
        elif w.tiles:
            rec = read_rgb(os.path.join(run_dir, w.tiles["rec"]))
            img = read_rgb(os.path.join(run_dir, w.tiles["img"]))
        out.append((rec, img, w.activation) if rec is not None and img is not None else None)
    return out


def tile_scale(rh: int, rw: int, min_tile: int, max_tile: int) -> Tuple[int, int, int]:
    """Displayed tile size ``(th, tw)`` for an ``rh x rw`` patch and the OpenCV interpolation:
    integer nearest-neighbour upscaling until the long side reaches ``min_tile``, area
    downscaling when it exceeds ``max_tile``."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    side = max(rh, rw)
    if side < min_tile:
        f = math.ceil(min_tile / side)
        return rh * f, rw * f, cv2.INTER_NEAREST
    if side > max_tile:
        s = max_tile / side
        return max(1, round(rh * s)), max(1, round(rw * s)), cv2.INTER_AREA
    return rh, rw, cv2.INTER_NEAREST


#: sheets whose tiles are enlarged (nearest neighbour, :func:`tile_scale`) this many times or more
#: are PNG: blocks of equal pixels cost PNG little and JPEG much (AlexNet's conv1 sheets, 11 px
#: tiles shown 6x: PNG is lossless at about a seventh of the JPEG bytes; BENCHMARKS.md, "image formats")
PNG_FROM_ENLARGEMENT = 3


def sheet_format(rf: Optional[Sequence[int]], min_tile: int, max_tile: int, lossless: bool = False) -> str:
    """The format of the sheets of a layer whose tiles are ``rf`` ``[h, w]`` pixels: ``png`` with
    ``lossless`` or where the sheets enlarge the tiles at least :data:`PNG_FROM_ENLARGEMENT` times,
    else ``jpg`` (also while ``rf`` is unknown, None)."""
    if lossless:
        return "png"
    if not rf:
        return "jpg"
    rh, rw = int(rf[0]), int(rf[1])
    th, _, _ = tile_scale(rh, rw, min_tile, max_tile)  # enlarged: both sides by the same integer factor
    return "png" if th // rh >= PNG_FROM_ENLARGEMENT else "jpg"


_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX


def _text(img: np.ndarray, text: str, x: int, y: int, scale: float, color=(0, 0, 0), thick: int = 1) -> None:
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    cv2.putText(img, text, (x, y), _FONT, scale, color, thick, cv2.LINE_AA)


def _fit_text(text: str, width: int, scale: float) -> str:
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    while text and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > width:
        text = text[:-1]
    return text


def fmt_act(v: float) -> str:
    """Activation label: 3 significant digits."""
    return f"{v:.3g}"


@dataclass
class SheetLayout:
    k: int
    th: int
    tw: int
    per_sheet: int
    columns: int
    gap: int = 2          # between tiles
    mid: int = 10         # between the reconstruction and the patch grid
    head_h: int = 18      # channel label above each block
    margin: int = 12      # around and between blocks
    title_h: int = 30

    @property
    def font(self) -> float:
        """Activation label font scale: readable under small tiles, larger under large ones."""
        return min(0.55, max(0.35, self.tw / 230))

    @property
    def label_h(self) -> int:
        """Height of the activation label row under each tile."""
        return int(round(26 * self.font)) + 4

    @property
    def gcols(self) -> int:
        return math.ceil(math.sqrt(self.k))

    @property
    def grows(self) -> int:
        return math.ceil(self.k / self.gcols)

    @property
    def grid_w(self) -> int:
        return self.gcols * (self.tw + self.gap) - self.gap

    @property
    def block_w(self) -> int:
        return 2 * self.grid_w + self.mid

    @property
    def block_h(self) -> int:
        return self.head_h + self.grows * (self.th + self.label_h + self.gap)

    def sheet_size(self, n_channels: int) -> Tuple[int, int]:
        cols = min(self.columns, max(1, n_channels))
        rows = math.ceil(n_channels / cols)
        width = max(cols * (self.block_w + self.margin) + self.margin, 420)
        return self.title_h + rows * (self.block_h + self.margin) + self.margin, width


def render_sheet(
    channels: Sequence[Tuple[int, Sequence[Optional[Tuple[np.ndarray, np.ndarray, float]]]]],
    layout: SheetLayout,
    title: str,
) -> np.ndarray:
    """One sheet (uint8 RGB). ``channels``: per channel ``(index, [k x (rec, img, activation) or
    None])`` with tiles of any size (resized to ``layout.th x layout.tw``)."""
    h, w = layout.sheet_size(len(channels))
    sheet = np.full((h, w, 3), 250, dtype=np.uint8)
    _text(sheet, _fit_text(title, w - 2 * layout.margin, 0.55), layout.margin, 21, 0.55, (20, 20, 20), 1)
    cols = min(layout.columns, max(1, len(channels)))
    for n, (ch, tiles) in enumerate(channels):
        by = layout.title_h + (n // cols) * (layout.block_h + layout.margin)
        bx = layout.margin + (n % cols) * (layout.block_w + layout.margin)
        best = next((t[2] for t in tiles if t is not None), None)
        inactive = best is not None and best <= 0  # a rectified unit that never fired: winners are arbitrary
        head = _fit_text(f"ch {ch}" + ("  inactive (max <= 0 on every image)" if inactive else ""),
                         layout.block_w, 0.45)
        _text(sheet, head, bx, by + 13, 0.45, (150, 0, 0) if inactive else (0, 0, 120), 1)
        for r in range(layout.k):
            gy, gx = divmod(r, layout.gcols)
            y = by + layout.head_h + gy * (layout.th + layout.label_h + layout.gap)
            for side in (0, 1):
                x = bx + side * (layout.grid_w + layout.mid) + gx * (layout.tw + layout.gap)
                item = tiles[r] if r < len(tiles) else None
                if item is None:
                    sheet[y:y + layout.th, x:x + layout.tw] = 215
                    continue
                sheet[y:y + layout.th, x:x + layout.tw] = resize_tile(item[side], layout.th, layout.tw)
                if side == 0 or layout.k == 1:
                    label = _fit_text(fmt_act(item[2]), layout.tw, layout.font)
                    _text(sheet, label, x + 1, y + layout.th + layout.label_h - 4, layout.font, (60, 60, 60), 1)
    return sheet


def sheet_name(label: str, page: int, ext: str = "jpg") -> str:
    """``layer_<label>_pNNN.<ext>`` (page from 1)."""
    return f"layer_{safe_name(label)}_p{page:03d}.{ext}"


def render_layer(
    layer,  # results.LayerResult
    run_dir: str,
    *,
    k: int,
    per_sheet: int = 16,
    columns: int = 4,
    min_tile: int = 64,
    max_tile: int = 96,
    n_images: Optional[int] = None,
    ext: str = "jpg",
    threads: int = 2,
) -> List[str]:
    """Compose ``layer``'s sheets from its saved sprites (read on ``threads`` threads: OpenCV's
    decoders release the GIL); write them atomically into ``run_dir`` as ``ext`` (jpg or png).

    Returns the sheet paths relative to ``run_dir``. Units without tiles show as empty cells.
    """
    layout = layer_layout(layer, k=k, per_sheet=per_sheet, columns=columns, min_tile=min_tile, max_tile=max_tile)
    pages = page_count(layer, per_sheet)
    written: List[str] = []
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="deconvis-sheets") as pool:
        writes = []
        for p in range(pages):
            chunk = page_units(layer, p, per_sheet)
            blocks = list(zip((u.channel for u in chunk), pool.map(lambda u: sheet_block(layer, u, run_dir, layout), chunk)))
            sheet = render_sheet(blocks, layout, page_title(layer, p, pages, k, n_images, per_sheet))
            rel = sheet_name(layer.label, p + 1, ext)
            writes.append(pool.submit(write_image, os.path.join(run_dir, rel), sheet))
            written.append(rel)
        for f in writes:
            f.result()
    return written


def layer_layout(layer, *, k: int, per_sheet: int, columns: int, min_tile: int, max_tile: int) -> SheetLayout:
    """The sheet layout of ``layer`` (a ``LayerResult``): its tiles scaled by :func:`tile_scale`."""
    rf = layer.rf or [1, 1]
    th, tw, _ = tile_scale(int(rf[0]), int(rf[1]), min_tile, max_tile)
    return SheetLayout(k=k, th=th, tw=tw, per_sheet=per_sheet, columns=columns)


def sheet_block(layer, unit, run_dir: str, layout: SheetLayout, sprite: Optional[np.ndarray] = None
                ) -> List[Optional[Tuple[np.ndarray, np.ndarray, float]]]:
    """One channel's block of a sheet: its tiles (:func:`channel_tiles`; ``sprite``: its pixels
    already in memory) resized to the layout's tile size."""
    cell = getattr(layer, "cell", None) or layer.rf or [1, 1]
    th, tw = layout.th, layout.tw
    k = layout.k
    if sprite is None and unit.sprite:
        sprite = read_rgb(os.path.join(run_dir, unit.sprite))
    tiles = channel_tiles(unit, run_dir, k, cell, sprite)

    def own(t):  # a tile pair resized on its own
        return None if t is None else (resize_tile(t[0], th, tw), resize_tile(t[1], th, tw), t[2])

    ch, cw = int(cell[0]), int(cell[1])
    if WHOLE_SPRITE_RESIZE and sprite is not None and sprite.shape[:2] == (2 * ch, k * cw) and (th, tw) != (ch, cw):
        # one resize of the whole sprite: every tile maps onto exactly th x tw output pixels, so no
        # output pixel straddles two tiles and the cut equals the tile's own resize (3x faster)
        small = resize_tile(sprite, 2 * th, k * tw)
        return [(sprites.cut(small, w.rank, 0, (th, tw)), sprites.cut(small, w.rank, 1, (th, tw)), t[2])
                if t is not None and w.rank < k else own(t)  # (a winner past k: tiles from files, version-1 runs)
                for w, t in zip(unit.winners, tiles)]
    return [own(t) for t in tiles]


def page_count(layer, per_sheet: int) -> int:
    """How many sheets ``layer``'s channels fill, ``per_sheet`` each (at least one)."""
    return max(1, math.ceil(len(layer.units) / per_sheet))


def page_units(layer, p: int, per_sheet: int) -> list:
    """The channels (``ChannelResult``) of page ``p`` (from 0) of ``layer``'s sheets."""
    return layer.units[p * per_sheet:(p + 1) * per_sheet]


def page_title(layer, p: int, pages: int, k: int, n_images: Optional[int], per_sheet: int) -> str:
    """The title of page ``p`` (from 0) of ``pages`` of ``layer``'s sheets, ``per_sheet`` channels each."""
    rf = layer.rf or [1, 1]
    chunk = page_units(layer, p, per_sheet)
    lo = chunk[0].channel if chunk else 0
    hi = chunk[-1].channel if chunk else 0
    over = f" over {n_images} images" if n_images is not None else ""
    name_part = layer.label if layer.label == layer.name else f"{layer.label} ({layer.name})"
    return (f"{name_part}  channels {lo}-{hi}  page {p + 1}/{pages}  top-{k}{over}  "
            f"RF {rf[0]}x{rf[1]}px   left: reconstructions, right: image patches")
