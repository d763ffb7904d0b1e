"""``results.json``: everything a top-k run found, in a documented, versioned schema.

The file outlives the run: the report, ``--render-only`` and other tools read it. All paths in
it are relative to the run folder (``outputs/<run>/``). Boxes are half-open input-pixel boxes
``[y0, y1, x0, x1]`` in the *displayed* image (after resize + centre crop, see
``preprocess``); ``box`` is the unit's full receptive field (may run past the image: that part
is grey in the patch and zero in the reconstruction), ``box_clipped`` its part inside the image.

Schema (version 1)::

    {
      "schema": "deconvis.results", "version": 1,
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
                 "items": {"17": {"name": "...", "path": "..."}, ...}},   # the images that won
      "layers": [
        {"name": "features.1", "label": "conv1", "channels": 64, "channels_total": 64,
         "rf": [11, 11], "map_size": [55, 55], "sheets": ["layer_conv1_p001.png", ...],
         "units": [
           {"channel": 0, "winners": [
              {"rank": 0, "image": 17, "source": "skimage:coffee", "activation": 12.5,
               "y": 3, "x": 40, "box": [y0, y1, x0, x1], "box_clipped": [y0, y1, x0, x1],
               "tiles": {"rec": "tiles/conv1/c0000_0_rec.png", "img": "tiles/conv1/c0000_0_img.png"}},
              ...]},
           ...]},
        ...],
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

``box``/``box_clipped``/``tiles`` are ``null`` until the unit has been projected. ``stats.precision``
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
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from deconvis.errors import DeconvisError
from deconvis.io.atomic import write_json
from deconvis.io.models import Preprocess
from deconvis.mirror.rules import Rule

SCHEMA = "deconvis.results"
# written by development builds between the package re-layout and this fix; read as the same schema
_SCHEMA_ALIASES = (SCHEMA, "deconvis.runs.results")
VERSION = 1
FILENAME = "results.json"

Box = List[int]


@dataclass
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
    tiles: Optional[Dict[str, str]] = None  # {"rec": path, "img": path}, relative to the run dir


@dataclass
class ChannelResult:
    channel: int
    winners: List[Winner] = field(default_factory=list)


@dataclass
class LayerResult:
    name: str                 # module / step name in the model
    label: str                # display name (alias like conv1, else the module name)
    channels: int             # channels visualised (after --channels)
    channels_total: int       # channels of the layer
    map_size: List[int]       # [h, w] of the layer's map for the input size
    rf: Optional[List[int]] = None  # [h, w] receptive-field size in pixels (set once projected)
    sheets: List[str] = field(default_factory=list)
    sheets_hash: str = ""     # identity of the rendered sheets (skip re-rendering when unchanged)
    units: List[ChannelResult] = field(default_factory=list)


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

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["preprocess"], d["rule"] = self.preprocess.to_dict(), Rule.parse(self.rule).value
        order = ["schema", "version", "created", "status"]
        return {**{k: d.pop(k) for k in order}, **d}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Results":
        if d.get("schema") not in _SCHEMA_ALIASES:
            raise DeconvisError(f"not a deconvis results file (schema {d.get('schema')!r}); re-run with --fresh "
                                "to start this run over")
        if d.get("version") != VERSION:
            raise DeconvisError(f"results.json has schema version {d.get('version')!r}; this deconvis reads "
                                f"version {VERSION}: re-run without --render-only (or with --fresh)")
        try:
            layers = [LayerResult(**{**lr, "units": [ChannelResult(channel=u["channel"],
                                                                   winners=[Winner(**w) for w in u["winners"]])
                                                     for u in lr["units"]]})
                      for lr in d["layers"]]
            rest = {k: v for k, v in d.items() if k not in ("layers", "analyses")}
            rest["analyses"] = {k: AnalysisRecord(**v) for k, v in (d.get("analyses") or {}).items()}
            return cls(layers=layers, **rest)
        except (KeyError, TypeError) as exc:
            raise DeconvisError(f"results.json is malformed ({type(exc).__name__}: {exc}); re-run with --fresh") from exc


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
    write_json(path, finite_json(results.to_dict()))
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
