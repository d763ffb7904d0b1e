"""Pictures of training progress: first-layer filter grids and ZF Fig. 4 feature-evolution figures.

All functions are pure: tensors/arrays in, uint8 RGB arrays [H, W, 3] out (write them with
:func:`deconvis.io.atomic.write_png`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from deconvis.errors import DeconvisError
from deconvis.render.display import resize_tile, to_uint8
from deconvis.render.sheets import crop_padded

BACKGROUND = 255  # white paper between tiles


def filter_grid(conv_weight: Tensor, scale: int = 6, gap: int = 1, ncols: Optional[int] = None,
                shared: bool = False) -> np.ndarray:
    """First-layer filters [C_out, C_in, k_h, k_w] (C_in = 3 RGB or 1 grey) -> uint8 RGB grid.

    Each filter is shown as ZF Fig. 6 does: centred at zero and stretched so that its largest
    absolute weight reaches black or white (``shared``: one scale for all filters, so weak or
    dead filters look flat grey), upscaled ``scale`` times (nearest), ``gap`` white pixels
    between tiles, ``ncols`` tiles per row (default ceil(sqrt(C_out))).
    """
    w = conv_weight.detach().to(torch.float64).cpu()
    if w.dim() != 4 or w.shape[1] not in (1, 3):
        raise DeconvisError(f"filter_grid needs a first-layer conv weight [C_out, 1 or 3, k, k], "
                            f"got shape {list(w.shape)}")
    if scale < 1 or gap < 0:
        raise DeconvisError(f"filter_grid needs scale >= 1 and gap >= 0, got {scale}, {gap}")
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)
    mag = w.abs().flatten(1).amax(1)
    if shared:
        mag = mag.amax().expand_as(mag)
    mag = torch.where(mag > 0, mag, torch.ones_like(mag))
    tiles = (128.0 + 127.0 * w / mag.view(-1, 1, 1, 1)).round().clamp(0, 255).to(torch.uint8)
    tiles = tiles.permute(0, 2, 3, 1).numpy()  # [C, k, k, c]
    if tiles.shape[3] == 1:
        tiles = np.repeat(tiles, 3, axis=3)
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    return tile_grid(list(tiles), ncols or int(math.ceil(math.sqrt(len(tiles)))), gap=gap)


def tile_grid(tiles: Sequence[np.ndarray], ncols: int, gap: int = 1,
              background: int = BACKGROUND) -> np.ndarray:
    """Equal-size uint8 RGB tiles [h, w, 3] -> one grid image, row-major, ``gap`` px apart.

    Size: (rows*h + (rows-1)*gap) x (ncols*w + (ncols-1)*gap) with rows = ceil(len/ncols).
    """
    if not tiles:
        raise DeconvisError("tile_grid needs at least one tile")
    h, w = tiles[0].shape[:2]
    ncols = max(1, min(int(ncols), len(tiles)))
    rows = int(math.ceil(len(tiles) / ncols))
    out = np.full((rows * h + (rows - 1) * gap, ncols * w + (ncols - 1) * gap, 3), background, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = t
    return out


# ------------------------------------------------------------------ feature-evolution figure
GAP_INNER = 1    # px between a reconstruction tile and its patch
ROW_GAP = 2      # px between feature rows
COL_GAP = 6      # px between snapshot columns
HEADER_H = 16    # px of the column-label strip
TITLE_H = 16     # px of the title strip (when there is a title)
LABEL_W = 34     # px of the row-label strip (when there are row labels)


def rec_tiles(rec: Tensor, tile: int) -> np.ndarray:
    """Reconstructions [F, 3, rh, rw] (signed, input space) -> uint8 tiles [F, tile, tile, 3],
    each contrast-stretched on its own around zero (:func:`deconvis.render.display.to_uint8`)."""
    imgs = to_uint8(rec)
    return np.stack([resize_tile(im, tile, tile) for im in imgs]) if len(imgs) else np.zeros((0, tile, tile, 3), np.uint8)


def patch_tiles(images: Tensor, index: Tensor, boxes: Tensor, tile: int, stretch: bool = False,
                fired: Optional[Tensor] = None) -> np.ndarray:
    """Image patches under receptive-field boxes -> uint8 tiles [F, tile, tile, 3].

    ``images`` [n, 3, H, W] display values (in [0, 1] unless ``stretch``, which maps each patch's
    own min..max to 0..255); ``index`` [F] which image; ``boxes`` [F, 4] = (y0, y1, x0, x1)
    half-open, unclipped: the part outside the image is mid-grey. Features that did not fire
    (``fired`` False) get a plain grey tile.
    """
    hwc = images.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()  # [n, H, W, c]
    out = []
    for f in range(len(index)):
        if fired is not None and not bool(fired[f]):
            out.append(np.full((tile, tile, 3), 128, np.uint8))
            continue
        patch = crop_padded(hwc[int(index[f])], [int(v) for v in boxes[f]], fill=np.nan)
        inside = ~np.isnan(patch)
        if stretch and inside.any():
            lo, hi = patch[inside].min(), patch[inside].max()
            patch = (patch - lo) / (hi - lo if hi > lo else 1.0)
        patch = np.where(inside, np.clip(patch, 0, 1), 0.5)
        img = np.round(patch * 255.0).astype(np.uint8)
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        out.append(resize_tile(img, tile, tile))
    return np.stack(out) if out else np.zeros((0, tile, tile, 3), np.uint8)


def figure_size(n_rows: int, n_cols: int, tile: int, with_patches: bool = True, title: bool = True,
                row_labels: bool = True) -> Tuple[int, int]:
    """(height, width) in pixels of :func:`evolution_figure`:

    height = TITLE_H*[title] + HEADER_H + n_rows*tile + (n_rows-1)*ROW_GAP
    width  = LABEL_W*[row_labels] + n_cols*cell + (n_cols-1)*COL_GAP,
    cell = tile (+ GAP_INNER + tile with patches).
    """
    cell = tile + (GAP_INNER + tile if with_patches else 0)
    h = (TITLE_H if title else 0) + HEADER_H + n_rows * tile + (n_rows - 1) * ROW_GAP
    w = (LABEL_W if row_labels else 0) + n_cols * cell + (n_cols - 1) * COL_GAP
    return h, w


def _put_text(img: np.ndarray, text: str, x: int, y_base: int, max_w: int) -> None:
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    while scale > 0.2 and cv2.getTextSize(text, font, scale, 1)[0][0] > max_w:
        scale -= 0.05
    cv2.putText(img, text, (x, y_base), font, scale, (0, 0, 0), 1, cv2.LINE_AA)


def evolution_figure(rec_columns: Sequence[np.ndarray], patch_columns: Optional[Sequence[np.ndarray]],
                     col_labels: Sequence[str], row_labels: Optional[Sequence[str]] = None,
                     title: Optional[str] = None) -> np.ndarray:
    """ZF Fig. 4 layout: one row per feature, one column per snapshot.

    ``rec_columns``: per snapshot uint8 [F, t, t, 3] reconstruction tiles; ``patch_columns``
    (optional): the matching image patches, drawn right of each reconstruction. Column headers
    are ``col_labels`` (epoch numbers), rows are labelled ``row_labels`` (feature ids). Returns
    uint8 RGB of size :func:`figure_size`; the background is white.
    """
    if not rec_columns:
        raise DeconvisError("no snapshots to draw yet")
    if len(col_labels) != len(rec_columns):
        raise DeconvisError(f"{len(col_labels)} column labels for {len(rec_columns)} columns")
    n_rows, t = int(rec_columns[0].shape[0]), int(rec_columns[0].shape[1])
    for col in list(rec_columns) + list(patch_columns or []):
        if col.shape != (n_rows, t, t, 3):
            raise DeconvisError(f"tiles of shape {col.shape} do not match {(n_rows, t, t, 3)}")
    if row_labels is not None and len(row_labels) != n_rows:
        raise DeconvisError(f"{len(row_labels)} row labels for {n_rows} rows")
    with_p = patch_columns is not None
    if with_p and len(patch_columns) != len(rec_columns):  # type: ignore[arg-type]
        raise DeconvisError(f"{len(patch_columns)} patch columns for {len(rec_columns)} columns")  # type: ignore[arg-type]
    H, W = figure_size(n_rows, len(rec_columns), t, with_p, title is not None, row_labels is not None)
    img = np.full((H, W, 3), BACKGROUND, np.uint8)
    top = TITLE_H if title is not None else 0
    left = LABEL_W if row_labels is not None else 0
    cell = t + (GAP_INNER + t if with_p else 0)
    if title is not None:
        _put_text(img, title, 2, TITLE_H - 4, W - 4)
    for j, label in enumerate(col_labels):
        x = left + j * (cell + COL_GAP)
        _put_text(img, str(label), x + 2, top + HEADER_H - 4, cell - 2)
        for i in range(n_rows):
            y = top + HEADER_H + i * (t + ROW_GAP)
            img[y:y + t, x:x + t] = rec_columns[j][i]
            if with_p:
                img[y:y + t, x + t + GAP_INNER:x + cell] = patch_columns[j][i]  # type: ignore[index]
    if row_labels is not None:
        for i, label in enumerate(row_labels):
            y = top + HEADER_H + i * (t + ROW_GAP)
            _put_text(img, str(label), 2, y + t // 2 + 4, LABEL_W - 4)
    return img
