"""A page per channel of every mined layer: ``units/<layer>/<channel>.html`` in the run folder.

Each page (template ``unit.html``, on the shared ``base.html``) shows the channel's top-k as in
the report (the projection beside the RF crop, windows onto the channel's sprite), each winner's
full displayed image as a thumbnail with its RF box drawn, the distribution of the channel's
maximum over the whole image set (the histogram collected while mining,
:mod:`deconvis.mining.unitstats`), its firing share, and the most correlated channels of the
same layer (links to their pages); its bottom-k (the most negative pre-activations, projected the
same way: :mod:`deconvis.runs.phases.bottom`, partial ``unit_bottom.html``) and, for a labelled
image set, the classes with the highest mean maximum (:mod:`deconvis.mining.classmeans`). Pages are small and written without fsync (4224 for VGG16);
every link is relative, so the run folder can be moved or served as it is; the pages share one
stylesheet, ``units/unit.css``.
"""
from __future__ import annotations

import base64
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from deconvis.io.atomic import encode_image, write_bytes, write_image, write_text
from deconvis.io.images import ImageSource
from deconvis.io.pixels import UnreadableImage, preprocess_image
from deconvis.render.pages import environment
from deconvis.render.sheets import safe_name
from deconvis.runs.results import LayerResult, Results, bottom_k

log = logging.getLogger("deconvis")

#: the folder of the unit pages, relative to the run folder
UNITS_DIR = "units"
#: thumbnails of the winners' full displayed images: ``units/thumbs/<image id>.jpg``
THUMBS_DIR = "units/thumbs"
#: the longer side of a thumbnail, pixels
THUMB_PX = 160
#: the longer side of a tile on a unit page, CSS pixels
UNIT_TILE_PX = 112
#: the unit pages' one stylesheet (template ``unit.css``), linked by every page instead of inlined
#: in each (a third of a page's bytes)
UNIT_CSS = f"{UNITS_DIR}/unit.css"


def unit_page(label: str, channel: int) -> str:
    """The page of ``channel`` of the layer labelled ``label``, relative to the run folder."""
    return f"{UNITS_DIR}/{safe_name(label)}/{int(channel):04d}.html"


def thumb_path(image: int) -> str:
    """The thumbnail of image ``image``, relative to the run folder."""
    return f"{THUMBS_DIR}/{int(image)}.jpg"


def write_thumb(run_dir: str, image: int, shown: np.ndarray) -> None:
    """Write the thumbnail of image ``image`` from its displayed pixels ``shown`` (uint8 RGB
    ``[h, w, 3]``): area-downscaled to the longer side :data:`THUMB_PX`. The projection writes them
    on its writer thread as it decodes the winners' images (so the report need not decode them
    again); :func:`write_thumbs` writes those still missing."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    h, w = shown.shape[:2]
    s = THUMB_PX / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    write_image(os.path.join(run_dir, thumb_path(image)), cv2.resize(shown, size, interpolation=cv2.INTER_AREA),
                durable=False)


def write_thumbs(res: Results, run_dir: str, source: Optional[ImageSource]) -> Dict[int, str]:
    """A thumbnail (:func:`write_thumb`) of every winning image's displayed image (resize + centre
    crop of the run): ``{image id: path relative to the run folder}``. Reuses thumbnails on disk;
    without ``source`` only those (a re-render)."""
    out: Dict[int, str] = {}
    ids = sorted({w.image for lr in res.layers for layer in (lr, lr.bottom) if layer is not None
                  for u in layer.units for w in u.winners})
    for i in ids:
        rel = thumb_path(i)
        if not os.path.isfile(os.path.join(run_dir, rel)):
            if source is None:
                continue
            try:
                shown = preprocess_image(source.load(i), res.preprocess)
            except (UnreadableImage, OSError) as exc:
                log.warning("no thumbnail for image %d: %s", i, exc)
                continue
            write_thumb(run_dir, i, shown)
        out[i] = rel
    return out


def first_layer_filters(model: Any, specs: Sequence[Any]) -> Dict[str, np.ndarray]:
    """The filters of the network's first convolution (on the 3 input colours) as images, for the
    mined layers that are that convolution or its rectification (same channels, receptive field =
    kernel): ``{layer name: uint8 RGB [C, kh, kw, 3]}``, each filter stretched symmetrically about
    zero (grey = 0). Empty when no layer is."""
    import torch

    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        return {}
    w = conv.weight.detach().float().cpu()  # [C, 3, kh, kw]
    out: Dict[str, np.ndarray] = {}
    for s in specs:
        if s.channels_total == w.shape[0] and s.rf_size is not None and tuple(s.rf_size) == tuple(w.shape[2:]):
            scale = w.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None, None]
            img = (w / scale * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
            out[s.name] = img.permute(0, 2, 3, 1).numpy()[: s.channels]
    return out


def _png_data_uri(rgb: np.ndarray) -> str:
    """A small uint8 RGB image as a ``data:image/png`` URI."""
    return "data:image/png;base64," + base64.b64encode(encode_image(rgb, ".png")).decode("ascii")


def _histogram(stats: Dict[str, Any], c: int) -> Dict[str, Any]:
    """SVG bars of channel ``c``'s histogram (300 units wide, bar height 60 * log(1 + count) / log(1 + max count))."""
    first, counts = stats["hist"][c]
    edges = stats["edges"]
    if not counts:
        return {"bars": [], "lo": None, "hi": None, "n": 0}
    top = max(counts)
    n = len(counts)
    bars = []
    for j, cnt in enumerate(counts):
        b = first + j
        lo = edges[b - 1] if b > 0 else -math.inf
        hi = edges[b] if b < len(edges) else math.inf
        h = 60.0 * math.log1p(cnt) / math.log1p(top)  # log scale: a few images still show
        bars.append({"x": 300.0 * j / n, "w": 300.0 / n, "y": 60.0 - h, "h": h, "count": cnt,
                     "range": f"[{lo:.3g}, {hi:.3g})"})
    lo = edges[first - 1] if first > 0 else -math.inf
    hi = edges[first + n - 1] if first + n - 1 < len(edges) else math.inf
    return {"bars": bars, "lo": f"{lo:.3g}", "hi": f"{hi:.3g}", "n": sum(counts)}


def _tile_style(cell: List[int], rank: int, row: int, side: int) -> Dict[str, str]:
    """CSS of one sprite window: the box and the image offset (cell ``[h, w]``, rank's column)."""
    h, w = cell
    s = side / max(h, w)
    return {"box": f"width:{round(w * s)}px;height:{round(h * s)}px",
            "img": f"margin-left:{-rank * w * s:.2f}px;margin-top:{-row * h * s:.2f}px"}


def _extras_context(res: Results, lr: LayerResult, ci: int) -> Dict[str, Any]:
    """The unit's optional extras (``unit_extras`` of the results, :mod:`deconvis.runs.phases.extras`):
    its RF + ERF image, its figure across checkpoints, its feature visualisation; None where absent."""
    up = "../../"
    ex = lr.unit_extras or {}
    out: Dict[str, Any] = {"erf": None, "evolution": None, "featvis": None}
    erf = ex.get("erf")
    if erf and ci < len(erf) and erf[ci]:
        mass = (ex.get("erf_mass95") or [None] * len(erf))[ci]
        out["erf"] = {"src": up + erf[ci], "mass95": None if mass is None else f"{100 * mass:.1f}"}
    evo = ex.get("evolution")
    meta = res.unit_extras.get("evolution") or {}
    if isinstance(evo, dict) and ci < len(evo.get("file", [])) and evo["file"][ci]:
        cps = meta.get("checkpoints", [])
        out["evolution"] = {"src": up + evo["file"][ci], "images": meta.get("images"),
                            "columns": [{"label": c.get("label"), "weights": os.path.basename(str(c.get("weights"))),
                                         "value": f"{v:.4g}" if v is not None else "", "image": i}
                                        for c, v, i in zip(cps, evo["value"][ci], evo["image"][ci])]}
    fv = ex.get("featvis")
    if fv and ci < len(fv) and fv[ci]:
        fmeta = res.unit_extras.get("featvis") or {}
        score = (ex.get("featvis_objective") or [None] * len(fv))[ci]
        out["featvis"] = {"src": up + fv[ci], "steps": fmeta.get("steps"),
                          "objective": None if score is None else f"{score:.4g}"}
    return out


def _winner_views(res: Results, lr: LayerResult, ci: int, k: int, thumbs: Dict[int, str]) -> List[Dict[str, Any]]:
    """What the page shows of each winner of channel ``ci`` of ``lr`` (a layer or its bottom-k,
    whose sprites hold ``k`` columns): the sprite windows, the thumbnail and its RF box."""
    u = lr.units[ci]
    up = "../../"
    winners = []
    for w in u.winners:
        d: Dict[str, Any] = {"rank": w.rank + 1, "activation": f"{w.activation:.4g}", "image": w.image,
                             "source": w.source, "y": w.y, "x": w.x, "box": w.box, "sprite": None, "thumb": None}
        if u.sprite and lr.cell and w.box is not None:
            h, wd = lr.cell
            s = UNIT_TILE_PX / max(h, wd)
            d["sprite"] = up + u.sprite
            d["sprite_size"] = f"width:{k * wd * s:.2f}px;height:{2 * h * s:.2f}px"
            d["rec"] = _tile_style(lr.cell, w.rank, 0, UNIT_TILE_PX)
            d["img"] = _tile_style(lr.cell, w.rank, 1, UNIT_TILE_PX)
        elif w.tiles:  # a version-1 run: one file per tile
            d["rec_file"], d["img_file"] = up + w.tiles["rec"], up + w.tiles["img"]
        if w.image in thumbs:
            d["thumb"] = up + thumbs[w.image]
            H, W = res.input_size
            bc = w.box_clipped
            if bc is not None:
                d["thumb_box"] = (f"top:{100 * bc[0] / H:.2f}%;height:{100 * (bc[1] - bc[0]) / H:.2f}%;"
                                  f"left:{100 * bc[2] / W:.2f}%;width:{100 * (bc[3] - bc[2]) / W:.2f}%")
        winners.append(d)
    return winners


def _bottom_context(res: Results, lr: LayerResult, ci: int, thumbs: Dict[int, str]) -> Optional[Dict[str, Any]]:
    """The unit's bottom-k (:mod:`deconvis.runs.phases.bottom`): the most negative responses of its
    pre-activation row, shown like the top-k; None when the layer has none."""
    low = lr.bottom
    if low is None or ci >= len(low.units):
        return None
    k = bottom_k(res)
    return {"k": k, "node": low.name, "own": low.name == lr.name, "winners": _winner_views(res, low, ci, k, thumbs)}


def _classes_context(res: Results, lr: LayerResult, ci: int) -> Optional[List[Dict[str, Any]]]:
    """The classes with the highest mean maximum of the channel (labelled image sets,
    :mod:`deconvis.mining.classmeans`): ``[{name, mean, images}]`` best first; None without labels."""
    names = (res.images or {}).get("classes")
    if not names or lr.class_means is None or ci >= len(lr.class_means):
        return None
    return [{"name": names[j] if 0 <= j < len(names) else str(j), "mean": "n/a" if m is None else f"{m:.4g}",
             "images": int(n)} for j, m, n in ((int(r[0]), r[1], r[2]) for r in lr.class_means[ci])]


def _page_context(res: Results, li: int, lr: LayerResult, ci: int, thumbs: Dict[int, str],
                  filters: Optional[np.ndarray] = None) -> Dict[str, Any]:
    u = lr.units[ci]
    up = "../../"
    k = res.k
    winners = _winner_views(res, lr, ci, k, thumbs)
    st = lr.unit_stats
    stats = None
    if st is not None and ci < len(st.get("hist", [])):
        corr = [{"channel": lr.units[j].channel if j < len(lr.units) else j, "r": f"{r:+.3f}",
                 "href": up + unit_page(lr.label, lr.units[j].channel if j < len(lr.units) else j)}
                for j, r in st["correlated"][ci]]
        fired = st["fired"][ci]
        mean = st["mean"][ci]
        stats = {"images": st["images"], "fired": None if fired is None else f"{100 * fired:.1f}",
                 "mean": None if mean is None else f"{mean:.4g}", "hist": _histogram(st, ci), "correlated": corr}
    chans = [x.channel for x in lr.units]
    prev_c = chans[ci - 1] if ci > 0 else None
    next_c = chans[ci + 1] if ci + 1 < len(chans) else None
    return {
        "title": f"deconvis: {res.config.get('run', '')} {lr.label} channel {u.channel}", "tile_px": UNIT_TILE_PX,
        "css": os.path.basename(UNIT_CSS),
        "label": lr.label, "name": lr.name, "channel": u.channel, "k": k, "rf": lr.rf, "map_size": lr.map_size,
        "report": up + "index.html#" + lr.label, "winners": winners, "stats": stats, "rule": str(getattr(res.rule, "value", res.rule)),
        "prev": None if prev_c is None else f"{prev_c:04d}.html", "next": None if next_c is None else f"{next_c:04d}.html",
        "prev_c": prev_c, "next_c": next_c,
        "filter": _png_data_uri(filters[ci]) if filters is not None and ci < len(filters) else None,
        "filter_size": None if filters is None else list(filters.shape[1:3]), "model": str(res.model.get("spec")), "dead": bool(u.winners) and u.winners[0].activation <= 0,
        "bottom": _bottom_context(res, lr, ci, thumbs), "classes": _classes_context(res, lr, ci),
        "extras": _extras_context(res, lr, ci),
    }


def write_unit_pages(res: Results, run_dir: str, source: Optional[ImageSource] = None,
                     filters: Optional[Dict[str, np.ndarray]] = None) -> int:
    """Write every channel's page (and the winners' thumbnails); ``filters`` (from
    :func:`first_layer_filters`) adds the layer-1 filter to those layers' pages. Returns the
    number of pages."""
    thumbs = write_thumbs(res, run_dir, source)
    write_text(os.path.join(run_dir, UNIT_CSS), environment().get_template("unit.css").render(tile_px=UNIT_TILE_PX))
    template = environment().get_template("unit.html")
    n = 0
    for li, lr in enumerate(res.layers):
        os.makedirs(os.path.join(run_dir, UNITS_DIR, safe_name(lr.label)), exist_ok=True)
        for ci, u in enumerate(lr.units):
            text = template.render(**_page_context(res, li, lr, ci, thumbs, (filters or {}).get(lr.name)))
            write_bytes(os.path.join(run_dir, unit_page(lr.label, u.channel)), text.encode("utf-8"), durable=False)
            n += 1
    return n
