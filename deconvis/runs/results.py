"""``results.json``: everything a top-k run found, in a documented, versioned schema.

The file outlives the run: the report, ``--render-only`` and other tools read it. All paths in
it are relative to the run folder (``outputs/<run>/``). Boxes are half-open input-pixel boxes
``[y0, y1, x0, x1]`` in the *displayed* image (after resize + centre crop, see
``preprocess``); ``box`` is the unit's full receptive field (may run past the image: that part
is grey in the patch and zero in the reconstruction), ``box_clipped`` its part inside the image.

Schema (version 4)::

    {
      "schema": "deconvis.results", "version": 4,
      "created": "2025-01-01T12:00:00+00:00",
      "status": "mined" | "projected" | "rendered",
      "config": {...every VisualizeConfig key...},
      "mining_hash": "...",       # hash of mining_identity
      "mining_identity": {...},   # what decides the winners: model, weights (+ digest), resolved layers,
                                  # k, channels, image set (+ size and name digest), preprocessing
      "projection_hash": "...",   # mining_hash + projection rule: identity of the tiles
      "model": {"spec": "alexnet", "weights": "DEFAULT", "weights_id": "..."},
      "preprocess": {"resize": 256, "crop": [224, 224], "mean": [...], "std": [...]},
      "input_size": [224, 224],
      "rule": "deconvnet",
      "k": 9,                     # winners per channel (files written before it existed: config["k"])
      "images": {"spec": "builtin:skimage-crops", "count": 252, "skipped": [{"id": 7, "path": "..."}],
                 "items": {"17": {"name": "...", "path": "..."}, ...},    # the images that won (top and bottom)
                 "classes": ["cat", "dog", ...]},   # version 4, labelled sets only (an ImageFolder tree)
      "sprites": {"path": ..., "rows": ["rec", "img"], "columns": "rank (0 = strongest)", "cell": ...},
      "layers": [                 # one line each: columns, not one object per unit
        {"name": "features.1", "label": "conv1", "channels": 64, "channels_total": 64,
         "rf": [11, 11], "cell": [11, 11], "map_size": [55, 55], "sheets": ["layer_conv1_p001.jpg", ...],
         "sheets_hash": "...",
         "unit_stats": {           # version 3: each channel's maximum over the whole image set (mining)
           "images": 252, "edges": [...],   # histogram bin edges: bin i is edges[i-1] <= max < edges[i]
           "hist": [[first_bin, [count, ...]], ...], "fired": [0.93, ...],  # share of images with max > 0
           "mean": [4.1, ...], "correlated": [[[channel, r], ...], ...]},   # most correlated channels (Pearson)
         "class_means": [[[class, mean, images], ...], ...],  # version 4, labelled sets: per channel the 5
                                   # classes (index into images.classes) with the highest mean maximum
         "bottom": {               # version 4: the bottom-k (absent: no pre-activation, or bottom_k 0)
           "name": "features.0", "label": "conv1-bottom",   # the pre-activation row whose minima these are
           "channels": 64, "channels_total": 64, "map_size": [55, 55], "rf": [11, 11], "cell": [11, 11],
           "sheets": [], "sheets_hash": "",
           "units": {...}},        # as "units" below; "activation": the minimum (most negative first),
                                   # "sprite": "tiles/conv1-bottom/c0000.png"
         "unit_extras": {          # optional (absent when not computed): the unit pages' extras, per channel
           "erf": ["units/erf/conv1/0000.jpg" | null, ...], "erf_mass95": [0.41 | null, ...],   # RF + ERF image
           "evolution": {"file": [...], "value": [[per checkpoint]], "image": [[...]], "y": [[...]], "x": [[...]]},
           "featvis": ["units/featvis/conv1/0000.jpg", ...], "featvis_objective": [...]},
         "units": {                # one entry per channel; per channel one entry per winner (rank order)
           "channel": [0, 1, ...],
           "sprite": ["tiles/conv1/c0000.png", null, ...],     # null: not projected yet
           "rank": [[0, 1, ...], ...], "image": [[17, 3, ...], ...], "activation": [[12.5, ...], ...],
           "y": [[3, ...], ...], "x": [[40, ...], ...],
           "box": [[[y0, y1, x0, x1], ...], ...], "box_clipped": [[[y0, y1, x0, x1], ...], ...],
           "source": [[...]]       # only when a winner's name differs from images.items (never by the pipeline)
           "tiles": [[{"rec": path, "img": path} | null]]  # only for tiles of a version-1 run (one file each)
         }},
        ...],
      "unit_extras": {"erf": {"definition": "...", "images": 340, "key": "...", "seconds": 12.6},   # optional
                      "evolution": {"checkpoints": [{"label": "epoch 1", "weights": path}, ...], "images": 256,
                                    "rule": "deconvnet", "tile": 48, "key": "...", "seconds": ...},
                      "featvis": {"steps": 64, "size": [128, 128], "seed": 0, "objective": "channel mean", ...}},
      "analyses": {"invariance": {"name": "invariance", "status": "done", "reason": "",
                                  "files": {"json": "analyses/invariance/invariance.json", "png": ...},
                                  "headers": [...], "rows": [[...]], "notes": [...],
                                  "settings_hash": "...", "seconds": 1.2}, ...},   # optional (--analyses)
      "stats": {"mining_seconds": 12.3, "images": 252,
                "precision": {"device": "cuda", "mining_forward": "bf16 autocast", "activation": "float32",
                              "ranking": "float32 among 36 bf16 candidates per channel",
                              "projection": "float32 (TF32 off)", "uncertain_channels": {"conv5": 2}},
                "nonfinite": {"conv5": {"images": 3, "channels": {"17": 3}, "first_image": 40}},
                "replay": {"rtol": 1e-4, "checked": 2304, "mismatches": 0, "worst_relative": 3e-7,
                           "examples": [[layer, channel, image, mined, recomputed], ...]}}
    }

The tiles of a channel are one sprite (:mod:`deconvis.render.sprites`): the tile of the winner of
rank ``r`` is column ``r``, row 0 its reconstruction and row 1 its image patch, each cell ``cell``
pixels; ``sprites`` states this addressing in the file. Version 4 is version 3 plus ``bottom``
and ``class_means`` per layer and ``images.classes``; version 3 is version 2 plus
``unit_stats`` per layer (absent when the run's mining checkpoint predates it); versions 2 and 3
read as before (no bottom-k, no classes). ``unit_extras`` (top level and per layer) are optional
keys of versions 2 and up, written only when a part was computed
(:mod:`deconvis.runs.phases.extras`). Version 1 (one object per winner, with
``"tiles": {"rec": path, "img": path}`` files) is still read, re-rendered (``--render-only`` keeps
it version 1) and resumed (saved as version 2 then, its tile files kept).

``box``/``box_clipped``/``sprite`` are ``null`` until the unit has been projected. ``stats.precision``
says in which precision each number was computed (``activation``: the winners' values);
``stats.nonfinite`` the (image, channel) pairs whose map held a NaN or inf (never winners);
``stats.replay`` how many projected winners' recomputed activation differed from the mined one
(cumulative over resumed runs). The file never holds a non-finite number (:func:`save`).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

from deconvis.errors import DeconvisError
from deconvis.io.atomic import write_text
from deconvis.io.models import Preprocess
from deconvis.mirror.rules import Rule
from deconvis.render.sprites import ADDRESSING

SCHEMA = "deconvis.results"
# written by development builds between the package re-layout and this fix; read as the same schema
_SCHEMA_ALIASES = (SCHEMA, "deconvis.runs.results")
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
#: label suffix of a layer's bottom-k (its tiles folder: ``tiles/<label>-bottom/``)
BOTTOM_SUFFIX = "-bottom"
FILENAME = "results.json"

Box = List[int]


@dataclass(slots=True)
class Winner:
    """One of a channel's k strongest images."""

    rank: int                 # 0 = strongest
    image: int                # global index in the image set
    source: str               # image name (relative path, dataset item, skimage:photo)
    activation: float         # the channel's maximum over positions in this image
    y: int                    # position of that maximum in the layer's map
    x: int
    box: Optional[Box] = None          # unclipped RF box in the displayed image, half-open
    box_clipped: Optional[Box] = None  # the part of ``box`` inside the image
    tiles: Optional[Dict[str, str]] = None  # version-1 runs only: {"rec": path, "img": path} files


@dataclass
class ChannelResult:
    channel: int
    winners: List[Winner] = field(default_factory=list)
    sprite: Optional[str] = None  # the channel's tiles, one image (deconvis.render.sprites); None: not projected


@dataclass
class LayerResult:
    name: str                 # module / step name in the model
    label: str                # display name (alias like conv1, else the module name)
    channels: int             # channels visualised (after --channels)
    channels_total: int       # channels of the layer
    map_size: List[int]       # [h, w] of the layer's map for the input size
    rf: Optional[List[int]] = None  # [h, w] receptive-field size in pixels (set once projected)
    cell: Optional[List[int]] = None  # [h, w] of one tile in the sprites, pixels (set once projected)
    sheets: List[str] = field(default_factory=list)
    sheets_hash: str = ""     # identity of the rendered sheets (skip re-rendering when unchanged)
    units: List[ChannelResult] = field(default_factory=list)
    unit_stats: Optional[Dict[str, Any]] = None  # version 3: UnitStats.summary() of the mined maxima (unit pages)
    class_means: Optional[List[List[List[float]]]] = None  # version 4: ClassMeans.summary() (labelled sets)
    bottom: Optional["LayerResult"] = None  # version 4: the bottom-k, a layer of the pre-activation row
    unit_extras: Optional[Dict[str, Any]] = None  # optional: per-channel RF+ERF, evolution, featvis images (deconvis.runs.unit_extras)


@dataclass
class AnalysisRecord:
    """A Section 4 analysis run as part of the visualisation (``--analyses``): where its files are
    and its key numbers, for the report (:mod:`deconvis.runs.phases.analyses`)."""

    name: str                 # invariance | correspondence | diagnose | occlusion
    status: str               # "done" or "skipped" (``reason`` says why)
    reason: str = ""
    files: Dict[str, str] = field(default_factory=dict)   # {"json": path, "png": path, ...}, relative to the run dir
    headers: List[str] = field(default_factory=list)      # the key-number table
    rows: List[List[Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)        # one-line remarks under the table
    settings_hash: str = ""   # identity of the settings the files were computed with (resume)
    seconds: float = 0.0


@dataclass
class Results:
    config: Dict[str, Any]
    mining_hash: str
    projection_hash: str
    model: Dict[str, Any]
    preprocess: Preprocess    # a dict is accepted and converted
    input_size: List[int]
    rule: Rule                # a name is accepted and converted
    images: Dict[str, Any]
    layers: List[LayerResult] = field(default_factory=list)
    status: str = "mined"
    stats: Dict[str, Any] = field(default_factory=dict)
    mining_identity: Dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    schema: str = SCHEMA
    version: int = VERSION
    k: int = 0                # winners per channel; 0: the ``k`` of ``config`` (files from before it was a field)
    analyses: Dict[str, "AnalysisRecord"] = field(default_factory=dict)  # name -> record (files before: none)
    unit_extras: Dict[str, Any] = field(default_factory=dict)  # optional: how the unit pages' extras were made

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):
            self.preprocess = Preprocess.from_dict(self.preprocess)
        self.rule = Rule.parse(self.rule)
        if not self.k:
            self.k = int(self.config.get("k", 9))

    def layer(self, name_or_label: str) -> LayerResult:
        for lr in self.layers:
            if name_or_label in (lr.name, lr.label):
                return lr
        raise KeyError(name_or_label)

    def _head(self) -> Dict[str, Any]:
        """Everything but the layers, as JSON-ready values (small: copied with ``asdict``)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("layers", "analyses")}
        d["preprocess"], d["rule"] = self.preprocess.to_dict(), Rule.parse(self.rule).value
        d["analyses"] = {k: asdict(v) for k, v in self.analyses.items()}
        d["version"] = self.version if self.version in READABLE_VERSIONS else VERSION
        if not d["unit_extras"] or d["version"] < 2:  # optional: absent when no extra was computed
            del d["unit_extras"]
        order = ["schema", "version", "created", "status"]
        out = {**{k: d.pop(k) for k in order}, **d}
        if out["version"] >= 2:
            out["sprites"] = dict(ADDRESSING)
        return finite_json(out)

    def to_dict(self) -> Dict[str, Any]:
        """The file's content (version ``self.version``: 2 for new runs, 1 for a re-rendered old run)."""
        d = self._head()
        d["layers"] = [_layer_v2(lr, self.images) if d["version"] >= 2 else _layer_v1(lr) for lr in self.layers]
        return d

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text: the head indented, each layer on one compact line (the C
        encoder: fast for 100k winners)."""
        head = self._head()
        head["layers"] = "\0LAYERS\0"
        text = json.dumps(head, indent=1, ensure_ascii=False, allow_nan=False)
        v2 = head["version"] >= 2
        layers = ",\n  ".join(json.dumps(_layer_v2(lr, self.images) if v2 else _layer_v1(lr), ensure_ascii=False,
                                         allow_nan=False, separators=(",", ":")) for lr in self.layers)
        return text.replace('"\\u0000LAYERS\\u0000"', "[\n  " + layers + "\n ]" if layers else "[]") + "\n"

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Results":
        if d.get("schema") not in _SCHEMA_ALIASES:
            raise DeconvisError(f"not a deconvis results file (schema {d.get('schema')!r}); re-run with --fresh "
                                "to start this run over")
        if d.get("version") not in READABLE_VERSIONS:
            raise DeconvisError(f"results.json has schema version {d.get('version')!r}; this deconvis reads "
                                f"versions {', '.join(map(str, READABLE_VERSIONS))}: re-run without --render-only "
                                "(or with --fresh)")
        try:
            items = (d.get("images") or {}).get("items", {})
            read = _read_layer_v1 if d["version"] == 1 else _read_layer_v2
            layers = [read(lr, items) for lr in d["layers"]]
            rest = {k: v for k, v in d.items() if k not in ("layers", "analyses", "sprites")}
            rest["analyses"] = {k: AnalysisRecord(**v) for k, v in (d.get("analyses") or {}).items()}
            return cls(layers=layers, **rest)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DeconvisError(f"results.json is malformed ({type(exc).__name__}: {exc}); re-run with --fresh") from exc


def bottom_k(res: Results) -> int:
    """Images per channel of the run's bottom-k: the config's ``bottom_k``, ``k`` when unset (the
    columns of its sprites)."""
    bk = res.config.get("bottom_k")
    return res.k if bk is None else int(bk)


_LAYER_KEYS = ("name", "label", "channels", "channels_total", "map_size", "rf", "cell", "sheets", "sheets_hash")


def _finite(v: Optional[float]) -> Optional[float]:
    return v if v is None or math.isfinite(v) else None


def _layer_v2(lr: LayerResult, images: Dict[str, Any]) -> Dict[str, Any]:
    """A layer as columns (version 2): per channel, per winner; no per-unit objects."""
    units = lr.units
    ws = [u.winners for u in units]
    cols: Dict[str, Any] = {
        "channel": [u.channel for u in units],
        "sprite": [u.sprite for u in units],
        "rank": [[w.rank for w in row] for row in ws],
        "image": [[w.image for w in row] for row in ws],
        "activation": [[_finite(w.activation) for w in row] for row in ws],
        "y": [[w.y for w in row] for row in ws],
        "x": [[w.x for w in row] for row in ws],
        "box": [[w.box for w in row] for row in ws],
        "box_clipped": [[w.box_clipped for w in row] for row in ws],
    }
    items = (images or {}).get("items", {})
    if any(w.source != items.get(str(w.image), {}).get("name") for row in ws for w in row):
        cols["source"] = [[w.source for w in row] for row in ws]
    if any(w.tiles for row in ws for w in row):
        cols["tiles"] = [[w.tiles for w in row] for row in ws]
    out = {key: getattr(lr, key) for key in _LAYER_KEYS}
    if lr.unit_stats is not None:
        out["unit_stats"] = finite_json(lr.unit_stats)
    if lr.class_means is not None:
        out["class_means"] = finite_json(lr.class_means)
    if lr.bottom is not None:
        out["bottom"] = _layer_v2(lr.bottom, images)
    if lr.unit_extras:
        out["unit_extras"] = finite_json(lr.unit_extras)
    out["units"] = cols
    return out


def _layer_v1(lr: LayerResult) -> Dict[str, Any]:
    """A layer as version 1 wrote it: one object per channel and per winner."""
    out = {key: getattr(lr, key) for key in _LAYER_KEYS if key != "cell"}  # version 1: no cell, no unit_stats/extras
    out["units"] = [{"channel": u.channel, "winners": [
        {"rank": w.rank, "image": w.image, "source": w.source, "activation": _finite(w.activation), "y": w.y,
         "x": w.x, "box": w.box, "box_clipped": w.box_clipped, "tiles": w.tiles} for w in u.winners]}
        for u in lr.units]
    return out


def _read_layer_v1(d: Dict[str, Any], items: Dict[str, Any]) -> LayerResult:
    return LayerResult(**{**d, "units": [ChannelResult(channel=u["channel"], winners=[Winner(**w) for w in u["winners"]])
                                         for u in d["units"]]})


def _read_layer_v2(d: Dict[str, Any], items: Dict[str, Any]) -> LayerResult:
    cols = d["units"]
    n = len(cols["channel"])
    for key in ("sprite", "rank", "image", "activation", "y", "x", "box", "box_clipped"):
        if len(cols[key]) != n:
            raise ValueError(f"layer {d.get('name')!r}: column {key!r} has {len(cols[key])} entries for {n} channels")
    source = cols.get("source")
    tiles = cols.get("tiles")
    units = []
    for c in range(n):
        row = zip(cols["rank"][c], cols["image"][c], cols["activation"][c], cols["y"][c], cols["x"][c],
                  cols["box"][c], cols["box_clipped"][c])
        winners = [Winner(rank=r, image=i, source=(source[c][j] if source else items.get(str(i), {}).get("name", "")),
                          activation=float("nan") if a is None else a, y=y, x=x, box=b, box_clipped=bc,
                          tiles=tiles[c][j] if tiles else None)
                   for j, (r, i, a, y, x, b, bc) in enumerate(row)]
        units.append(ChannelResult(channel=cols["channel"][c], winners=winners, sprite=cols["sprite"][c]))
    bottom = d.get("bottom")
    return LayerResult(**{k: v for k, v in d.items() if k not in ("units", "bottom")}, units=units,
                       bottom=None if bottom is None else _read_layer_v2(bottom, items))


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def save(results: Results, run_dir: str) -> str:
    """Write ``run_dir/results.json`` atomically (a non-finite number becomes null); returns its path."""
    path = os.path.join(run_dir, FILENAME)
    write_text(path, results.to_json())
    return path


def load(run_dir: str) -> Results:
    """Read ``run_dir/results.json`` (DeconvisError if absent or unreadable)."""
    path = os.path.join(run_dir, FILENAME)
    if not os.path.isfile(path):
        raise DeconvisError(f"{path} does not exist: run without --render-only first")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as exc:
        raise DeconvisError(f"cannot read {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                            "it is damaged; re-run with --fresh to start this run over (or --run NAME for a new "
                            "one)") from None
    if not isinstance(d, dict):
        raise DeconvisError(f"{path} is damaged (not a JSON object); re-run with --fresh to start this run over")
    return Results.from_dict(d)
