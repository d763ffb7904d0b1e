"""The ZF Fig. 2 pipeline: mine the top-k -> project them -> render sheets -> write the report.

``run(cfg)`` does all four phases into ``<out>/<run>/``:

1. **mine** -- stream the image set once through ``DeconvNet.activations`` and keep the k
   strongest images per channel (:mod:`deconvis.mining`); checkpointed every
   ``checkpoint_every`` batches to ``mining_state.pt`` and resumed from it;
2. **project** -- re-forward the winners' images and project every winner with
   ``DeconvNet.project_window``; saves two tiles per winner (``tiles/<layer>/...``);
3. **render** -- compose per-layer sheets ``layer_<label>_pNNN.png`` from the tiles;
4. **report** -- ``index.html`` to browse it all.

Resuming: everything is written atomically and a restarted run with the same config skips what
is done -- a finished mining (``results.json``), tiles already on disk, sheets whose inputs did
not change. A run folder holding a run with a different mining configuration is an error (pass
``fresh`` to discard it). ``render_only`` re-renders sheets and the report from
``results.json`` and the saved tiles without loading the model or the images.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from deconvis import config as config_mod
from deconvis import mining, render, report, results as results_mod
from deconvis.atomic import save_torch, write_png
from deconvis.config import VisualizeConfig
from deconvis.device import resolve_device
from deconvis.data import ImageDataset, ImageSource, make_loader, open_images, parse_images_spec
from deconvis.errors import DeconvisError
from deconvis.models import Preprocess
from deconvis.results import ChannelResult, LayerResult, Results, Winner

log = logging.getLogger("deconvis")

STATE_FILE = "mining_state.pt"
LOG_FILE = "run.log"
REPORT_FILE = "index.html"
STATE_FORMAT = 1
#: during projection, results.json is re-saved at most this often (seconds) so a resume keeps tiles
SAVE_EVERY_S = 30.0


@dataclass
class Outcome:
    """What a run did: where, over how many images, and how long each phase took (seconds)."""

    run_dir: str
    results: Results
    n_images: int
    mined: bool = False
    projected: int = 0
    sheets: List[str] = field(default_factory=list)
    report: str = ""
    seconds: Dict[str, float] = field(default_factory=dict)


@dataclass
class Context:
    """Everything prepared (and validated) before any work starts."""

    cfg: VisualizeConfig
    run_dir: str
    device: torch.device
    dtype: torch.dtype
    loaded: Any                    # models.LoadedModel
    dn: Any                        # deconvnet.DeconvNet
    layers: List[str]              # step names
    labels: Dict[str, str]         # step name -> display label
    channels_total: Dict[str, int]
    map_size: Dict[str, List[int]]
    preprocess: Preprocess
    source: ImageSource
    identity: Dict[str, Any]       # what decides the winners
    mining_hash: str
    projection_hash: str


# ---------------------------------------------------------------------------------------------
# small helpers

def resolve_weights(weights: str, config_dir: Optional[str] = None) -> str:
    """``asset:NAME`` -> the file in ``deconvis/assets``; relative checkpoint paths that do not
    exist from the working directory are tried against ``config_dir``."""
    if weights.startswith("asset:"):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", weights[len("asset:"):])
        if not os.path.isfile(path):
            raise DeconvisError(f"weights {weights!r}: {path} does not exist; this checkout has no trained demo "
                                "checkpoint yet: train it (deconvis train) or use --weights random")
        return path
    if weights.lower() == "random" or os.path.isabs(weights) or os.path.exists(weights):
        return weights
    if config_dir and os.path.exists(os.path.join(config_dir, weights)):
        return os.path.join(config_dir, weights)
    return weights


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _weights_id(weights: str, seed: int) -> str:
    if os.path.isfile(weights):
        return "sha256:" + _file_digest(weights)
    if weights.lower() == "random":
        return f"random(seed={seed})"
    return weights


def _names_digest(source: ImageSource) -> str:
    h = hashlib.sha256()
    for i in range(len(source)):
        h.update(source.name(i).encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _run_log(run_dir: str) -> Iterator[None]:
    """Append this run's log records to ``run_dir/run.log``."""
    handler = logging.FileHandler(os.path.join(run_dir, LOG_FILE), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    old_level = log.level
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(old_level)


def _diff(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(parts[:4]) + (" ..." if len(parts) > 4 else "")


def _clear_run(run_dir: str) -> None:
    """``--fresh``: remove what earlier runs wrote into ``run_dir`` (never other files)."""
    for name in (STATE_FILE, results_mod.FILENAME, REPORT_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, name))
    shutil.rmtree(os.path.join(run_dir, "tiles"), ignore_errors=True)
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith("layer_") and name.endswith(".png"):
                os.remove(os.path.join(run_dir, name))


# ---------------------------------------------------------------------------------------------
# phase 0: prepare and validate everything before any work

def prepare(cfg: VisualizeConfig, run_dir: str, config_dir: Optional[str] = None) -> Context:
    """Load the model and image set, resolve layers, check they can be mined and projected.

    All user errors surface here, before any mining."""
    from deconvis.deconvnet import DeconvNet
    from deconvis.models import load_model

    device = resolve_device(cfg.device)
    parse_images_spec(cfg.images)
    source = open_images(cfg.images, cfg.max_images, base_dir=config_dir)
    weights = resolve_weights(cfg.weights, config_dir)
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, weights, device)
    pp = loaded.preprocess
    if cfg.resize is not None or cfg.crop is not None:
        crop = (cfg.crop, cfg.crop) if cfg.crop is not None else pp.crop
        resize = cfg.resize if cfg.resize is not None else max(1, round(crop[0] * pp.resize / pp.crop[0]))
        pp = dataclasses.replace(pp, resize=int(resize), crop=(int(crop[0]), int(crop[1])))
    dn = DeconvNet(loaded.model)
    if cfg.layers:
        layers: List[str] = []
        for name in cfg.layers:
            step = dn.resolve(name)
            if step not in layers:
                layers.append(step)
    else:
        layers = dn.conv_layers()
        if not layers:
            raise DeconvisError(f"model {cfg.model!r} has no conv layers; name --layers explicitly")
    dtype = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()), torch.float32)
    # dry run on one grey image: map sizes, and that every layer can be projected
    probe = torch.zeros(1, 3, *pp.crop, device=device, dtype=dtype)
    acts = dn.forward(probe)
    map_size: Dict[str, List[int]] = {}
    channels_total: Dict[str, int] = {}
    for name in layers:
        a = acts[name]
        if a.dim() not in (2, 4):
            raise DeconvisError(f"layer {name!r} has output shape {list(a.shape)}; choose layers with [N, C, h, w] maps")
        channels_total[name] = int(a.shape[1])
        map_size[name] = [int(a.shape[2]), int(a.shape[3])] if a.dim() == 4 else [1, 1]
        dn.project_window(name, torch.zeros(1, 4, dtype=torch.long), rule=cfg.rule)
    labels = {name: dn.display_name(name) for name in layers}
    identity = {key: config_mod.to_dict(cfg)[key] for key in config_mod.MINING_KEYS}
    identity.update({
        "layers": layers,                                   # resolved: an alias and its module agree
        "weights_id": _weights_id(weights, cfg.seed),
        "images": source.spec if isinstance(cfg.images, str) else cfg.images,
        "n_images": len(source),
        "images_digest": _names_digest(source),
        "preprocess": pp.to_dict(),                         # replaces resize/crop
    })
    for key in ("resize", "crop", "seed"):  # seed matters through weights_id (random weights) only
        identity.pop(key, None)
    mining_hash = config_mod.config_hash(identity, sorted(identity))
    projection_hash = config_mod.config_hash({"mining": mining_hash, "rule": cfg.rule}, ["mining", "rule"])
    return Context(cfg=cfg, run_dir=run_dir, device=device, dtype=dtype, loaded=loaded, dn=dn, layers=layers,
                   labels=labels, channels_total=channels_total, map_size=map_size, preprocess=pp,
                   source=source, identity=identity, mining_hash=mining_hash, projection_hash=projection_hash)


# ---------------------------------------------------------------------------------------------
# phase 1: mining

def _state_blob(ctx: Context, topk: mining.TopK, complete: bool) -> Dict[str, Any]:
    return {"format": STATE_FORMAT, "mining_hash": ctx.mining_hash, "identity": json.dumps(ctx.identity),
            "complete": complete, "topk": topk.state_dict()}


def load_state(path: str) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DeconvisError(f"cannot read mining state {path} ({type(exc).__name__}: {exc}); "
                            "re-run with --fresh") from exc


def mine_phase(ctx: Context) -> mining.TopK:
    """Mine the top-k (resuming from ``mining_state.pt``); returns the complete state."""
    cfg = ctx.cfg
    path = os.path.join(ctx.run_dir, STATE_FILE)
    topk = mining.TopK(ctx.layers, cfg.k, ctx.device)
    if os.path.isfile(path):
        blob = load_state(path)
        if blob.get("mining_hash") != ctx.mining_hash:
            old = json.loads(blob.get("identity", "{}"))
            raise DeconvisError(f"{ctx.run_dir} holds a mining state for a different configuration "
                                f"({_diff(old, ctx.identity)}); pass --fresh to discard it or --run NAME for a new run")
        topk.load_state_dict(blob["topk"])
        if blob.get("complete"):
            log.info("mining already complete (%d images), loaded %s", topk.seen, path)
            return topk
        log.info("resuming mining at image %d of %d from %s", topk.seen, len(ctx.source), path)

    def checkpoint(t: mining.TopK) -> None:
        save_torch(_state_blob(ctx, t, complete=False), path)

    dataset = ImageDataset(ctx.source, ctx.preprocess, start=topk.seen)
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, pin_memory=ctx.device.type == "cuda")
    dn, layers = ctx.dn, ctx.layers
    n_skipped_before = len(topk.skipped)
    mining.mine(lambda x: dn.activations(x, layers), loader, topk, channels=cfg.channels, dtype=ctx.dtype,
                checkpoint_every=cfg.checkpoint_every, on_checkpoint=checkpoint, total=len(ctx.source),
                progress=cfg.progress)
    for i in topk.skipped[n_skipped_before:]:
        log.warning("skipped unreadable image %d: %s", i, ctx.source.path(i))
    save_torch(_state_blob(ctx, topk, complete=True), path)
    return topk


def build_results(ctx: Context, topk: mining.TopK) -> Results:
    """Winners of every layer/channel as a :class:`Results` (not yet projected)."""
    cfg = ctx.cfg
    used: Dict[int, Dict[str, str]] = {}
    layers: List[LayerResult] = []
    for name in ctx.layers:
        w = topk.winners(name)
        vals, imgs, ys, xs, valid = (w[f].tolist() for f in ("values", "images", "ys", "xs", "valid"))
        units = []
        for c in range(len(vals)):
            winners = []
            for r in range(cfg.k):
                if not valid[c][r]:
                    continue
                i = int(imgs[c][r])
                if i not in used:
                    used[i] = {"name": ctx.source.name(i), "path": ctx.source.path(i)}
                winners.append(Winner(rank=r, image=i, source=used[i]["name"], activation=float(vals[c][r]),
                                      y=int(ys[c][r]), x=int(xs[c][r])))
            units.append(ChannelResult(channel=c, winners=winners))
        layers.append(LayerResult(name=name, label=ctx.labels[name], channels=len(units),
                                  channels_total=ctx.channels_total[name], map_size=ctx.map_size[name],
                                  units=units))
    skipped = [{"id": i, "path": ctx.source.path(i)} for i in topk.skipped]
    return Results(
        config=config_mod.to_dict(cfg), mining_hash=ctx.mining_hash, mining_identity=dict(ctx.identity),
        projection_hash="",
        model={"spec": cfg.model, "weights": cfg.weights, "weights_id": ctx.identity["weights_id"]},
        preprocess=ctx.preprocess.to_dict(), input_size=list(ctx.preprocess.crop), rule=cfg.rule,
        images={"spec": ctx.identity["images"], "count": len(ctx.source), "readable": len(ctx.source) - len(skipped),
                "skipped": skipped, "items": {str(i): used[i] for i in sorted(used)}},
        layers=layers, status="mined")


# ---------------------------------------------------------------------------------------------
# phase 2: projection

def _tiles_done(run_dir: str, w: Winner) -> bool:
    if w.box is None or w.tiles is None:
        return False
    for p in w.tiles.values():
        full = os.path.join(run_dir, p)
        if not os.path.isfile(full) or os.path.getsize(full) == 0:
            return False
    return True


def project_phase(ctx: Context, res: Results) -> int:
    """Project every winner whose tiles are missing; returns how many were projected."""
    cfg = ctx.cfg
    if res.projection_hash != ctx.projection_hash:
        if res.projection_hash:
            log.info("projection rule changed (%s -> %s): re-projecting every unit", res.rule, cfg.rule)
        for lr in res.layers:
            for u in lr.units:
                for w in u.winners:
                    w.box = w.box_clipped = w.tiles = None
        res.projection_hash, res.rule = ctx.projection_hash, cfg.rule
    h, w_img = ctx.preprocess.crop
    jobs: List[render.TileJob] = []
    index: Dict[Tuple[str, int, int], Tuple[LayerResult, Winner]] = {}
    for lr in res.layers:
        for u in lr.units:
            for wnr in u.winners:
                if _tiles_done(ctx.run_dir, wnr):
                    continue
                jobs.append(render.TileJob(lr.name, u.channel, wnr.rank, wnr.image, wnr.y, wnr.x))
                index[(lr.name, u.channel, wnr.rank)] = (lr, wnr)
    if not jobs:
        return 0
    log.info("projecting %d units (rule %s)", len(jobs), cfg.rule)
    last_save = [time.monotonic()]

    def sink(job: render.TileJob, rec, img, box) -> None:
        lr, wnr = index[(job.layer, job.channel, job.rank)]
        paths = render.tile_paths(lr.label, job.channel, job.rank)
        write_png(os.path.join(ctx.run_dir, paths["rec"]), rec, durable=False)  # atomic; re-creatable
        write_png(os.path.join(ctx.run_dir, paths["img"]), img, durable=False)
        clipped, _ = render.clip_box(box, h, w_img)
        wnr.box, wnr.box_clipped, wnr.tiles = list(box), list(clipped), paths
        if lr.rf is None:
            lr.rf = [box[1] - box[0], box[3] - box[2]]
        if time.monotonic() - last_save[0] >= SAVE_EVERY_S:  # keep results.json current for a resume
            results_mod.save(res, ctx.run_dir)
            last_save[0] = time.monotonic()

    dataset = ImageDataset(ctx.source, ctx.preprocess)
    n = render.project_jobs(ctx.dn, dataset, jobs, rule=cfg.rule, batch_size=cfg.batch_size,
                            project_batch=cfg.project_batch, device=ctx.device, dtype=ctx.dtype, sink=sink,
                            progress=cfg.progress)
    return n


# ---------------------------------------------------------------------------------------------
# phase 3 + 4: sheets and report

def _sheets_hash(res: Results, lr: LayerResult, cfg: VisualizeConfig) -> str:
    winners = [(u.channel, w.rank, w.image, w.activation, w.tiles is not None) for u in lr.units for w in u.winners]
    data = {"projection": res.projection_hash, "winners": winners, "rf": lr.rf, "k": res.config.get("k"),
            "render": [cfg.per_sheet, cfg.sheet_columns, cfg.min_tile, cfg.max_tile], "v": 2}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def render_phase(res: Results, run_dir: str, cfg: VisualizeConfig, force: bool = False) -> List[str]:
    """Write each layer's sheets (skipping layers whose sheets are current unless ``force``)."""
    k = int(res.config.get("k", cfg.k))
    written: List[str] = []
    n_images = res.images.get("readable", res.images.get("count"))
    for lr in res.layers:
        h = _sheets_hash(res, lr, cfg)
        current = lr.sheets_hash == h and lr.sheets and all(os.path.isfile(os.path.join(run_dir, s)) for s in lr.sheets)
        if current and not force:
            continue
        missing = sum(1 for u in lr.units for w in u.winners if not w.tiles)
        if missing:
            log.warning("layer %s: %d units have no tiles; they show as empty cells", lr.label, missing)
        sheets = render.render_layer(lr, run_dir, k=k, per_sheet=cfg.per_sheet, columns=cfg.sheet_columns,
                                     min_tile=cfg.min_tile, max_tile=cfg.max_tile, n_images=n_images)
        for old in set(lr.sheets) - set(sheets):  # pages of an earlier, longer layout
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, old))
        lr.sheets, lr.sheets_hash = sheets, h
        written.extend(sheets)
    return written


# ---------------------------------------------------------------------------------------------
# the whole run

def run(cfg: VisualizeConfig, config_dir: Optional[str] = None) -> Outcome:
    """Run (or resume, or re-render) the top-k visualisation described by ``cfg``."""
    config_mod.validate(cfg)
    run_dir = os.path.join(cfg.out, cfg.run)
    if cfg.render_only and not os.path.isfile(os.path.join(run_dir, results_mod.FILENAME)):
        raise DeconvisError(f"--render-only: {os.path.join(run_dir, results_mod.FILENAME)} does not exist; "
                            "run without --render-only first (check --out and --run)")
    os.makedirs(run_dir, exist_ok=True)
    with _run_log(run_dir):
        log.info("visualize: run %s -> %s", cfg.run, os.path.abspath(run_dir))
        if cfg.render_only:
            return _render_only(cfg, run_dir)
        if cfg.fresh:
            log.info("--fresh: discarding earlier results in %s", run_dir)
            _clear_run(run_dir)
        t0 = time.perf_counter()
        ctx = prepare(cfg, run_dir, config_dir)
        seconds: Dict[str, float] = {"prepare": time.perf_counter() - t0}
        log.info("model %s (weights %s) on %s; %d layers: %s; %d images from %s; input %dx%d",
                 cfg.model, cfg.weights, ctx.device, len(ctx.layers),
                 ", ".join(ctx.labels[n] for n in ctx.layers), len(ctx.source), ctx.source.spec, *ctx.preprocess.crop)
        res: Optional[Results] = None
        res_path = os.path.join(run_dir, results_mod.FILENAME)
        if os.path.isfile(res_path):
            old = results_mod.load(run_dir)
            if old.mining_hash != ctx.mining_hash:
                raise DeconvisError(f"{run_dir} holds results of a different configuration "
                                    f"({_diff(old.mining_identity, ctx.identity)}); pass --fresh to discard them "
                                    "or --run NAME for a new run")
            res = old
            res.config = config_mod.to_dict(cfg)
        mined = False
        if res is None:
            t = time.perf_counter()
            topk = mine_phase(ctx)
            seconds["mine"] = time.perf_counter() - t
            mined = True
            n_ok = topk.seen - len(topk.skipped)
            if topk.skipped:
                log.warning("%d unreadable images skipped (listed above)", len(topk.skipped))
            if n_ok == 0:
                raise DeconvisError(f"none of the {len(ctx.source)} images of {ctx.source.spec!r} could be read")
            if n_ok < cfg.k:
                log.warning("only %d readable images for k=%d: channels get fewer than k winners", n_ok, cfg.k)
            log.info("mined %d images in %.1f s (%.1f images/s)", topk.seen, seconds["mine"],
                     topk.seen / max(seconds["mine"], 1e-9))
            res = build_results(ctx, topk)
            res.stats = {"mining_seconds": round(seconds["mine"], 3), "images": topk.seen}
            results_mod.save(res, run_dir)
        t = time.perf_counter()
        n_proj = project_phase(ctx, res)
        seconds["project"] = time.perf_counter() - t
        if n_proj:
            log.info("projected %d units in %.1f s", n_proj, seconds["project"])
        res.status = "projected"
        results_mod.save(res, run_dir)
        t = time.perf_counter()
        sheets = render_phase(res, run_dir, cfg)
        res.status = "rendered"
        results_mod.save(res, run_dir)
        report_path = report.write_report(res, run_dir)
        seconds["render"] = time.perf_counter() - t
        log.info("wrote %d sheets and %s in %.1f s", len(sheets), report_path, seconds["render"])
        return Outcome(run_dir=run_dir, results=res, n_images=int(res.images.get("count", 0)), mined=mined,
                       projected=n_proj, sheets=[s for lr in res.layers for s in lr.sheets], report=report_path,
                       seconds=seconds)


def _render_only(cfg: VisualizeConfig, run_dir: str) -> Outcome:
    t = time.perf_counter()
    res = results_mod.load(run_dir)
    missing = sum(1 for lr in res.layers for u in lr.units for w in u.winners if not _tiles_done(run_dir, w))
    if missing:
        log.warning("%d units have no saved tiles (the run was interrupted before projecting them): they show as "
                    "empty cells; run without --render-only to finish", missing)
    render_phase(res, run_dir, cfg, force=True)
    results_mod.save(res, run_dir)
    report_path = report.write_report(res, run_dir)
    secs = time.perf_counter() - t
    log.info("re-rendered %s in %.1f s", run_dir, secs)
    return Outcome(run_dir=run_dir, results=res, n_images=int(res.images.get("count", 0)),
                   sheets=[s for lr in res.layers for s in lr.sheets], report=report_path,
                   seconds={"render": secs})
