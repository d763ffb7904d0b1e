"""Each channel's theoretical receptive field and its effective receptive field drawn on one image
(unit pages, ``units/erf/<layer>/<channel>.jpg``).

The unit is the channel's top winner: channel ``c`` at the position ``(y, x)`` of its strongest
activation ``a`` on the winning image. Its ERF map (Luo et al. 2016, as ``deconvis erf``, but for
this one unit on this one image, docs/method.md) is ``sum over colours |d a / d x|`` [H, W] in
input pixels of the displayed image: the gradient rule of the mirror (exact against autograd)
seeded with ``a`` on the unit's receptive-field window, divided by ``|a|``. It is zero outside the
RF box, which is drawn on the same image (:func:`draw_rf_erf`). One window projection per
channel: a tenth of the projection phase's work at ``k = 9``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from deconvis.graph.erf import ERF
from deconvis.graph.rf_geometry import clip_box
from deconvis.io.atomic import write_image
from deconvis.io.images import ImageDataset, UnreadableImage, normalize_batch
from deconvis.io.prefetch import Prefetch
from deconvis.io.rgb import swap_red_blue
from deconvis.render.sheets import safe_name
from deconvis.render.writer import BackgroundWriter
from deconvis.runs.results import LayerResult, Results

log = logging.getLogger("deconvis")

#: the drawn images: ``units/erf/<layer>/<channel>.jpg``, relative to the run folder
ERF_DIR = "units/erf"
#: the longer side of a drawn image, pixels (the displayed image is scaled to it)
ERF_PX = 224
#: colour of the RF box (RGB); the ERF heat uses OpenCV's inferno map
RF_COLOUR = (0, 230, 255)
#: largest opacity of the heat overlay (where the ERF reaches HEAT_PERCENTILE)
HEAT_ALPHA = 0.85
#: the heat's full scale: this percentile of the map's positive values (the map is spiky)
HEAT_PERCENTILE = 99.0
#: threads drawing, encoding and writing the images while the next maps are computed (0: inline)
ERF_WRITER_THREADS = 1
#: what the maps mean, stored in results.json
DEFINITION = ("sum over colours of |d a / d x| for the channel's top winner (its activation a at the winning "
              "position, on the winning image), scaled to its peak; box: the theoretical receptive field")


def erf_path(label: str, channel: int) -> str:
    """The drawn image of ``channel`` of the layer labelled ``label``, relative to the run folder."""
    return f"{ERF_DIR}/{safe_name(label)}/{int(channel):04d}.jpg"


def paste_window(window: np.ndarray, box: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """A window [rh, rw] on the half-open, unclipped input box ``box`` = (y0, y1, x0, x1), laid on
    a zero image [H, W] = ``size`` (the part of the box outside the image is dropped)."""
    H, W = int(size[0]), int(size[1])
    out = np.zeros((H, W), dtype=window.dtype)
    y0, _, x0, _ = (int(v) for v in box)
    (cy0, cy1, cx0, cx1), _ = clip_box([int(v) for v in box], (H, W))
    if cy1 > cy0 and cx1 > cx0:
        out[cy0:cy1, cx0:cx1] = window[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out


def unit_erf_maps(dn: Any, layer: str, units: torch.Tensor, acts: torch.Tensor, size: Sequence[int]
                  ) -> Tuple[List[Optional[np.ndarray]], torch.Tensor]:
    """ERF maps of ``units`` [M, 4] = (image in ``dn``'s last forward batch, channel, y, x) of
    ``layer`` (``acts``: that layer's activation [N, C, h, w] from the same forward; ``size``: the
    input's [H, W]): per unit
    float64 [H, W] = ``sum_c |d a / d x_c|`` on the whole input, None for a unit whose activation
    is 0 (it seeds nothing). Also the units' unclipped RF boxes, LongTensor [M, 4]."""
    rec, boxes = dn.project_window(layer, units, rule="gradient", memory_format=torch.preserve_format)
    u = units.to(acts.device)
    a = acts[u[:, 0], u[:, 1], u[:, 2], u[:, 3]].detach().to("cpu", torch.float64)
    mag = rec.detach().to("cpu", torch.float64).abs().sum(1)  # [M, rh, rw]
    live = a != 0
    mag = mag.div_(torch.where(live, a.abs(), torch.ones_like(a))[:, None, None])  # one division for all units
    box_list = boxes.tolist()
    out: List[Optional[np.ndarray]] = [paste_window(mag[m].numpy(), box_list[m], size) if ok else None
                                       for m, ok in enumerate(live.tolist())]
    return out, boxes.cpu()


def draw_rf_erf(image: np.ndarray, erf: np.ndarray, box_clipped: Sequence[int], px: int = ERF_PX
                ) -> Tuple[np.ndarray, List[int]]:
    """``image`` uint8 RGB [H, W, 3] scaled so its longer side is ``px``, the ERF ``erf`` [H, W]
    (>= 0) over it as heat (inferno colours, opacity ``HEAT_ALPHA * sqrt(erf / top)`` up to 1, ``top``
    the :data:`HEAT_PERCENTILE` percentile of its positive values) and the RF box ``box_clipped``
    (half-open, displayed-image pixels) as a 1-pixel :data:`RF_COLOUR` frame with a black ring outside.
    Returns the image and the frame's box in its pixels (half-open: the frame's outer edge)."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    H, W = image.shape[:2]
    s = px / max(H, W)
    size = (max(1, round(W * s)), max(1, round(H * s)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    img = cv2.resize(image, size, interpolation=interp) if s != 1 else image.copy()
    e = np.asarray(erf, dtype=np.float64)
    e = cv2.resize(e, size, interpolation=interp) if s != 1 else e
    hot = e > 0
    pos = e[hot]
    if pos.size:
        top = float(np.percentile(pos, HEAT_PERCENTILE))  # a few spikes do not wash out the rest
        # blend only the rows and columns that hold heat (an ERF is zero outside the unit's RF): where
        # it is zero the opacity is zero and the pixels stay as they are
        rows, cols = np.flatnonzero(hot.any(1)), np.flatnonzero(hot.any(0))
        win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        norm = np.clip(e[win] / top, 0.0, 1.0)
        heat = cv2.applyColorMap(np.round(norm * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
        heat = swap_red_blue(heat)
        alpha = (HEAT_ALPHA * np.sqrt(norm))[..., None]
        img[win] = np.round(img[win] * (1 - alpha) + heat * alpha).astype(np.uint8)
    y0, y1, x0, x1 = (int(v) for v in box_clipped)
    frame = [round(y0 * s), max(round(y1 * s), round(y0 * s) + 1), round(x0 * s), max(round(x1 * s), round(x0 * s) + 1)]
    img = np.ascontiguousarray(img)
    cv2.rectangle(img, (frame[2] - 1, frame[0] - 1), (frame[3], frame[1]), (0, 0, 0), 1)  # dark ring outside: contrast
    cv2.rectangle(img, (frame[2], frame[0]), (frame[3] - 1, frame[1] - 1), RF_COLOUR, 1)
    return img, frame


def mass_fraction(erf: np.ndarray, box_clipped: Sequence[int], q: float = 0.95) -> float:
    """The share of the RF area (inside the image) the fewest pixels holding ``q`` of the ERF mass
    take (:meth:`deconvis.graph.erf.ERF.mass_fraction`)."""
    b = [int(v) for v in box_clipped]
    return ERF("", (0, 0), None, erf, b, b, tuple(erf.shape), 1).mass_fraction(q)  # type: ignore[arg-type]


def erf_phase(ctx: Any, res: Results, run_dir: str) -> Dict[str, Any]:
    """Draw every mined channel's RF + ERF image (top winner) and record them in each layer's
    ``unit_extras["erf"]`` (paths, null for inactive channels) and ``["erf_mass95"]``. Returns
    the record for ``res.unit_extras["erf"]``. Images are forwarded ``batch_size`` at a time, the
    next batch decoded on a thread meanwhile; the drawing, encoding and writing run on a writer
    thread (:data:`ERF_WRITER_THREADS`) meanwhile."""
    layers = {lr.name: lr for lr in res.layers}
    tops: Dict[int, List[Tuple[LayerResult, int]]] = {}
    for lr in res.layers:
        ex = lr.unit_extras = dict(lr.unit_extras or {})
        ex["erf"] = [None] * len(lr.units)
        ex["erf_mass95"] = [None] * len(lr.units)
        for ci, u in enumerate(lr.units):
            if u.winners and u.winners[0].activation > 0:
                tops.setdefault(u.winners[0].image, []).append((lr, ci))
    data = ImageDataset(ctx.source, ctx.preprocess)
    dn = ctx.dn
    ids = sorted(tops)
    writer = BackgroundWriter(threads=ERF_WRITER_THREADS, max_pending=2 * max(1, int(ctx.cfg.batch_size)))
    step = max(1, int(ctx.cfg.batch_size))
    dtype, device = ctx.dtype, ctx.device

    def decode(batch: List[int]) -> Tuple[List[int], List[np.ndarray], Optional[torch.Tensor]]:
        """The readable images of ``batch``: ids, displayed pixels, and the pixels as one uint8
        [N, H, W, 3] tensor (normalised on the main thread, whose torch ops run multi-threaded)."""
        chunk, shown = [], []
        for i in batch:
            try:
                shown.append(data.display(i))
            except (UnreadableImage, OSError) as exc:
                log.warning("no ERF image for image %d: %s", i, exc)
                continue
            chunk.append(i)
        return chunk, shown, torch.from_numpy(np.stack(shown)) if shown else None

    batches = [ids[s:s + step] for s in range(0, len(ids), step)]
    try:
        with dn.fixed_weights():  # the model does not change meanwhile: filters prepared once
            # the next batch decodes on a thread meanwhile
            for chunk, shown, x in Prefetch(map(decode, batches), depth=1, name="deconvis-erf-decode"):
                if x is None:
                    continue
                x = normalize_batch(x.to(device), ctx.preprocess)
                acts = dn.forward(x.to(dtype=dtype), layers=list(layers))
                H, W = shown[0].shape[:2]
                for name, lr in layers.items():
                    sel = [(b, ci) for b, i in enumerate(chunk) for (l2, ci) in tops[i] if l2 is lr]
                    if not sel:
                        continue
                    units = torch.tensor([[b, lr.units[ci].channel, lr.units[ci].winners[0].y,
                                           lr.units[ci].winners[0].x] for b, ci in sel], dtype=torch.long)
                    maps, boxes = unit_erf_maps(dn, name, units, acts[name], (H, W))
                    for (b, ci), m, box in zip(sel, maps, boxes.tolist()):
                        if m is not None:
                            writer.submit(_draw_one, run_dir, lr, ci, shown[b], m, box)
        writer.close()  # the first error of a drawing or a write, if any
    finally:
        writer.abandon()  # after an error: drop the drawings not started, let the running ones finish
        dn.release()
    written = sum(1 for lr in res.layers for f in (lr.unit_extras or {}).get("erf") or [] if f)
    return {"definition": DEFINITION, "images": written}


def _draw_one(run_dir: str, lr: LayerResult, ci: int, shown: np.ndarray, erf: np.ndarray, box: List[int]) -> None:
    """Draw, write (atomically) and record the RF + ERF image of channel index ``ci`` of ``lr``
    (on the writer thread: the next batch's forward and projections go on meanwhile)."""
    clipped, _ = clip_box(box, erf.shape[:2])
    img, _ = draw_rf_erf(shown, erf, clipped)
    rel = erf_path(lr.label, lr.units[ci].channel)
    write_image(os.path.join(run_dir, rel), img, durable=False)
    mass = round(mass_fraction(erf, clipped), 4)
    lr.unit_extras["erf"][ci] = rel  # type: ignore[index]  # the file is complete before it is listed
    lr.unit_extras["erf_mass95"][ci] = mass  # type: ignore[index]
