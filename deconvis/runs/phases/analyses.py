"""Analyses: the Section 4 analyses named by ``--analyses`` (invariance, correspondence,
diagnose, occlusion), run after rendering on rank 0, on the run's model and its first
``analysis_images`` readable images (diagnose: up to 32, its dead-filter count wants more).

Each analysis uses its own subcommand's default settings (:class:`InvarianceConfig`, ...) and
writes into ``<run>/analyses/<name>/``: its figure (PNG) and ``<name>.json`` (the settings, their
hash, the report record and the full result), atomically, the JSON last. Its report record
(:class:`~deconvis.runs.results.AnalysisRecord`: files and a short table of key numbers) goes
into ``results.json``. Resuming: an analysis whose JSON holds the same settings hash and whose
files exist is not recomputed; ``--fresh`` removes the folder. An analysis the model does not
allow (no class scores for invariance, ...) is recorded as skipped with its one-line reason, and
the run goes on. Under torchrun the other ranks wait for rank 0 (it reports progress between
analyses, so one analysis must finish within ``dist_timeout``).

Layers: each analysis's default layers (ZF's: invariance conv1/fc6, correspondence conv5/fc6)
when the model has them, else the run's first and last visualised layer. Correspondence needs
part boxes: ``correspondence_parts``, else the packaged face boxes for the demo net; for any
other model it is skipped with the reason logged and shown in the report.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from deconvis.analysis.common import jsonable
from deconvis.analysis.correspondence import correspondence, load_part_boxes, plot_correspondence
from deconvis.analysis.correspondence_run import CorrespondenceConfig, DEMO_PARTS, part_inputs, parts_path
from deconvis.analysis.diagnose import conv_modules, diagnose
from deconvis.analysis.diagnose_plot import plot_diagnose
from deconvis.analysis.diagnose_run import DiagnoseConfig
from deconvis.analysis.invariance import invariance, plot_invariance
from deconvis.analysis.invariance_run import InvarianceConfig, sweeps
from deconvis.analysis.occlusion import occlusion
from deconvis.analysis.occlusion_figure import render_occlusion
from deconvis.analysis.occlusion_run import OcclusionConfig, class_names_of
from deconvis.errors import DeconvisError
from deconvis.io.atomic import write_json, write_text
from deconvis.io.images import UnreadableImage, normalize, preprocess_image
from deconvis.io.models import Preprocess
from deconvis.mirror.deconvnet import DeconvNet
from deconvis.render.sheets import safe_name
from deconvis.runs.config import ANALYSES, VisualizeConfig
from deconvis.runs.results import AnalysisRecord, Results

log = logging.getLogger("deconvis")

ANALYSIS_DIR = "analyses"
#: bumped when an analysis's outputs change meaning (recompute old ones)
FORMAT = 1


@dataclass
class Inputs:
    """What the analyses share: the model and the run's images (``images``: normalised network
    inputs [n, 3, H, W] on the model's device; ``shown``: the displayed uint8 [H, W, 3] images)."""

    cfg: VisualizeConfig
    model: torch.nn.Module
    pp: Preprocess
    names: List[str]
    images: Tensor
    shown: List[np.ndarray]
    layers: List[str]          # the run's visualised layers (labels), in order
    source: Any                # the run's ImageSource (diagnose reads more of it)
    config_dir: Optional[str] = None


# an analysis: (inputs, its settings) -> (settings for the hash) and (inputs, settings, out folder) -> record
Plan = Callable[[Inputs], Dict[str, Any]]
Run = Callable[[Inputs, Dict[str, Any], str, str], AnalysisRecord]


def analysis_dir(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, ANALYSIS_DIR, name)


def settings_hash(settings: Dict[str, Any]) -> str:
    """SHA-256 (16 hex digits) of the canonical JSON of ``settings``."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_images(source, pp: Preprocess, n: int, device: torch.device) -> Tuple[List[str], List[np.ndarray], Tensor]:
    """The first ``n`` readable images of ``source`` (unreadable ones skipped): names, displayed
    uint8 [H, W, 3] and normalised inputs [n, 3, H, W] on ``device``."""
    names, shown, xs = [], [], []
    for i in range(len(source)):
        if len(xs) >= n:
            break
        try:
            rgb = source.load(i)
        except UnreadableImage:
            continue
        d = preprocess_image(rgb, pp)
        names.append(source.name(i))
        shown.append(d)
        xs.append(normalize(d, pp))
    if not xs:
        raise DeconvisError("the analyses found no readable image in the run's image set")
    return names, shown, torch.stack(xs).to(device)


def pick_layers(model: torch.nn.Module, preferred: List[str], run_layers: List[str]) -> List[str]:
    """``preferred`` when the model has every one of them, else the run's first and last layer."""
    dn = DeconvNet(model)
    try:
        for name in preferred:
            dn.resolve(name)
        return list(preferred)
    except (DeconvisError, KeyError):
        return list(dict.fromkeys([run_layers[0], run_layers[-1]]))


def _rel(run_dir: str, path: str) -> str:
    return os.path.relpath(path, run_dir).replace(os.sep, "/")


def _finish(run_dir: str, out: str, name: str, settings: Dict[str, Any], record: AnalysisRecord,
            result: Dict[str, Any]) -> AnalysisRecord:
    """Write ``<name>.json`` (settings, hash, record, result) last and atomically."""
    path = os.path.join(out, f"{name}.json")
    record.files = {"json": _rel(run_dir, path), **record.files}
    record.settings_hash = settings_hash(settings)
    write_json(path, jsonable({"analysis": name, "settings": settings, "settings_hash": record.settings_hash,
                               "record": asdict(record), "result": result}))
    return record


# -- the analyses ----------------------------------------------------------------------------------

_INVARIANCE_KEYS = ("transforms", "translate_frac", "translate_steps", "scale_max", "scale_steps", "rotate_steps",
                    "fill", "batch_size")


def _plan_invariance(inp: Inputs) -> Dict[str, Any]:
    d = InvarianceConfig()
    return {"layers": pick_layers(inp.model, d.layers, inp.layers), **{k: getattr(d, k) for k in _INVARIANCE_KEYS}}


def _run_invariance(inp: Inputs, s: Dict[str, Any], run_dir: str, out: str) -> AnalysisRecord:
    d = InvarianceConfig(**{k: s[k] for k in _INVARIANCE_KEYS}, layers=s["layers"])
    res = invariance(inp.model, inp.images, s["layers"], sweeps(d, inp.images.shape[-2]), fill=d.fill, pp=inp.pp,
                     names=inp.names, batch_size=d.batch_size)
    png = os.path.join(out, "invariance.png")
    plot_invariance(res, png)
    rows = [[sw.transform, f"{sw.amounts[0]:g}..{sw.amounts[-1]:g} {sw.unit}"]
            + [float(sw.relative[l].max()) for l in res.layers] + [float(sw.probability.min())] for sw in res.sweeps]
    rec = AnalysisRecord("invariance", "done", files={"png": _rel(run_dir, png)},
                         headers=["transform", "range"] + [f"max distance/|f(x)| {l}" for l in res.layers]
                         + ["min p(true class)"], rows=rows,
                         notes=[f"{len(res.images)} images; maxima and minima over images and amounts; border fill "
                                f"{res.fill}; ZF Fig. 5"])
    return _finish(run_dir, out, "invariance", s, rec, res.to_dict())


def _parts_file(cfg: VisualizeConfig, config_dir: Optional[str]) -> Tuple[Optional[str], str]:
    """(part-box file, '') or (None, why the correspondence analysis is skipped); a relative
    ``correspondence_parts`` path missing from the working directory is tried in ``config_dir``."""
    spec = cfg.correspondence_parts
    if spec:
        path = parts_path(spec)
        if not os.path.isabs(path) and not os.path.isfile(path) and config_dir:
            path = os.path.join(config_dir, path)
        return path, ""
    if cfg.model == "zfnet_demo":
        return parts_path(DEMO_PARTS), ""
    return None, (f"no part boxes for model {cfg.model!r}: the packaged face boxes fit the demo net only; "
                  "give --correspondence-parts FILE")


def _plan_correspondence(inp: Inputs) -> Dict[str, Any]:
    d = CorrespondenceConfig()
    path, why = _parts_file(inp.cfg, inp.config_dir)
    digest = ""
    if path is not None and os.path.isfile(path):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"parts": path, "parts_digest": digest, "skip": why, "layers": pick_layers(inp.model, d.layers, inp.layers),
            "random_trials": d.random_trials, "seed": d.seed, "fill": d.fill}


def _run_correspondence(inp: Inputs, s: Dict[str, Any], run_dir: str, out: str) -> AnalysisRecord:
    if s["skip"]:
        return AnalysisRecord("correspondence", "skipped", reason=s["skip"])
    keys, x, boxes = part_inputs(load_part_boxes(s["parts"]), s["parts"], inp.pp)
    res = correspondence(inp.model, x.to(inp.images.device), boxes, s["layers"], s["random_trials"], s["seed"],
                         s["fill"], inp.pp, names=keys)
    png, md = os.path.join(out, "correspondence.png"), os.path.join(out, "correspondence.md")
    plot_correspondence(res, png)
    write_text(md, res.markdown())
    rec = AnalysisRecord("correspondence", "done", files={"png": _rel(run_dir, png), "md": _rel(run_dir, md)},
                         headers=["mask"] + [f"Delta {l}" for l in res.layers],
                         rows=[[r] + [c[l].mean for l in res.layers] for r, c in res.table.items()],
                         notes=[f"{len(res.images)} images of {os.path.basename(s['parts'])}; Delta = mean over image "
                                "pairs of the fraction of feature signs that differ (lower = more consistent); "
                                f"random rows: {res.random_trials} trials; ZF Table 1"])
    return _finish(run_dir, out, "correspondence", s, rec, res.to_dict())


def _plan_diagnose(inp: Inputs) -> Dict[str, Any]:
    d = DiagnoseConfig()
    keys = ("dominating_factor", "fft_size", "band_low", "band_high", "alias_layer", "alias_images",
            "alias_halfwidth", "alias_stride", "batch_size")
    return {"diagnose_images": min(len(inp.source), max(inp.cfg.analysis_images, d.alias_images)),
            **{k: getattr(d, k) for k in keys}}


def _run_diagnose(inp: Inputs, s: Dict[str, Any], run_dir: str, out: str) -> AnalysisRecord:
    _, _, x = load_images(inp.source, inp.pp, s["diagnose_images"], inp.images.device)
    alias = None if str(s["alias_layer"]).lower() in ("none", "") else s["alias_layer"]
    res = diagnose(inp.model, x, None, s["dominating_factor"], s["fft_size"], (s["band_low"], s["band_high"]), alias,
                   s["alias_images"], s["alias_halfwidth"], s["batch_size"], s["alias_stride"])
    png, md = os.path.join(out, "diagnose.png"), os.path.join(out, "diagnose.md")
    plot_diagnose(res, conv_modules(inp.model)[0][1].weight, png,
                  title=f"{inp.cfg.model} ({inp.cfg.weights}): architecture diagnosis (ZF Fig. 6)")
    write_text(md, res.markdown())
    b = res.band_fractions.mean(0)
    notes = [f"{res.images} images; first layer {res.first_conv} (stride {res.stride}) energy low/mid/high "
             f"{b[0]:.3f}/{b[1]:.3f}/{b[2]:.3f}",
             f"dominating filters (RMS > {res.dominating_factor:g} x median): "
             + ", ".join(f"{f.module} {len(f.dominating)}/{f.filters}" for f in res.filters)]
    if res.aliasing is not None:
        notes.append(f"aliasing of {res.alias_layer} at the stride-{res.aliasing.stride} lattice: "
                     f"{res.aliasing.fraction:.4f} of the non-DC energy ({res.aliasing.ratio:.2f}x white)")
    rec = AnalysisRecord("diagnose", "done", files={"png": _rel(run_dir, png), "md": _rel(run_dir, md)},
                         headers=["layer", "channels", "dead"],
                         rows=[[l, res.widths[l], len(v)] for l, v in res.dead.items()], notes=notes)
    return _finish(run_dir, out, "diagnose", s, rec, res.to_dict())


def _plan_occlusion(inp: Inputs) -> Dict[str, Any]:
    d = OcclusionConfig()
    side = int(min(inp.images.shape[-2:]))
    scale = side / 224.0  # the subcommand's square and stride are for a 224 px input (ZF: 32 and 8 px)
    return {"layer": d.layer, "size": max(1, min(side, round(d.size * scale))), "stride": max(1, round(d.stride * scale)),
            "fill": d.fill, "target": d.target, "batch_size": d.batch_size, "rule": inp.cfg.rule}


def _run_occlusion(inp: Inputs, s: Dict[str, Any], run_dir: str, out: str) -> AnalysisRecord:
    classes = class_names_of(inp.cfg.model, inp.cfg.weights)
    files, rows, results = {}, [], []
    for i, name in enumerate(inp.names):
        res = occlusion(inp.model, inp.images[i], layer=s["layer"], size=s["size"], stride=s["stride"],
                        fill=s["fill"], target=s["target"], batch_size=s["batch_size"], class_names=classes,
                        rule=s["rule"])
        png = os.path.join(out, f"{i:02d}_{safe_name(os.path.splitext(name)[0])}.png")
        render_occlusion(res, inp.shown[i], png, title=f"{inp.cfg.model} on {name}: occlusion sensitivity (ZF Fig. 7)")
        files["png" if i == 0 else f"png {i + 1}"] = _rel(run_dir, png)
        rows.append([name, res.layer_label, res.channel, res.name(res.target), res.clean_probability,
                     float(res.probability.min()), len(res.tops_y) * len(res.tops_x)])
        results.append(dict(res.to_json(), image=name))
    rec = AnalysisRecord("occlusion", "done", files=files,
                         headers=["image", "layer", "map", "target", "p(target) unoccluded", "min p(target) occluded",
                                  "positions"], rows=rows,
                         notes=[f"square {s['size']} px, stride {s['stride']} px (the subcommand's 32/8 px at 224 px, "
                                f"scaled to this input), fill {s['fill']}; ZF Fig. 7"])
    return _finish(run_dir, out, "occlusion", s, rec, {"images": results})


#: name -> (settings of this run, runner)
REGISTRY: Dict[str, Tuple[Plan, Run]] = {
    "invariance": (_plan_invariance, _run_invariance),
    "correspondence": (_plan_correspondence, _run_correspondence),
    "diagnose": (_plan_diagnose, _run_diagnose),
    "occlusion": (_plan_occlusion, _run_occlusion),
}
assert set(REGISTRY) == set(ANALYSES)


# -- the phase -------------------------------------------------------------------------------------

def check_analyses(cfg: VisualizeConfig, config_dir: Optional[str] = None) -> None:
    """Checks of ``--analyses`` that need files, before any mining: a ``correspondence_parts``
    file exists and parses. DeconvisError otherwise."""
    if "correspondence" in cfg.analyses and cfg.correspondence_parts:
        load_part_boxes(_parts_file(cfg, config_dir)[0] or "")


def saved_record(run_dir: str, name: str, h: str) -> Optional[AnalysisRecord]:
    """The record of a finished analysis ``name`` computed with settings hash ``h`` whose files are
    all on disk; None when it must be (re)computed."""
    path = os.path.join(analysis_dir(run_dir, name), f"{name}.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        rec = AnalysisRecord(**d["record"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if d.get("settings_hash") != h or rec.settings_hash != h:
        return None
    if not all(os.path.isfile(os.path.join(run_dir, p)) for p in rec.files.values()):
        return None
    return rec


def _one(inp: Inputs, name: str, mining_hash: str, run_dir: str) -> AnalysisRecord:
    """Analysis ``name``: its saved record when current, else run it. An analysis the model does
    not allow (a DeconvisError: no class scores, a square larger than the image, ...) is skipped
    with that reason, so the sheets and the report still come out."""
    plan, run = REGISTRY[name]
    t = time.perf_counter()
    try:
        settings = {"format": FORMAT, "mining_hash": mining_hash, "images": inp.names, **plan(inp)}
        h = settings_hash(settings)
        rec = saved_record(run_dir, name, h)
        if rec is not None:
            log.info("analysis %s: done earlier (settings unchanged), not recomputed", name)
            return rec
        out = analysis_dir(run_dir, name)
        os.makedirs(out, exist_ok=True)
        rec = run(inp, settings, run_dir, out)
    except DeconvisError as exc:
        rec = AnalysisRecord(name, "skipped", reason=str(exc))
    rec.seconds = round(time.perf_counter() - t, 3)
    if rec.status == "skipped":
        log.warning("analysis %s skipped: %s", name, rec.reason)
    else:
        log.info("analysis %s: %.1f s -> %s", name, rec.seconds, rec.files.get("png", ""))
    return rec


def analyses_phase(ctx, res: Results, config_dir: Optional[str] = None,
                   poll: Optional[Callable[[], None]] = None) -> Dict[str, AnalysisRecord]:
    """Run (or reuse) every analysis of ``ctx.cfg.analyses``; their records replace
    ``res.analyses``. ``ctx``: the run's :class:`~deconvis.runs.phases.prepare.Context`;
    ``config_dir``: where a relative ``correspondence_parts`` path is also looked for."""
    cfg = ctx.cfg
    records: Dict[str, AnalysisRecord] = {}
    if not cfg.analyses:
        res.analyses = records
        return records
    names, shown, x = load_images(ctx.source, ctx.preprocess, cfg.analysis_images, ctx.device)
    inp = Inputs(cfg=cfg, model=ctx.loaded.model, pp=ctx.preprocess, names=names, images=x, shown=shown,
                 layers=[s.label for s in ctx.specs], source=ctx.source,
                 config_dir=config_dir)
    was = inp.model.training
    inp.model.eval()
    try:
        for name in cfg.analyses:
            records[name] = _one(inp, name, res.mining_hash, ctx.run_dir)
            if poll is not None:
                poll()
    finally:
        inp.model.train(was)
    res.analyses = records
    return records
