"""``index.html``: a static, self-contained report to browse a top-k run.

One file with inline CSS and JavaScript (from the templates ``report.html``, ``base.html``,
``base.css`` and ``report.js`` in ``deconvis/render/templates``, autoescaped) and relative links to the run's images (open it straight
from disk, or serve the run folder). Each tile is a window onto its channel's sprite (one image per
channel, :mod:`deconvis.render.sprites`: column = rank, row 0 reconstruction, row 1 patch), so a
channel costs the browser one request; tiles of version-1 runs (one file each) show as before. A tab per layer; per channel the k reconstructions beside
the k image patches, with activation values and source names; click a tile to enlarge it. The
data (from ``results.json``) is embedded as JSON and each layer's thumbnails are built when its
tab is first opened, so reports of large networks (VGG16: 4224 channels) stay quick.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from deconvis.io.atomic import write_text
from deconvis.render.pages import render_page
from deconvis.runs.results import Results
from deconvis.runs.unit_pages import unit_page

#: the side of a tile in the report's grids, CSS pixels
TILE_PX = 64


def _data(res: Results, unit_pages: bool = False) -> Dict[str, Any]:
    """The compact JSON the page's script reads (``pages``: a layer's unit-page folder, or null)."""
    items = res.images.get("items", {})
    images: Dict[str, str] = {i: v.get("name", "") for i, v in items.items()}
    layers: List[Dict[str, Any]] = []
    for lr in res.layers:
        units = []
        for u in lr.units:
            ws = []
            for w in u.winners:
                d = {"r": w.rank, "i": w.image, "a": w.activation, "y": w.y, "x": w.x, "b": w.box, "bc": w.box_clipped}
                if w.tiles:  # a version-1 run: one file per tile
                    d.update(rec=w.tiles.get("rec"), img=w.tiles.get("img"))
                ws.append(d)
                images.setdefault(str(w.image), w.source)
            units.append({"c": u.channel, "s": u.sprite, "w": ws})
        pages = unit_page(lr.label, 0).rsplit("/", 1)[0] + "/" if unit_pages else None
        layers.append({"name": lr.name, "label": lr.label, "cell": lr.cell, "units": units, "pages": pages})
    return {"k": res.k, "tile": TILE_PX, "images": images, "layers": layers}


def render_html(res: Results, unit_pages: bool = False) -> str:
    """The report page for ``res`` (paths relative to the run folder), from ``report.html``;
    ``unit_pages``: the channels' titles link to their pages (:mod:`deconvis.runs.unit_pages`)."""
    cfg = res.config
    k = int(cfg.get("k", 9))
    n_img = res.images.get("count", "?")
    layers = [dict(name=lr.name, label=lr.label, rf=lr.rf, map_size=lr.map_size, channels=lr.channels,
                   channels_total=lr.channels_total, sheets=lr.sheets, unit_pages=unit_pages) for lr in res.layers]
    analyses = [dict(name=name, status=rec.status, seconds=rec.seconds, reason=rec.reason, headers=rec.headers,
                     rows=rec.rows, notes=rec.notes, files=rec.files) for name, rec in res.analyses.items()]
    return render_page(
        "report.html", title=f"deconvis: {cfg.get('run', '')} top-{k}", tile_px=TILE_PX,
        model_spec=str(res.model.get("spec")), model_weights=str(res.model.get("weights")), k=k,
        readable=res.images.get("readable", n_img), images_spec=str(res.images.get("spec")),
        skipped=len(res.images.get("skipped", [])), rule=res.rule, input_size=res.input_size,
        created=res.created, layers=layers, analyses=analyses, data=_data(res, unit_pages))


def write_report(res: Results, run_dir: str, filename: str = "index.html", unit_pages: bool = False) -> str:
    """Write the report atomically into ``run_dir``; returns its path."""
    path = os.path.join(run_dir, filename)
    write_text(path, render_html(res, unit_pages))
    return path
