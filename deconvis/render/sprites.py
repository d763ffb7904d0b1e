"""Sprites: one image per channel holding its k tiles, so a layer is a few files, not 2k per channel.

A channel's sprite ``tiles/<layer>/c<channel:04d>.<png|jpg>`` is ``2 x k`` cells of the layer's
tile size ``[h, w]`` (``cell``, pixels: the receptive-field box of the layer's units):

* row 0: the reconstructions (``rec``), row 1: the image patches (``img``);
* column ``r``: the winner of rank ``r`` (0 = strongest).

So the tile (rank ``r``, row ``j``) is the half-open pixel box ``y in [j*h, (j+1)*h)``,
``x in [r*w, (r+1)*w)`` of the sprite (:func:`cut`); a cell without a winner (fewer than k) is
grey. ``results.json`` documents the same addressing (``sprites``) for the report and the unit
pages. Format (measured in BENCHMARKS.md, "output path"): PNG (lossless) for tiles under
:data:`SMALL_TILE` pixels, where JPEG's 8 px blocks would show once the sheets enlarge them; JPEG
(quality 92, 4:4:4: mean error about one level on image patches) for larger ones, 3x smaller
and 10x faster to encode than PNG; PNG everywhere with ``lossless``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from deconvis.io.images import GREY  # noqa: F401 - the fill of empty cells, re-exported
from deconvis.io.rgb import swap_red_blue

ROWS = ("rec", "img")
#: tiles whose longer side is below this many pixels are stored losslessly
SMALL_TILE = 32
#: the addressing, as ``results.json`` states it (``sprites``)
ADDRESSING = {
    "path": "tiles/<layer label>/c<channel, 4 digits>.<png|jpg> (per channel: layers[].units.sprite)",
    "rows": list(ROWS),
    "columns": "rank (0 = strongest)",
    "cell": "layers[].cell = [h, w] pixels; the tile of rank r in row j is y in [j*h, (j+1)*h), x in [r*w, (r+1)*w)",
}

Tile = Tuple[np.ndarray, np.ndarray]  # (rec, img), uint8 [h, w, 3] each


def sprite_ext(cell: Sequence[int], lossless: bool = False) -> str:
    """``png`` for small tiles or ``lossless``, else ``jpg``."""
    return "png" if lossless or max(int(cell[0]), int(cell[1])) < SMALL_TILE else "jpg"


def sprite_path(safe_label: str, channel: int, ext: str) -> str:
    """The sprite of ``channel``, relative to the run folder (``safe_label``: file-name safe)."""
    return f"tiles/{safe_label}/c{int(channel):04d}.{ext}"


def compose(tiles: Dict[int, Tile], k: int, cell: Sequence[int]) -> np.ndarray:
    """The sprite ``[2*h, k*w, 3]`` uint8 of ``tiles`` (rank -> (rec, img)); a tile smaller than the
    cell sits at its top left, grey around it (never happens for one layer's boxes)."""
    h, w = int(cell[0]), int(cell[1])
    out = np.full((2 * h, k * w, 3), GREY, dtype=np.uint8)
    for r, pair in tiles.items():
        for j, t in enumerate(pair):
            th, tw = min(h, t.shape[0]), min(w, t.shape[1])
            out[j * h:j * h + th, r * w:r * w + tw] = t[:th, :tw]
    return out


def cut(sprite: np.ndarray, rank: int, row: int, cell: Sequence[int]) -> np.ndarray:
    """The tile of ``rank`` in ``row`` (0: rec, 1: img) of a sprite, a view ``[h, w, 3]``."""
    h, w = int(cell[0]), int(cell[1])
    return sprite[row * h:(row + 1) * h, rank * w:(rank + 1) * w]


def read_rgb(path: str) -> Optional[np.ndarray]:
    """An image file (PNG or JPEG) as uint8 RGB, or None if missing/unreadable."""
    import cv2  # start-up time: OpenCV loads only when an image is read

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    return None if img is None else swap_red_blue(img)
