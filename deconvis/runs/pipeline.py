"""The ZF Fig. 2 pipeline: mine the top-k -> project them -> render sheets -> write the report.

``run(cfg)`` does all four phases into ``<out>/<run>/``:

1. **mine** -- stream the image set once through ``DeconvNet.activations`` (under
   ``torch.inference_mode``, optionally autocast ``amp`` and ``channels_last``) and keep the k
   strongest images per channel (:mod:`deconvis.mining`); checkpointed every
   ``checkpoint_every`` batches to ``mining_state.pt`` and resumed from it. Where the time went
   (loading/decoding, forward, top-k update) is logged and kept in ``results.json`` stats;
2. **project** -- re-forward the winners' images and project every winner with
   ``DeconvNet.project_window`` (batches sized by free memory unless ``project_batch`` is set);
   saves two tiles per winner (``tiles/<layer>/...``);
3. **render** -- compose per-layer sheets ``layer_<label>_pNNN.png`` from the tiles;
4. **report** -- ``index.html`` to browse it all.

Many processes (``torchrun --nproc_per_node=N [--nnodes ...] -m deconvis visualize ...``): each
rank mines its shard of the images (:class:`deconvis.runs.distributed.ShardSampler`) with its own
checkpoint ``mining_state.rank{r}-of{w}.pt``; the ranks' top-k merge exactly
(:func:`deconvis.runs.distributed.gather_topk`: the winners equal a one-process run's, given the same
activations -- a CPU forward's last float bits depend on its thread count); projection is
split over (layer, channel) and rendering over layers, each rank writing its own tiles and
sheets; rank 0 writes ``results.json`` and the report after the others are done. ``--out`` must
be a folder every rank sees (a shared filesystem across nodes): this is checked at the start.
Every phase runs inside :func:`deconvis.runs.distributed.phase`, so a failure on one rank ends every
rank with the same error, within about a second plus one batch; a rank that crashed or hangs is
given up on after ``dist_timeout`` seconds without progress. Only rank 0 shows progress bars.

Resuming: everything is written atomically and a restarted run with the same config skips what
is done -- a finished mining (``results.json``), tiles already on disk, sheets whose inputs did
not change. A run folder holding a run with a different mining configuration is an error (pass
``fresh`` to discard it); so is a mining checkpoint written by a different number of processes
(restart with that number, or ``fresh``). Each rank resumes from its own checkpoint at the item
of its shard where it stopped, so nothing is counted twice. ``render_only`` re-renders sheets and
the report from ``results.json`` and the saved tiles without loading the model or the images.

Test hook: the environment variable ``DECONVIS_TEST_FAIL_RANK=R`` (or ``R:B``) makes rank ``R``
raise in its ``B``-th mining forward (default the first); the tests use it to check that a failure
on one rank ends every rank with the same error. It is read in :func:`_test_fail_batch` only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, Iterator, List, Optional, Tuple

import torch

from deconvis.runs import config as config_mod
from deconvis.runs import distributed as dist_mod
from deconvis.runs import precision
from deconvis.runs import projection as projection_mod
from deconvis import mining
from deconvis.render import sheets as render
from deconvis.render import report
from deconvis.runs import results as results_mod
from deconvis.io.atomic import save_torch, write_png, write_text
from deconvis.runs.config import VisualizeConfig
from deconvis.utils.device import bf16_native, resolve_device, tf32
from deconvis.io.images import ImageDataset, ImageSource, make_loader, open_images, parse_images_spec
from deconvis.runs.distributed import DistInfo
from deconvis.errors import DeconvisError
from deconvis.io.models import Preprocess
from deconvis.runs.results import ChannelResult, LayerResult, Results, Winner

log = logging.getLogger("deconvis")

STATE_FILE = "mining_state.pt"
STATE_RE = re.compile(r"^mining_state(?:\.rank(\d+)-of(\d+))?\.pt$")
SHARE_FILE = ".deconvis-ranks"  # token rank 0 writes and every rank reads: --out is shared
TEST_FAIL_ENV = "DECONVIS_TEST_FAIL_RANK"
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
    mining: Optional[mining.MiningTimes] = None  # this rank's mining time split (None: not mined)
    rank: int = 0
    world: int = 1


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
    info: DistInfo = field(default_factory=DistInfo)
    amp: Optional[torch.dtype] = None  # autocast dtype of the mining forward


# ---------------------------------------------------------------------------------------------
# small helpers

def resolve_weights(weights: str, config_dir: Optional[str] = None) -> str:
    """``asset:NAME`` -> the file in ``deconvis/assets``; relative checkpoint paths that do not
    exist from the working directory are tried against ``config_dir``."""
    if weights.startswith("asset:"):
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", weights[len("asset:"):])
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
def _run_log(run_dir: str, info: Optional[DistInfo] = None) -> Iterator[None]:
    """Append this run's log records to ``run_dir/run.log`` (every rank appends to the same
    file, each line tagged with its rank)."""
    handler = logging.FileHandler(os.path.join(run_dir, LOG_FILE), encoding="utf-8")
    tag = f"[rank {info.rank}/{info.world}] " if info is not None and info.enabled else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s"))
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
    for name in (results_mod.FILENAME, REPORT_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, name))
    shutil.rmtree(os.path.join(run_dir, "tiles"), ignore_errors=True)
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if (name.startswith("layer_") and name.endswith(".png")) or STATE_RE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(run_dir, name))


def state_filename(info: Optional[DistInfo] = None) -> str:
    """This rank's mining checkpoint: ``mining_state.pt`` for one process, else
    ``mining_state.rank{r}-of{w}.pt``."""
    if info is None or info.world == 1:
        return STATE_FILE
    return f"mining_state.rank{info.rank}-of{info.world}.pt"


def _state_worlds(run_dir: str) -> Dict[int, List[str]]:
    """Mining checkpoints in ``run_dir`` by the number of processes that wrote them."""
    out: Dict[int, List[str]] = {}
    if os.path.isdir(run_dir):
        for name in sorted(os.listdir(run_dir)):
            m = STATE_RE.match(name)
            if m:
                out.setdefault(int(m.group(2) or 1), []).append(name)
    return out


def _check_state_world(run_dir: str, info: DistInfo) -> None:
    """A mining checkpoint of a run with another number of processes cannot be resumed."""
    other = {w: names for w, names in _state_worlds(run_dir).items() if w != info.world}
    if other:
        w, names = sorted(other.items())[0]
        shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
        raise DeconvisError(f"{run_dir} holds the mining checkpoint of a {w}-process run ({shown}) but this run has "
                            f"{info.world} process{'es' if info.world > 1 else ''}: restart with {w} processes "
                            f"(torchrun --nnodes x --nproc_per_node = {w}) to resume it, or pass --fresh to mine again")


def _test_fail_batch(rank: int) -> Optional[int]:
    """Test hook (see the module doc): the mining batch at which this rank must fail, or None."""
    spec = os.environ.get(TEST_FAIL_ENV, "").strip()
    if not spec:
        return None
    who, _, batch = spec.partition(":")
    return int(batch or 1) if int(who) == rank else None


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp`` on ``device`` (None for ``none``), or a clear error."""
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise DeconvisError(f"--amp fp16 needs a CUDA device but this run is on {device.type}; "
                                "use --amp bf16 or --amp none")
        return torch.float16
    if device.type == "cuda" and not bf16_native(device):
        raise DeconvisError(f"--amp bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 "
                            "support; use --amp fp16 or --amp none")
    if device.type not in ("cuda", "cpu", "mps"):
        raise DeconvisError(f"--amp bf16 is not supported on {device.type}; use --amp none")
    return torch.bfloat16


def _autocast(ctx: "Context") -> Any:
    if ctx.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.amp)


# ---------------------------------------------------------------------------------------------
# phase 0: prepare and validate everything before any work

def prepare(cfg: VisualizeConfig, run_dir: str, config_dir: Optional[str] = None,
            info: Optional[DistInfo] = None) -> Context:
    """Load the model and image set, resolve layers, check they can be mined and projected.

    All user errors surface here, before any mining. ``info`` (from
    :func:`deconvis.runs.distributed.session`) gives this rank's device; default: ``cfg.device``."""
    from deconvis.mirror.deconvnet import DeconvNet
    from deconvis.io.models import load_model

    device = info.device if info is not None else resolve_device(cfg.device)
    info = info if info is not None else DistInfo(device=device, timeout_s=cfg.dist_timeout)
    amp = _amp_dtype(cfg.amp, device)
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
    if amp is not None:  # the mining forward works under autocast here (an unsupported op fails now)
        try:
            with torch.autocast(device_type=device.type, dtype=amp):
                dn.activations(probe, layers)
        except DeconvisError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DeconvisError(f"--amp {cfg.amp} does not work for this model on {device.type} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0]}); use --amp none") from exc
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
    if cfg.amp != "none":  # lower precision can reorder near-ties: not resumable across precisions
        identity["amp"] = cfg.amp
    identity.update(precision.identity_extra(cfg, device))
    mining_hash = config_mod.config_hash(identity, sorted(identity))
    projection_hash = config_mod.config_hash({"mining": mining_hash, "rule": cfg.rule}, ["mining", "rule"])
    return Context(cfg=cfg, run_dir=run_dir, device=device, dtype=dtype, loaded=loaded, dn=dn, layers=layers,
                   labels=labels, channels_total=channels_total, map_size=map_size, preprocess=pp,
                   source=source, identity=identity, mining_hash=mining_hash, projection_hash=projection_hash,
                   info=info, amp=amp)


# ---------------------------------------------------------------------------------------------
# phase 1: mining

def _state_blob(ctx: Context, topk: mining.TopK, complete: bool) -> Dict[str, Any]:
    return {"format": STATE_FORMAT, "mining_hash": ctx.mining_hash, "identity": json.dumps(ctx.identity),
            "complete": complete, "rank": ctx.info.rank, "world": ctx.info.world, "topk": topk.state_dict()}


def load_state(path: str) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DeconvisError(f"cannot read mining state {path} ({type(exc).__name__}: {exc}); "
                            "re-run with --fresh") from exc


def _mining_forward(ctx: Context) -> Callable[[torch.Tensor], Dict[str, torch.Tensor]]:
    """``images -> {layer: activation}`` for mining: autocast ``amp``, ``channels_last``, and the
    test hook of the module doc."""
    dn, layers, cfg = ctx.dn, ctx.layers, ctx.cfg
    fail_at = _test_fail_batch(ctx.info.rank)
    calls = [0]

    def forward(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        calls[0] += 1
        if fail_at is not None and calls[0] >= fail_at:
            raise RuntimeError(f"{TEST_FAIL_ENV}: simulated failure in the mining forward of batch {calls[0]} "
                               f"on rank {ctx.info.rank}")
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with tf32(cfg.tf32), _autocast(ctx):
            return dn.activations(x, layers)

    return forward


def mine_phase(ctx: Context, poll: Optional[Callable[[], None]] = None) -> Tuple[mining.TopK, mining.MiningTimes]:
    """Mine this rank's shard of the images (all of them for one process), resuming from this
    rank's checkpoint; returns the rank's complete state and where its time went. ``poll`` runs
    after every batch (to stop early when another rank failed)."""
    cfg, info = ctx.cfg, ctx.info
    path = os.path.join(ctx.run_dir, state_filename(info))
    topk = mining.TopK(ctx.layers, precision.mining_k(cfg), ctx.device)
    times = mining.MiningTimes()
    n_shard = dist_mod.shard_size(len(ctx.source), info.rank, info.world)
    if os.path.isfile(path):
        blob = load_state(path)
        if blob.get("mining_hash") != ctx.mining_hash:
            old = json.loads(blob.get("identity", "{}"))
            raise DeconvisError(f"{ctx.run_dir} holds a mining state for a different configuration "
                                f"({_diff(old, ctx.identity)}); pass --fresh to discard it or --run NAME for a new run")
        if (int(blob.get("rank", 0)), int(blob.get("world", 1))) != (info.rank, info.world):
            raise DeconvisError(f"{path} was written by rank {blob.get('rank')} of {blob.get('world')}, not rank "
                                f"{info.rank} of {info.world}; pass --fresh")
        topk.load_state_dict(blob["topk"])
        if blob.get("complete"):
            log.info("mining already complete (%d images), loaded %s", topk.seen, path)
            return topk, times
        log.info("resuming mining at item %d of %d%s from %s", topk.seen, n_shard,
                 f" (this rank's shard of {len(ctx.source)})" if info.enabled else "", path)

    def checkpoint(t: mining.TopK) -> None:
        save_torch(_state_blob(ctx, t, complete=False), path)

    profile_log = None
    if cfg.profile:
        def profile_log(n: int) -> None:
            ld, fw, up = times.per_batch[-1]
            log.info("batch %d: load %.1f ms, forward %.1f ms, top-k %.1f ms", n, 1e3 * ld, 1e3 * fw, 1e3 * up)

    def on_batch(n: int) -> None:
        if profile_log is not None:
            profile_log(n)
        if poll is not None:
            poll()

    sampler = dist_mod.ShardSampler(len(ctx.source), info.rank, info.world, start=topk.seen)
    dataset = ImageDataset(ctx.source, ctx.preprocess)
    cuda = ctx.device.type == "cuda"
    workers = precision.workers(cfg, ctx.device)
    loader = make_loader(dataset, cfg.batch_size, workers, pin_memory=cuda, sampler=sampler,
                         prefetch_factor=cfg.prefetch_factor, persistent_workers=workers > 0)
    model = ctx.loaded.model
    n_skipped_before = len(topk.skipped)
    try:
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        mining.mine(_mining_forward(ctx), loader, topk, channels=cfg.channels, dtype=ctx.dtype,
                    checkpoint_every=cfg.checkpoint_every, on_checkpoint=checkpoint, total=n_shard,
                    checkpoint_seconds=cfg.checkpoint_seconds,
                    progress=cfg.progress and info.is_main, times=times, profile=cfg.profile, on_batch=on_batch)
    finally:
        if cfg.channels_last:  # projections run on the usual layout
            model.to(memory_format=torch.contiguous_format)
        del loader  # ends persistent workers
    for i in topk.skipped[n_skipped_before:]:
        log.warning("skipped unreadable image %d: %s", i, ctx.source.path(i))
    save_torch(_state_blob(ctx, topk, complete=True), path)
    return topk, times


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


def plan_projection(ctx: Context, res: Results) -> List[render.TileJob]:
    """The winners still to project (all of them after a rule change), in (layer, channel, rank)
    order. Every rank computes the same list before any rank writes a tile."""
    cfg = ctx.cfg
    if res.projection_hash != ctx.projection_hash:
        if res.projection_hash and ctx.info.is_main:
            log.info("projection rule changed (%s -> %s): re-projecting every unit", res.rule, cfg.rule)
        for lr in res.layers:
            for u in lr.units:
                for w in u.winners:
                    w.box = w.box_clipped = w.tiles = None
        res.projection_hash, res.rule = ctx.projection_hash, cfg.rule
    jobs: List[render.TileJob] = []
    for lr in res.layers:
        for u in lr.units:
            for wnr in u.winners:
                if not _tiles_done(ctx.run_dir, wnr):
                    jobs.append(render.TileJob(lr.name, u.channel, wnr.rank, wnr.image, wnr.y, wnr.x, wnr.activation))
    return jobs


def split_jobs(jobs: List[render.TileJob], info: DistInfo) -> List[render.TileJob]:
    """This rank's share of ``jobs``: whole (layer, channel) groups, dealt round-robin (so every
    rank gets channels of every layer, and the work of deep and shallow layers spreads evenly)."""
    if not info.enabled:
        return list(jobs)
    groups: Dict[Tuple[str, int], List[render.TileJob]] = {}
    for j in jobs:
        groups.setdefault((j.layer, j.channel), []).append(j)
    return [j for key in dist_mod.split_for_rank(list(groups), info) for j in groups[key]]


#: outputs of one auto-sized projection call may take this many bytes (DeconvNet sizes the work
#: inside a call by free memory and halves it on out-of-memory; this bounds what it returns)
AUTO_PROJECT_BYTES = {"cuda": 1 << 30}
AUTO_PROJECT_BYTES_DEFAULT = 256 << 20


def project_chunk(ctx: Context) -> int:
    """Units per ``project_window`` call: ``project_batch``, or for 0/None (auto) as many as the
    largest receptive-field window of the mined layers allows within the output budget."""
    if ctx.cfg.project_batch:
        return int(ctx.cfg.project_batch)
    elem = torch.empty((), dtype=ctx.dtype).element_size()
    biggest = 1
    h, w = ctx.preprocess.crop
    table = ctx.dn.receptive_fields((h, w))
    for name in ctx.layers:
        row = table[name]
        rh, rw = (row.local or row).rf  # the tile's box: the RF (the local field behind a gate)
        biggest = max(biggest, 3 * min(rh, h) * min(rw, w) * elem)
    budget = AUTO_PROJECT_BYTES.get(ctx.device.type, AUTO_PROJECT_BYTES_DEFAULT)
    return int(max(16, min(4096, budget // biggest)))


def project_phase(ctx: Context, res: Results, jobs: Optional[List[render.TileJob]] = None,
                  poll: Optional[Callable[[], None]] = None, replay: Optional[Any] = None) -> int:
    """Project ``jobs`` (default: every winner whose tiles are missing, see :func:`plan_projection`),
    writing their tiles and filling their boxes in ``res``; returns how many were projected.
    ``replay`` (a :class:`deconvis.render.projection.Replay`) receives the replay check."""
    cfg, info = ctx.cfg, ctx.info
    if jobs is None:
        jobs = plan_projection(ctx, res)
    h, w_img = ctx.preprocess.crop
    index: Dict[Tuple[str, int, int], Tuple[LayerResult, Winner]] = {}
    for lr in res.layers:
        for u in lr.units:
            for wnr in u.winners:
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
        if info.is_main and time.monotonic() - last_save[0] >= SAVE_EVERY_S:  # keep results.json current
            results_mod.save(res, ctx.run_dir)
            last_save[0] = time.monotonic()
        if poll is not None:
            poll()

    dataset = ImageDataset(ctx.source, ctx.preprocess)
    n = render.project_jobs(ctx.dn, dataset, jobs, rule=cfg.rule, batch_size=cfg.batch_size,
                            project_batch=project_chunk(ctx), device=ctx.device, dtype=ctx.dtype, sink=sink,
                            progress=cfg.progress and info.is_main, workers=precision.workers(cfg, ctx.device),
                            replay=replay)
    return n


def _projection_updates(res: Results, jobs: List[render.TileJob]) -> Dict[str, Any]:
    """What projecting ``jobs`` filled into ``res`` (boxes, tiles, RF sizes), to send to the other ranks."""
    by_key = {(lr.name, u.channel, w.rank): (lr, w) for lr in res.layers for u in lr.units for w in u.winners}
    units = {}
    rf = {}
    for j in jobs:
        lr, w = by_key[(j.layer, j.channel, j.rank)]
        if w.tiles is not None:
            units[(j.layer, j.channel, j.rank)] = (w.box, w.box_clipped, w.tiles)
        if lr.rf is not None:
            rf[lr.name] = lr.rf
    return {"units": units, "rf": rf}


def _apply_projection_updates(res: Results, updates: List[Dict[str, Any]]) -> None:
    by_key = {(lr.name, u.channel, w.rank): w for lr in res.layers for u in lr.units for w in u.winners}
    layers = {lr.name: lr for lr in res.layers}
    for upd in updates:
        for key, (box, clipped, tiles) in upd["units"].items():
            w = by_key[key]
            w.box, w.box_clipped, w.tiles = box, clipped, tiles
        for name, rf in upd["rf"].items():
            if layers[name].rf is None:
                layers[name].rf = rf


# ---------------------------------------------------------------------------------------------
# phase 3 + 4: sheets and report

def _sheets_hash(res: Results, lr: LayerResult, cfg: VisualizeConfig) -> str:
    winners = [(u.channel, w.rank, w.image, w.activation, w.tiles is not None) for u in lr.units for w in u.winners]
    data = {"projection": res.projection_hash, "winners": winners, "rf": lr.rf, "k": res.config.get("k"),
            "render": [cfg.per_sheet, cfg.sheet_columns, cfg.min_tile, cfg.max_tile], "v": 2}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def render_phase(res: Results, run_dir: str, cfg: VisualizeConfig, force: bool = False,
                 layers: Optional[Collection[str]] = None, poll: Optional[Callable[[], None]] = None) -> List[str]:
    """Write each layer's sheets (skipping layers whose sheets are current unless ``force``);
    only the layers named in ``layers`` if given (one rank's share). ``poll`` runs between layers."""
    k = int(res.config.get("k", cfg.k))
    written: List[str] = []
    n_images = res.images.get("readable", res.images.get("count"))
    for lr in res.layers:
        if layers is not None and lr.name not in layers:
            continue
        if poll is not None:
            poll()
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
    """Run (or resume, or re-render) the top-k visualisation described by ``cfg``.

    Under ``torchrun`` (or with a process group set up by the caller) every process calls this
    with the same ``cfg``; each returns an :class:`Outcome` with the same results, and rank 0
    writes ``results.json`` and the report."""
    config_mod.validate(cfg)
    run_dir = os.path.join(cfg.out, cfg.run)
    if cfg.render_only and not os.path.isfile(os.path.join(run_dir, results_mod.FILENAME)):
        raise DeconvisError(f"--render-only: {os.path.join(run_dir, results_mod.FILENAME)} does not exist; "
                            "run without --render-only first (check --out and --run)")
    os.makedirs(run_dir, exist_ok=True)
    if cfg.render_only:  # one process does it: no model, no images, nothing to share
        rank = int(os.environ.get("RANK", "0")) if dist_mod.launched_by_torchrun() else 0
        if rank != 0:
            return Outcome(run_dir=run_dir, results=results_mod.load(run_dir), n_images=0, rank=rank)
        with _run_log(run_dir):
            log.info("visualize: run %s -> %s", cfg.run, os.path.abspath(run_dir))
            return _render_only(cfg, run_dir)
    with dist_mod.session(resolve_device(cfg.device), cfg.dist_timeout) as info:
        with _run_log(run_dir, info), tf32(False):  # full fp32 unless the mining forward allows TF32
            return _run(cfg, run_dir, config_dir, info)


def _main_log(info: DistInfo, msg: str, *args: Any, level: int = logging.INFO) -> None:
    """Log on rank 0 only (messages about the whole run, not one rank)."""
    if info.is_main:
        log.log(level, msg, *args)


def _share_token(run_dir: str) -> str:
    token = uuid.uuid4().hex
    write_text(os.path.join(run_dir, SHARE_FILE), token)
    return token


def _check_shared(run_dir: str, token: str, info: DistInfo) -> None:
    path = os.path.join(run_dir, SHARE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            seen = f.read().strip()
    except OSError:
        seen = ""
    if seen != token:
        raise DeconvisError(f"rank {info.rank} cannot see the files rank 0 writes in {os.path.abspath(run_dir)}: "
                            "--out must be a folder every process shares (e.g. on NFS/Lustre for several nodes)")


def _fingerprint(ctx: Context) -> Tuple[str, int, float]:
    """What must be equal on every rank: the mining identity, and the weights themselves
    (random weights drawn from the seed, checkpoints read on each node)."""
    with torch.no_grad():
        total = 0.0
        for p in ctx.loaded.model.parameters():
            total += float(p.detach().double().abs().sum()) + float(p.detach().double().sum())
    return ctx.mining_hash, len(ctx.source), total


def _run(cfg: VisualizeConfig, run_dir: str, config_dir: Optional[str], info: DistInfo) -> Outcome:
    gather = dist_mod.all_gather_objects
    phase = dist_mod.phase
    poll = dist_mod.failure_watch(info)
    _main_log(info, "visualize: run %s -> %s%s", cfg.run, os.path.abspath(run_dir),
              f" on {info.world} processes" if info.enabled else "")
    t0 = time.perf_counter()
    with phase(info, "setup"):
        if cfg.fresh and info.is_main:
            log.info("--fresh: discarding earlier results in %s", run_dir)
            _clear_run(run_dir)
        token = _share_token(run_dir) if info.enabled and info.is_main else ""
    token = str(gather(token, info, "setup")[0])

    res: Optional[Results] = None
    with phase(info, "prepare"):
        if info.enabled:
            _check_shared(run_dir, token, info)
        ctx = prepare(cfg, run_dir, config_dir, info)
        res_path = os.path.join(run_dir, results_mod.FILENAME)
        if os.path.isfile(res_path):
            old = results_mod.load(run_dir)
            if old.mining_hash != ctx.mining_hash:
                raise DeconvisError(f"{run_dir} holds results of a different configuration "
                                    f"({_diff(old.mining_identity, ctx.identity)}); pass --fresh to discard them "
                                    "or --run NAME for a new run")
            res = old
            res.config = config_mod.to_dict(cfg)
        else:
            _check_state_world(run_dir, info)
    if info.enabled:
        prints = gather(_fingerprint(ctx), info, "prepare")
        if any(p != prints[0] for p in prints):
            bad = next(r for r, p in enumerate(prints) if p != prints[0])
            raise DeconvisError(f"rank {bad} of {info.world} disagrees with rank 0 on the run (mining config, "
                                f"image count or model weights differ: {prints[bad][:2]} vs {prints[0][:2]}); every "
                                "node needs the same images, weights and deconvis version")
    seconds: Dict[str, float] = {"prepare": time.perf_counter() - t0}
    _main_log(info, "model %s (weights %s) on %s; %d layers: %s; %d images from %s; input %dx%d%s",
              cfg.model, cfg.weights, ctx.device, len(ctx.layers), ", ".join(ctx.labels[n] for n in ctx.layers),
              len(ctx.source), ctx.source.spec, *ctx.preprocess.crop,
              f"; amp {cfg.amp}" if cfg.amp != "none" else "")

    mined = False
    times: Optional[mining.MiningTimes] = None
    if res is None:
        t = time.perf_counter()
        with phase(info, "mining"):
            topk, times = mine_phase(ctx, poll=poll)
        secs = time.perf_counter() - t
        log.info("mining time split (%d images, %.1f s): %s", times.images, secs, times.summary())
        rank_stats = {"rank": info.rank, "images": topk.seen, "seconds": round(secs, 3), "split": times.to_dict()}
        all_stats = gather(rank_stats, info, "mining")
        topk = dist_mod.gather_topk(topk, info)
        doubt = None
        if precision.reranks(cfg):  # amp: the fp32 winners among the candidate pool
            with phase(info, "fp32 re-rank"):
                part = precision.rerank_part(ctx, topk, poll)
            topk, doubt = precision.rerank_finish(ctx, dist_mod.gather_topk(part, info), topk)
        seconds["mine"] = time.perf_counter() - t
        mined = True
        with phase(info, "results"):
            n_ok = topk.seen - len(topk.skipped)
            if topk.skipped:
                _main_log(info, "%d unreadable images skipped (listed above)", len(topk.skipped), level=logging.WARNING)
            if n_ok == 0:
                raise DeconvisError(f"none of the {len(ctx.source)} images of {ctx.source.spec!r} could be read")
            if n_ok < cfg.k:
                _main_log(info, "only %d readable images for k=%d: channels get fewer than k winners", n_ok, cfg.k,
                          level=logging.WARNING)
            if topk.seen != len(ctx.source):
                raise DeconvisError(f"mining covered {topk.seen} items of {len(ctx.source)}: the checkpoints do not "
                                    "match the image set; pass --fresh")
            _main_log(info, "mined %d images in %.1f s (%.1f images/s)%s", topk.seen, seconds["mine"],
                      topk.seen / max(seconds["mine"], 1e-9), f" on {info.world} processes" if info.enabled else "")
            res = build_results(ctx, topk)
            res.stats = {"mining_seconds": round(seconds["mine"], 3), "images": topk.seen, "world": info.world,
                         "mining_split": times.to_dict(), "precision": precision.record(ctx, doubt),
                         "nonfinite": precision.report_nonfinite(ctx, topk)}
            if info.enabled:
                res.stats["ranks"] = all_stats
            if info.is_main:
                results_mod.save(res, run_dir)

    t = time.perf_counter()
    with phase(info, "projection plan"):  # rank 0 plans from its view of the folder; every rank takes it
        jobs = plan_projection(ctx, res) if info.is_main else []
    jobs = dist_mod.from_main(jobs, info, "the projection plan")
    if not info.is_main:
        plan_projection(ctx, res)  # the same rule-change reset of res as on rank 0 (its job list is unused)
    mine_jobs = split_jobs(jobs, info)
    replay = projection_mod.new_replay(res, precision.replay_rtol(ctx))
    if jobs and info.enabled:
        _main_log(info, "projecting %d units (rule %s) on %d processes", len(jobs), cfg.rule, info.world)
    with phase(info, "projection"):
        n_proj = project_phase(ctx, res, mine_jobs, poll=poll, replay=replay) if mine_jobs else 0
    replay_entry = projection_mod.add_replay(res.stats, gather(replay, info, "the replay check"), replay.rtol)
    if info.enabled:
        updates = gather(_projection_updates(res, mine_jobs), info, "projection")
        _apply_projection_updates(res, updates)  # type: ignore[arg-type]
        n_proj = sum(len(u["units"]) for u in updates)  # type: ignore[index]
    seconds["project"] = time.perf_counter() - t
    res.status = "projected"
    with phase(info, "projection save"):
        if n_proj:
            _main_log(info, "projected %d units in %.1f s", n_proj, seconds["project"])
        if info.is_main:
            results_mod.save(res, run_dir)
    projection_mod.replay_verdict(replay_entry, cfg.replay_max_mismatch, info.is_main)  # same on every rank

    t = time.perf_counter()
    my_layers = dist_mod.split_for_rank([lr.name for lr in res.layers], info)
    with phase(info, "rendering"):
        if info.enabled:  # tiles other ranks listed: wait for this rank to see them, never render a blank
            projection_mod.wait_for_tiles(run_dir, res.layers, set(my_layers))
        render_phase(res, run_dir, cfg, layers=set(my_layers), poll=poll)
    if info.enabled:
        mine_sheets = {lr.name: (lr.sheets, lr.sheets_hash) for lr in res.layers if lr.name in my_layers}
        layers = {lr.name: lr for lr in res.layers}
        for part in gather(mine_sheets, info, "rendering"):
            for name, (sheets, h) in part.items():  # type: ignore[union-attr]
                layers[name].sheets, layers[name].sheets_hash = sheets, h
    report_path = os.path.join(run_dir, REPORT_FILE)
    with phase(info, "report"):
        res.status = "rendered"
        if info.is_main:
            results_mod.save(res, run_dir)
            report_path = report.write_report(res, run_dir)
    seconds["render"] = time.perf_counter() - t
    _main_log(info, "wrote %d sheets and %s in %.1f s", sum(len(lr.sheets) for lr in res.layers), report_path,
              seconds["render"])
    return Outcome(run_dir=run_dir, results=res, n_images=int(res.images.get("count", 0)), mined=mined,
                   projected=n_proj, sheets=[s for lr in res.layers for s in lr.sheets], report=report_path,
                   seconds=seconds, mining=times, rank=info.rank, world=info.world)


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
