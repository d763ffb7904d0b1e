"""The explorer's state: the model and its mirror, the image set, uploads, and the recorded
forward of the current image.

A :class:`Session` answers the explorer's questions without any web framework:

* :meth:`Session.maps`: every channel of a layer for an image, as one grid image (a *sheet*:
  tile ``c`` at row ``c // cols``, column ``c % cols``, ``gap`` pixels apart);
* :meth:`Session.unit`: one unit's deconvnet, guided and gradient projections on its
  receptive-field window (:meth:`deconvis.mirror.deconvnet.DeconvNet.project_window`) and its RF
  box (:meth:`deconvis.graph.rf_geometry.RFTable.box`), half-open input pixels of the displayed
  image;
* :meth:`Session.add_upload`: an uploaded file, checked (bytes, pixels, decodable) and kept in a
  temporary folder that :meth:`Session.close` removes.

The forward of the current image is recorded once (every value and max-pool switch) when an
image is first asked for; later questions about that image only run backwards. Maps are cached
per (image, layer). Every problem is an :class:`ExploreError`: a one-line message and the HTTP
status the app answers with.
"""
from __future__ import annotations

import collections
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from deconvis.errors import DeconvisError, close_matches
from deconvis.graph.rf_geometry import RFTable, clip_box
from deconvis.io.images import ImageSource
from deconvis.io.models import LoadedModel, Preprocess
from deconvis.io.pixels import ImageTooLarge, UnreadableImage, header_pixels, normalize, preprocess_image, read_image
from deconvis.io.rgb import swap_red_blue
from deconvis.mirror.deconvnet import DeconvNet
from deconvis.mirror.rules import Rule
from deconvis.render.display import to_uint8
from deconvis.runs.results import LayerResult, Results
from deconvis.runs.unit_pages import unit_page

#: the three rules a click projects with, in the order the page shows them
RULES = (Rule.DECONVNET, Rule.GUIDED, Rule.GRADIENT)
#: grey of the gaps between the maps of a sheet
GAP_GREY = 40
#: images whose displayed image and input are kept (the run's set and uploads together)
IMAGE_CACHE = 16
#: sheets of maps kept, per (image, layer)
MAPS_CACHE = 64


class ExploreError(DeconvisError):
    """A request the explorer refuses: ``status`` is the HTTP status (400 bad value, 404 unknown
    name, 413 too large, 415 not an image)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ExploreLayer:
    """A layer the explorer shows: step ``name``, ``label`` (conv5), ``channels``, ``map_size``
    [h, w] units, ``rf`` [h, w] input pixels (None without an RF table), and the run's results
    for it (None without a run or when the run did not mine it)."""

    name: str
    label: str
    channels: int
    map_size: Tuple[int, int]
    rf: Optional[Tuple[int, int]]
    mined: Optional[LayerResult] = None

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "label": self.label, "channels": self.channels, "map_size": list(self.map_size),
                "rf": list(self.rf) if self.rf else None, "mined": self.mined is not None}


@dataclass
class Sheet:
    """All channels of one layer for one image: ``png`` (the grid, see the module doc), ``cols``,
    ``gap`` pixels, ``map_size`` [h, w], per channel its maximum and that maximum's (y, x)."""

    png: bytes
    cols: int
    gap: int
    map_size: Tuple[int, int]
    scale: float
    maxima: List[float]
    argmax: List[Tuple[int, int]]

    def to_json(self) -> Dict[str, Any]:
        return {"cols": self.cols, "gap": self.gap, "map_size": list(self.map_size), "scale": self.scale,
                "max": self.maxima, "argmax": [list(p) for p in self.argmax]}


@dataclass
class UnitView:
    """One unit's projections: per rule the reconstruction ``rec[rule]`` [C_in, wh, ww] on the
    half-open ``window`` (y0, y1, x0, x1; zero where it runs past the image), its picture
    ``png[rule]`` (zero is grey 128), the RF ``box`` (unclipped) and ``box_clipped``, and the
    unit's activation."""

    layer: str
    channel: int
    y: int
    x: int
    activation: float
    window: Tuple[int, int, int, int]
    box: Tuple[int, int, int, int]
    box_clipped: Tuple[int, int, int, int]
    rec: Dict[str, torch.Tensor] = field(default_factory=dict)
    png: Dict[str, bytes] = field(default_factory=dict)
    seconds: float = 0.0


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` RGB or ``[H, W]`` grey -> PNG bytes (OpenCV, fast compression: these
    pictures are sent once, never stored)."""
    import cv2  # start-up time: OpenCV loads only when an image is encoded

    img = np.ascontiguousarray(swap_red_blue(np.asarray(rgb)))
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def maps_sheet(maps: torch.Tensor, gap: int = 1) -> Tuple[np.ndarray, int, float]:
    """Maps [C, h, w] -> (uint8 grey sheet, columns, scale): one scale for the whole layer (its
    largest ``|v|``), so channels compare: ``255 * v / scale`` for maps without negative values
    (rectified), else ``128 + 127 * v / scale``; channel ``c`` at row ``c // cols``, column
    ``c % cols`` with ``cols = ceil(sqrt(C))``, ``gap`` grey pixels between tiles."""
    c, h, w = maps.shape
    m = maps.detach().to("cpu", torch.float64)
    m = torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    scale = float(m.abs().max()) if m.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    if float(m.min()) >= 0:
        pix = (m * (255.0 / scale)).round().clamp(0, 255)
    else:
        pix = (m * (127.0 / scale) + 128.0).round().clamp(0, 255)
    pix = pix.to(torch.uint8).numpy()
    cols = max(1, int(np.ceil(np.sqrt(c))))
    rows = (c + cols - 1) // cols
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), GAP_GREY, np.uint8)
    for i in range(c):
        r, k = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = pix[i]
    return out, cols, scale


def _as_int(value: Any, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise ExploreError(f"{what} must be an integer, got {value!r}") from None


class Session:
    """The model, its mirror and the images one explorer serves (see the module doc).

    ``source``: the run's image set (None: uploads only); ``results`` and ``run_dir``: the run (for
    top-k and unit pages; None without one); ``layers``: step names or aliases to show (empty: the
    run's layers, else the model's conv layers). Thread-safe: one request computes at a time.
    """

    def __init__(self, loaded: LoadedModel, preprocess: Preprocess, source: Optional[ImageSource] = None,
                 results: Optional[Results] = None, run_dir: Optional[str] = None, layers: Sequence[str] = (),
                 max_upload_bytes: int = 20 << 20, max_upload_pixels: int = 40_000_000,
                 source_error: str = "") -> None:
        self.loaded = loaded
        self.preprocess = preprocess
        self.source = source
        self.source_error = source_error
        self.results = results
        self.run_dir = os.path.realpath(run_dir) if run_dir else None
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_upload_pixels = int(max_upload_pixels)
        self.dn = DeconvNet(loaded.model)
        self.input_size: Tuple[int, int] = (int(preprocess.crop[0]), int(preprocess.crop[1]))
        try:
            self.table: Optional[RFTable] = self.dn.receptive_fields(self.input_size)
        except DeconvisError:  # no RF table for this graph: boxes are the whole image
            self.table = None
        self.layers = self._layers(layers)
        self._by_key = {k: l for l in self.layers for k in (l.name, l.label)}
        self._lock = threading.RLock()
        self._tmp: Optional[tempfile.TemporaryDirectory] = tempfile.TemporaryDirectory(prefix="deconvis-explore-")
        self.upload_dir = self._tmp.name
        self.uploads: Dict[str, str] = {}   # key u<n> -> the name the user gave
        self._inputs: "collections.OrderedDict[str, Tuple[np.ndarray, torch.Tensor]]" = collections.OrderedDict()
        self._sheets: "collections.OrderedDict[Tuple[str, str], Sheet]" = collections.OrderedDict()
        self.current: Optional[str] = None  # the image whose forward the mirror holds
        self._recorded: Dict[str, torch.Tensor] = {}  # its activations [1, C, h, w] per shown layer

    # ------------------------------------------------------------------ set-up
    def _layers(self, wanted: Sequence[str]) -> List[ExploreLayer]:
        """The layers to show, resolved once on a grey image (map sizes, channels)."""
        mined = {lr.name: lr for lr in self.results.layers} if self.results is not None else {}
        if wanted:
            names = []
            for w in wanted:
                n = self.dn.resolve(w)
                if n not in names:
                    names.append(n)
        elif mined:
            names = list(mined)
        else:
            names = self.dn.conv_layers()
        if not names:
            raise DeconvisError("the model has no conv layers to explore; name them with --layers")
        probe = torch.zeros(1, 3, *self.input_size)
        acts = self.dn.activations(probe, names)
        out = []
        for n in names:
            a = acts[n]
            if a.dim() != 4:
                raise DeconvisError(f"layer {n!r} has output shape {list(a.shape)}: the explorer shows maps "
                                    "[N, C, h, w]; choose conv or pool layers with --layers")
            rf = None
            if self.table is not None:
                row = self.table[n]
                rf = tuple(int(v) for v in (row.local or row).rf)
            out.append(ExploreLayer(name=n, label=self.dn.display_name(n), channels=int(a.shape[1]),
                                    map_size=(int(a.shape[2]), int(a.shape[3])), rf=rf, mined=mined.get(n)))
        return out

    def close(self) -> None:
        """Remove the uploads folder and drop the recorded forward (idempotent)."""
        with self._lock:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
            self.dn.release()
            self._recorded = {}
            self._inputs.clear()
            self._sheets.clear()
            self.current = None

    # ------------------------------------------------------------------ images
    def image_list(self, limit: int = 5000) -> List[Dict[str, str]]:
        """The run's images (the first ``limit``) then the uploads: ``{"id": "r17" | "u1", "name"}``."""
        out: List[Dict[str, str]] = []
        if self.source is not None:
            out += [{"id": f"r{i}", "name": self.source.name(i)} for i in range(min(len(self.source), limit))]
        out += [{"id": k, "name": v} for k, v in self.uploads.items()]
        return out

    def layer(self, name: str) -> ExploreLayer:
        """A shown layer by step name or label; 404 naming close matches otherwise."""
        if not isinstance(name, str) or name not in self._by_key:
            raise ExploreError(f"unknown layer {name!r}; choose one of {', '.join(l.label for l in self.layers)}"
                               + close_matches(str(name), list(self._by_key)), 404)
        return self._by_key[name]

    def _load(self, key: str) -> np.ndarray:
        """uint8 RGB [H, W, 3] of image ``key`` (``r<index>`` of the run's set, ``u<n>`` an upload)."""
        if not isinstance(key, str) or len(key) < 2 or key[0] not in "ru" or not key[1:].isdigit():
            raise ExploreError(f"image {key!r} is not an image id; use r<index> (the run's set) or u<n> (an upload)",
                               404)
        if key[0] == "u":
            if key not in self.uploads or self._tmp is None:
                raise ExploreError(f"no upload {key!r}; upload the image first", 404)
            path = os.path.join(self.upload_dir, key)
            try:
                return read_image(path, self.max_upload_pixels)
            except UnreadableImage as exc:  # pragma: no cover - checked when uploaded
                raise ExploreError(f"upload {key!r} cannot be read: {exc}", 415) from None
        i = int(key[1:])
        if self.source is None:
            raise ExploreError(f"image {key!r}: this explorer has no image set "
                               f"({self.source_error or 'no run and no --images'}); upload an image", 404)
        if not 0 <= i < len(self.source):
            raise ExploreError(f"image {key!r} is outside the run's set of {len(self.source)} images", 404)
        try:
            return self.source.load(i, min_side=self.preprocess.resize)
        except (UnreadableImage, OSError) as exc:
            raise ExploreError(f"image {key!r} ({self.source.name(i)}) cannot be read: {exc}", 415) from None

    def displayed(self, key: str) -> Tuple[np.ndarray, torch.Tensor]:
        """(displayed uint8 RGB [h, w, 3], network input [3, h, w]) of image ``key``, cached."""
        with self._lock:
            if key in self._inputs:
                self._inputs.move_to_end(key)
                return self._inputs[key]
            shown = preprocess_image(self._load(key), self.preprocess)
            pair = (shown, normalize(shown, self.preprocess))
            self._inputs[key] = pair
            while len(self._inputs) > IMAGE_CACHE:
                self._inputs.popitem(last=False)
            return pair

    def record(self, key: str) -> None:
        """Make ``key`` the current image: its forward recorded (values and switches) up to the
        deepest shown layer, unless it already is."""
        with self._lock:
            if self.current == key:
                return
            _, x = self.displayed(key)
            self.current, self._recorded = None, {}
            self._recorded = self.dn.forward(x[None], [l.name for l in self.layers])
            self.current = key

    def add_upload(self, data: bytes, name: str) -> str:
        """Keep an uploaded file (``data``, the user's file ``name``) if it is an image within the
        caps; returns its key ``u<n>``. 413 over the byte or pixel cap, 415 when not an image."""
        if len(data) > self.max_upload_bytes:
            raise ExploreError(f"upload {name!r} has {len(data)} bytes, above the cap of {self.max_upload_bytes} bytes; "
                               "send a smaller image (or raise max_upload_mb)", 413)
        if not data:
            raise ExploreError(f"upload {name!r} is empty; choose an image file", 415)
        with self._lock:
            if self._tmp is None:
                raise ExploreError("the explorer is shutting down", 503)
            key = f"u{len(self.uploads) + 1}"
            path = os.path.join(self.upload_dir, key)
            with open(path, "wb") as f:
                f.write(data)
            try:
                size, n = header_pixels(path)
                if n is not None and n > self.max_upload_pixels:
                    dims = f"{size[1]}x{size[0]} = " if size else ""
                    raise ImageTooLarge(f"{dims}{n} pixels")
                read_image(path, self.max_upload_pixels)
            except ImageTooLarge as exc:
                os.remove(path)
                raise ExploreError(f"upload {name!r} is too large ({exc}), above the cap of {self.max_upload_pixels} "
                                   "pixels; send a smaller image (or raise max_upload_pixels)", 413) from None
            except UnreadableImage:
                os.remove(path)
                raise ExploreError(f"upload {name!r} is not an image OpenCV can decode; choose a PNG, JPEG, BMP, "
                                   "TIFF or WebP file", 415) from None
            self.uploads[key] = os.path.basename(str(name))[:200] or key
            return key

    # ------------------------------------------------------------------ maps
    def maps(self, key: str, layer: str) -> Sheet:
        """Every channel of ``layer`` for image ``key`` as one sheet (cached per (image, layer))."""
        lay = self.layer(layer)
        with self._lock:
            ck = (key, lay.name)
            if ck in self._sheets:
                self._sheets.move_to_end(ck)
                return self._sheets[ck]
            self.record(key)
            act = self._act(lay.name)
            grey, cols, scale = maps_sheet(act)
            flat = act.detach().to("cpu", torch.float64).flatten(1)
            flat = torch.nan_to_num(flat, nan=-float("inf"))
            mx, arg = flat.max(1)
            w = lay.map_size[1]
            sheet = Sheet(png=encode_png(grey), cols=cols, gap=1, map_size=lay.map_size, scale=scale,
                          maxima=[float(v) for v in mx], argmax=[(int(a) // w, int(a) % w) for a in arg])
            self._sheets[ck] = sheet
            while len(self._sheets) > MAPS_CACHE:
                self._sheets.popitem(last=False)
            return sheet

    def _act(self, name: str) -> torch.Tensor:
        """The recorded activation [C, h, w] of ``name`` for the current image."""
        return self._recorded[name][0]

    # ------------------------------------------------------------------ units
    def check_unit(self, layer: str, channel: Any, y: Any, x: Any) -> Tuple[ExploreLayer, int, int, int]:
        """The layer and integer (channel, y, x), or a 400 naming the valid range."""
        lay = self.layer(layer)
        c, yy, xx = _as_int(channel, "channel"), _as_int(y, "y"), _as_int(x, "x")
        if not 0 <= c < lay.channels:
            raise ExploreError(f"channel {c} is outside {lay.label}, which has channels 0..{lay.channels - 1}")
        h, w = lay.map_size
        if not (0 <= yy < h and 0 <= xx < w):
            raise ExploreError(f"unit ({yy}, {xx}) is outside the {h}x{w} map of {lay.label}; "
                               f"use 0 <= y < {h}, 0 <= x < {w}")
        return lay, c, yy, xx

    def unit(self, key: str, layer: str, channel: Any, y: Any, x: Any,
             rules: Sequence[Rule] = RULES, pictures: bool = True) -> UnitView:
        """Projections of unit (``channel``, ``y``, ``x``) of ``layer`` in image ``key`` by each
        of ``rules`` (windowed backward from the recorded forward), with its RF box."""
        lay, c, yy, xx = self.check_unit(layer, channel, y, x)
        with self._lock:
            self.record(key)
            t0 = time.perf_counter()
            units = torch.tensor([[0, c, yy, xx]])
            if self.table is not None:
                box = tuple(int(v) for v in self.table.box(lay.name, yy, xx))
            else:
                box = (0, self.input_size[0], 0, self.input_size[1])
            view = UnitView(layer=lay.name, channel=c, y=yy, x=xx, activation=float(self._act(lay.name)[c, yy, xx]),
                            window=box, box=box, box_clipped=tuple(clip_box(box, self.input_size)[0]))  # type: ignore[arg-type]
            for rule in rules:
                rec, boxes = self.dn.project_window(lay.name, units, rule)
                view.rec[rule.value] = rec[0]
                view.window = tuple(int(v) for v in boxes[0].tolist())  # type: ignore[assignment]
                if pictures:
                    view.png[rule.value] = encode_png(to_uint8(rec)[0])
            view.seconds = time.perf_counter() - t0
            return view

    # ------------------------------------------------------------------ the run
    def top(self, layer: str, channel: int) -> Optional[Dict[str, Any]]:
        """The run's top-k of the channel: sprite and unit page (paths relative to the run folder,
        None where absent), cell [h, w], k, winners (rank, image, source, activation, y, x, box);
        None when the run did not mine it."""
        lay = self.layer(layer)
        if lay.mined is None or self.results is None:
            return None
        cr = next((u for u in lay.mined.units if u.channel == channel), None)
        if cr is None:
            return None
        page = unit_page(lay.mined.label, channel)
        has_page = self.run_dir is not None and os.path.isfile(os.path.join(self.run_dir, page))
        return {"sprite": cr.sprite, "cell": lay.mined.cell, "k": self.results.k,
                "page": page if has_page else None,
                "winners": [{"rank": w.rank, "image": w.image, "source": w.source, "activation": w.activation,
                             "y": w.y, "x": w.x, "box": w.box} for w in cr.winners]}
