"""The run folder ``<out>/<run>/``: its files, the mining checkpoints, and the run's identity.

The identity says what decides the winners (model, weights digest, resolved layers, k, channels,
image set, preprocessing, amp): a saved mining state or ``results.json`` is reused only when its
identity hash matches. ``rule`` changes only the tiles (the projection hash).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from deconvis.errors import DeconvisError
from deconvis.io.images import ImageSource
from deconvis.io.models import Preprocess
from deconvis.io.pixels import MAX_PIXELS
from deconvis.runs import config as config_mod
from deconvis.runs import results as results_mod
from deconvis.runs.config import VisualizeConfig
from deconvis.runs.distributed import DistInfo

log = logging.getLogger("deconvis")

STATE_FILE = "mining_state.pt"
STATE_RE = re.compile(r"^mining_state(?:\.rank(\d+)-of(\d+))?\.pt$")
PROGRESS_RE = re.compile(r"^projection(?:-bottom)?\.rank\d+\.json$")
STATE_FORMAT = 1
LOG_FILE = "run.log"
PROGRESS_GLOB = "projection.rank*.json"  # each rank's finished channels during a projection
REPORT_FILE = "index.html"


# -- identity ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """What decides the winners (``fields``), its hash, and the hash of the tiles (+ rule)."""

    fields: Dict[str, Any]
    mining_hash: str
    projection_hash: str


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_id(weights: str, seed: int) -> str:
    """A checkpoint's digest, ``random(seed=S)``, or the weights name as given."""
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


def run_identity(cfg: VisualizeConfig, layers: Sequence[str], weights: str, source: ImageSource,
                 pp: Preprocess, extra: Optional[Dict[str, Any]] = None) -> Identity:
    """The identity of a run over resolved ``layers`` (step names: an alias and its module agree),
    resolved ``weights`` (path or name), the opened image ``source`` and the preprocessing ``pp``;
    ``extra`` adds keys (the precision policy: :func:`deconvis.runs.precision.identity_extra`)."""
    values = cfg.to_dict()
    fields = {key: values[key] for key in config_mod.MINING_KEYS}
    fields.update({
        "layers": list(layers),
        "weights_id": weights_id(weights, cfg.seed),
        "images": source.spec if isinstance(cfg.images, str) else cfg.images,
        "n_images": len(source),
        "images_digest": _names_digest(source),
        "preprocess": pp.to_dict(),                         # replaces resize/crop
    })
    for key in ("resize", "crop", "seed"):  # seed matters through weights_id (random weights) only
        fields.pop(key, None)
    if cfg.amp != "none":  # lower precision can reorder near-ties: not resumable across precisions
        fields["amp"] = cfg.amp
    if cfg.bottom_k is not None:  # set apart from k (unset: k, already in the identity; older runs keep their hash)
        fields["bottom_k"] = cfg.bottom_k
    if cfg.max_pixels != MAX_PIXELS:  # which images are skipped (default: absent, so older runs keep their hash)
        fields["max_pixels"] = cfg.max_pixels
    fields.update(extra or {})
    mining_hash = config_mod.config_hash(fields, sorted(fields))
    projection_hash = config_mod.config_hash({"mining": mining_hash, "rule": cfg.rule}, ["mining", "rule"])
    return Identity(fields=fields, mining_hash=mining_hash, projection_hash=projection_hash)


def diff(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    """``key: old -> new`` for the (first four) keys that differ."""
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(parts[:4]) + (" ..." if len(parts) > 4 else "")


def load_results(run_dir: str, identity: Identity) -> Optional[results_mod.Results]:
    """The run's ``results.json`` if there is one (None otherwise); an error when it is of another
    mining configuration."""
    if not os.path.isfile(os.path.join(run_dir, results_mod.FILENAME)):
        return None
    old = results_mod.load(run_dir)
    if old.mining_hash != identity.mining_hash:
        raise DeconvisError(f"{run_dir} holds results of a different configuration "
                            f"({diff(old.mining_identity, identity.fields)}); pass --fresh to discard them "
                            "or --run NAME for a new run")
    old.version = results_mod.VERSION  # a resumed run saves the current schema (version-1 tile files stay listed)
    return old


# -- files ------------------------------------------------------------------------------------

def log_filename(info: Optional[DistInfo] = None) -> str:
    """This rank's log: ``run.log`` for rank 0 (and a one-process run), ``run.rank{r}.log`` for
    the others -- one writer per file, since appends of several nodes to one file on a shared
    filesystem (NFS) interleave or vanish."""
    if info is None or info.rank == 0:
        return LOG_FILE
    return f"run.rank{info.rank}.log"


@contextlib.contextmanager
def run_log(run_dir: str, info: Optional[DistInfo] = None) -> Iterator[None]:
    """Append this run's log records to this rank's log in ``run_dir`` (:func:`log_filename`;
    each line tagged with its rank under torchrun)."""
    handler = logging.FileHandler(os.path.join(run_dir, log_filename(info)), encoding="utf-8")
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


def progress_filename(info: Optional[DistInfo] = None, prefix: str = "projection") -> str:
    """This rank's projection progress file (``projection.rank<r>.json``; rank 0 for one process;
    ``projection-bottom.rank<r>.json`` for the bottom-k's)."""
    return f"{prefix}.rank{info.rank if info is not None else 0}.json"


def _discard_dir(path: str) -> None:
    """Remove folder ``path`` as one rename (so a rerun never sees part of it), then delete the
    renamed folder on a background thread (a run folder of an old version holds thousands of tile
    files: the run does not wait for them)."""
    if not os.path.isdir(path):
        return
    trash = f"{path}.deleting-{os.getpid()}-{threading.get_ident()}"
    try:
        os.replace(path, trash)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        return
    _delete_aside(trash)


def _delete_aside(path: str) -> None:
    """Delete folder ``path`` on a background thread (the process waits for it before exiting)."""
    threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
                     name="deconvis-discard", daemon=False).start()


def clear_run(run_dir: str) -> None:
    """``--fresh``: remove what earlier runs wrote into ``run_dir`` (never other files)."""
    for name in (results_mod.FILENAME, REPORT_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, name))
    if os.path.isdir(run_dir):  # before the renames below: their folders go on the background thread
        for name in os.listdir(run_dir):
            if ((name.startswith("layer_") and name.endswith((".png", ".jpg"))) or STATE_RE.match(name)
                    or PROGRESS_RE.match(name) or (name.startswith(("tiles.deleting-", "analyses.deleting-", "units.deleting-"))
                                                   and os.path.isdir(os.path.join(run_dir, name)))):
                path = os.path.join(run_dir, name)
                if os.path.isdir(path):  # left by a run killed while deleting
                    _delete_aside(path)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
    _discard_dir(os.path.join(run_dir, "tiles"))
    _discard_dir(os.path.join(run_dir, "analyses"))  # --analyses outputs
    _discard_dir(os.path.join(run_dir, "units"))  # unit pages and their thumbnails


def _nonempty(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def channel_done(run_dir: str, u: results_mod.ChannelResult) -> bool:
    """Whether channel ``u`` is projected: every winner has its box and the channel's sprite (or,
    for a version-1 run, each winner's two tile files) is on disk, non-empty."""
    if not u.winners or any(w.box is None for w in u.winners):
        return False
    if u.sprite is not None:
        return _nonempty(os.path.join(run_dir, u.sprite))
    return all(w.tiles and all(_nonempty(os.path.join(run_dir, p)) for p in w.tiles.values()) for w in u.winners)


def tile_files(u: results_mod.ChannelResult) -> List[str]:
    """The files holding channel ``u``'s tiles (relative to the run folder): its sprite, or the
    version-1 tile files; empty when not projected."""
    sprite = getattr(u, "sprite", None)
    if sprite is not None:
        return [sprite]
    return [p for w in u.winners if w.tiles for p in w.tiles.values()]


# -- mining checkpoints -----------------------------------------------------------------------

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


def check_state_world(run_dir: str, info: DistInfo) -> None:
    """A mining checkpoint of a run with another number of processes cannot be resumed."""
    other = {w: names for w, names in _state_worlds(run_dir).items() if w != info.world}
    if other:
        w, names = sorted(other.items())[0]
        shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
        raise DeconvisError(f"{run_dir} holds the mining checkpoint of a {w}-process run ({shown}) but this run has "
                            f"{info.world} process{'es' if info.world > 1 else ''}: restart with {w} processes "
                            f"(torchrun --nnodes x --nproc_per_node = {w}) to resume it, or pass --fresh to mine again")


def state_blob(identity: Identity, info: DistInfo, topk_state: Dict[str, Any], complete: bool) -> Dict[str, Any]:
    """The mining checkpoint of this rank."""
    return {"format": STATE_FORMAT, "mining_hash": identity.mining_hash, "identity": json.dumps(identity.fields),
            "complete": complete, "rank": info.rank, "world": info.world, "topk": topk_state}


def load_state(path: str) -> Dict[str, Any]:
    """Read a mining checkpoint (DeconvisError naming ``--fresh`` when unreadable)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DeconvisError(f"cannot read mining state {path} ({type(exc).__name__}: {exc}); "
                            "re-run with --fresh") from exc


def check_state(blob: Dict[str, Any], path: str, run_dir: str, identity: Identity, info: DistInfo) -> None:
    """A checkpoint must be of this configuration and of this rank."""
    if blob.get("mining_hash") != identity.mining_hash:
        old = json.loads(blob.get("identity", "{}"))
        raise DeconvisError(f"{run_dir} holds a mining state for a different configuration "
                            f"({diff(old, identity.fields)}); pass --fresh to discard it or --run NAME for a new run")
    if (int(blob.get("rank", 0)), int(blob.get("world", 1))) != (info.rank, info.world):
        raise DeconvisError(f"{path} was written by rank {blob.get('rank')} of {blob.get('world')}, not rank "
                            f"{info.rank} of {info.world}; pass --fresh")
