"""Configuration of ``deconvis visualize``: a YAML file plus command-line overrides.

Every field of :class:`VisualizeConfig` is a YAML key and a ``--flag`` (underscores become
dashes); the argparse flags are generated from the dataclass so the two cannot drift. Precedence:
dataclass defaults < YAML file < command-line flags. :func:`validate` checks everything that can
be checked without the model (types, ranges, names) and raises :class:`DeconvisError` before any
work starts; layer names are checked against the model by the pipeline, also before work.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from deconvis.errors import DeconvisError, close_matches
from deconvis.mirror.rules import Rule

AMP_MODES = ("none", "bf16", "fp16")


def _f(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - argparse wording
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class VisualizeConfig:
    """All settings of a top-k visualisation run (ZF 2014, Fig. 2)."""

    model: str = _f("zfnet_demo", "model: torchvision name (alexnet, vgg16), module:callable, file.py:callable, or zfnet_demo")
    weights: str = _f("random", "weights: torchvision enum name (DEFAULT, IMAGENET1K_V1; hub cache only), "
                                "checkpoint path, asset:NAME (file shipped in deconvis/assets), or random")
    layers: List[str] = _f([], "layers to visualise, comma separated (aliases conv1, conv5_3, ... or module "
                               "names); empty = every conv layer")
    k: int = _f(9, "strongest images per channel (one activation per image)")
    images: Union[str, Dict[str, Any]] = _f("builtin:skimage-crops", "image set: folder, torchvision:NAME:ROOT[:SPLIT], "
                                                                    "builtin:skimage or builtin:skimage-crops")
    max_images: Optional[int] = _f(None, "use only the first N images of the set")
    channels: Optional[int] = _f(None, "visualise only the first N channels of every layer")
    batch_size: int = _f(32, "images per mining/projection batch")
    workers: Optional[int] = _f(None, "DataLoader worker processes (decode + preprocess in parallel); unset/auto: 0 on "
                                      "the CPU, min(8, CPUs per process) on CUDA")
    prefetch_factor: int = _f(2, "batches each DataLoader worker loads ahead (with workers > 0)")
    device: str = _f("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; under torchrun each "
                             "process takes cuda:LOCAL_RANK")
    amp: str = _f("none", "mixed precision for the mining forward: none, bf16 (CUDA, CPU) or fp16 (CUDA only); "
                          "projections stay in full precision")
    amp_pool: int = _f(4, "with --amp: keep k x N candidates per channel under amp and re-rank them in fp32, so "
                          "winners, positions and activations are fp32's among them; 0: keep the amp ranking")
    tf32: bool = _f(False, "allow TensorFloat-32 convs/matmuls in the mining forward on Ampere+ GPUs with --amp none "
                           "(faster, 10-bit mantissa); default off: full fp32; part of the run identity")
    channels_last: bool = _f(False, "mine with the model and images in channels_last memory format (faster convs "
                                    "on recent GPUs, notably with --amp)")
    profile: bool = _f(False, "time every mining batch exactly (synchronises the device around each step: "
                              "slower; per-batch times go to run.log)")
    dist_timeout: int = _f(600, "torchrun runs: seconds without progress from a rank (crashed or hung) before "
                                "the others give up with an error; also the limit of one collective")
    rule: str = _f("deconvnet", "backward rule for the projection: deconvnet (ZF), guided or gradient")
    seed: int = _f(0, "random seed (random weights are drawn from it)")
    resize: Optional[int] = _f(None, "override the model's preprocessing: resize the short side to N pixels")
    crop: Optional[int] = _f(None, "override the model's preprocessing: centre crop N x N pixels")
    out: str = _f("outputs", "output root folder")
    run: str = _f("", "run name (folder under --out); default: the config file's name, else the model name")
    checkpoint_every: int = _f(0, "save the mining state every N batches (0: by time only, see checkpoint_seconds)")
    checkpoint_seconds: int = _f(60, "save the mining state at most every N seconds of mining (0: only at the end)")
    project_batch: Optional[int] = _f(0, "units handed to one projection call; 0 = auto (batches sized by free "
                                         "device memory, halved on out-of-memory)")
    replay_max_mismatch: Optional[int] = _f(0, "replay check: fail the run when more than N projected winners' "
                                                "recomputed activation differs from the mined value (a changed model "
                                                "or image set); unset/none: only count them")
    per_sheet: int = _f(16, "channels per grid sheet (PNG page)")
    sheet_columns: int = _f(4, "channel blocks per sheet row")
    min_tile: int = _f(64, "smallest tile side in sheets, pixels (small RF patches are upscaled, nearest)")
    max_tile: int = _f(96, "largest tile side in sheets, pixels (large RF patches are downscaled, area)")
    render_only: bool = _f(False, "re-render sheets and report from results.json and saved tiles; never re-mine")
    fresh: bool = _f(False, "ignore (delete) this run's saved mining state, tiles and results and start over")
    progress: bool = _f(True, "show progress bars")


# keys that decide which units win: a saved mining state is only reused when these match (the
# pipeline adds derived values: resolved layers, weights digest, image list digest, preprocessing);
# ``rule`` changes only the tiles, which are re-projected without re-mining; ``amp`` (other than
# none) joins the identity in the pipeline, so existing full-precision runs keep their hash
MINING_KEYS = ("model", "weights", "layers", "k", "images", "max_images", "channels", "seed", "resize", "crop")

FIELD_NAMES = tuple(f.name for f in fields(VisualizeConfig))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _field_kind(f: dataclasses.Field) -> str:
    """'bool', 'int', 'optint', 'str', 'list', 'images' for a config field."""
    t = f.type if isinstance(f.type, str) else _type_name(f.type)
    if t == "bool":
        return "bool"
    if t == "int":
        return "int"
    if t.startswith("Optional[int]"):
        return "optint"
    if t.startswith("List["):
        return "list"
    if t.startswith("Union[str, Dict"):
        return "images"
    return "str"


def _coerce(name: str, kind: str, value: Any, source: str) -> Any:
    """Check/convert one value of a field; DeconvisError naming ``source`` otherwise."""
    where = f"{source}: {name}"
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise DeconvisError(f"{where} must be true or false, got {value!r}")
    if kind in ("int", "optint"):
        if value is None or (kind == "optint" and isinstance(value, str) and value.lower() in ("", "none", "all", "null", "auto")):
            if kind == "optint":
                return None
            raise DeconvisError(f"{where} must be an integer, got nothing")
        if isinstance(value, bool):
            raise DeconvisError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise DeconvisError(f"{where} must be an integer, got {value!r}") from None
        if not isinstance(value, int):
            raise DeconvisError(f"{where} must be an integer, got {value!r}")
        return value
    if kind == "list":
        if value is None:
            return []
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) for v in value):
            return [str(v).strip() for v in value if str(v).strip()]
        raise DeconvisError(f"{where} must be a list of names or a comma separated string, got {value!r}")
    if kind == "images":
        if isinstance(value, (str, dict)):
            return value
        raise DeconvisError(f"{where} must be a string or a mapping, got {value!r}")
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DeconvisError(f"{where} must be a string, got {value!r}")
    return value


def from_mapping(values: Mapping[str, Any], base: Optional[VisualizeConfig] = None,
                 source: str = "config") -> VisualizeConfig:
    """``base`` (default: the defaults) with ``values`` applied; unknown keys are errors."""
    cfg = dataclasses.replace(base) if base is not None else VisualizeConfig()
    by_name = {f.name: f for f in fields(VisualizeConfig)}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            raise DeconvisError(f"{source}: unknown key {key!r}" + close_matches(name, by_name))
        setattr(cfg, name, _coerce(name, _field_kind(by_name[name]), value, source))
    return cfg


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML config file into a dict (empty file -> {})."""
    import yaml

    if not os.path.isfile(path):
        raise DeconvisError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise DeconvisError(f"config file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DeconvisError(f"config file {path!r} must hold a mapping of key: value, not {type(data).__name__}")
    return data


def validate(cfg: VisualizeConfig) -> VisualizeConfig:
    """Range and name checks that need no model; raises DeconvisError. Returns ``cfg``."""
    if cfg.k < 1:
        raise DeconvisError(f"k must be at least 1, got {cfg.k}")
    if cfg.k > 100:
        raise DeconvisError(f"k={cfg.k} is too large for grids (at most 100)")
    for name in ("batch_size", "per_sheet", "sheet_columns", "min_tile", "max_tile", "prefetch_factor",
                 "dist_timeout"):
        if getattr(cfg, name) < 1:
            raise DeconvisError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("checkpoint_every", "checkpoint_seconds", "amp_pool"):
        if getattr(cfg, name) < 0:
            raise DeconvisError(f"{name} must be 0 or more, got {getattr(cfg, name)}")
    for name in ("max_images", "channels", "resize", "crop"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise DeconvisError(f"{name} must be at least 1 (or unset), got {v}")
    for name in ("workers", "replay_max_mismatch"):
        v = getattr(cfg, name)
        if v is not None and v < 0:
            raise DeconvisError(f"{name} must be 0 or more (or unset), got {v}")
    if cfg.project_batch is not None and cfg.project_batch < 0:
        raise DeconvisError(f"project_batch must be 0 or unset (auto) or a positive number, got {cfg.project_batch}")
    if cfg.amp not in AMP_MODES:
        raise DeconvisError(f"amp must be one of {', '.join(AMP_MODES)}, got {cfg.amp!r}"
                            + close_matches(cfg.amp, AMP_MODES))
    if cfg.min_tile > cfg.max_tile:
        raise DeconvisError(f"min_tile ({cfg.min_tile}) is larger than max_tile ({cfg.max_tile})")
    if cfg.render_only and cfg.fresh:
        raise DeconvisError("--render-only and --fresh contradict each other: --fresh discards the results "
                            "that --render-only re-renders; pass one of them")
    cfg.rule = Rule.parse(cfg.rule).value
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise DeconvisError(f"device must be auto, cpu, cuda, cuda:N or mps, got {dev!r}")
    if not cfg.model:
        raise DeconvisError("model is empty; set --model (e.g. alexnet, vgg16, zfnet_demo)")
    if cfg.run and (os.sep in cfg.run or cfg.run in (".", "..") or (os.altsep and os.altsep in cfg.run)):
        raise DeconvisError(f"run name {cfg.run!r} must be a plain folder name")
    from deconvis.io.images import parse_images_spec

    parse_images_spec(cfg.images)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> VisualizeConfig:
    """Defaults < YAML ``path`` < ``overrides`` (e.g. from the command line), validated.

    With a config file and no ``run`` key, the run is named after the file.
    """
    cfg = VisualizeConfig()
    if path:
        cfg = from_mapping(load_yaml(path), cfg, source=path)
        if not cfg.run:
            cfg.run = os.path.splitext(os.path.basename(path))[0]
    if overrides:
        cfg = from_mapping(overrides, cfg, source="command line")
    if not cfg.run:
        cfg.run = cfg.model.replace(":", "_").replace("/", "_").replace(".py", "")
    return validate(cfg)


def to_dict(cfg: VisualizeConfig) -> Dict[str, Any]:
    """The config as plain JSON-able values."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(values: Mapping[str, Any], keys: Sequence[str]) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of ``values[keys]``."""
    sub = {k: values.get(k) for k in keys}
    return hashlib.sha256(json.dumps(sub, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


# -- argparse, generated from the dataclass ----------------------------------------------------

def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


#: short aliases: ``torchrun`` abbreviates its own options, so ``torchrun ... -m deconvis visualize
#: --run NAME`` fails ("ambiguous option: --run could match --run-path"); ``-n NAME`` passes through
SHORT_FLAGS = {"run": "-n"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config field (default None = not given, so YAML values survive)."""
    for f in fields(VisualizeConfig):
        kind = _field_kind(f)
        helptext = f.metadata.get("help", "")
        if kind == "bool":
            parser.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=helptext)
        else:
            metavar = {"int": "N", "optint": "N", "list": "A,B,..", "images": "SPEC"}.get(kind, "STR")
            if f.name in SHORT_FLAGS:
                helptext += f" ({SHORT_FLAGS[f.name]} {metavar} is the same; use it under torchrun)"
            names = [flag_name(f.name)] + ([SHORT_FLAGS[f.name]] if f.name in SHORT_FLAGS else [])
            parser.add_argument(*names, dest=f.name, default=None, metavar=metavar,
                                help=f"{helptext} (default: {f.default if f.default is not dataclasses.MISSING else '[]'})")


def overrides_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The config fields given on the command line (values still strings; coerced later)."""
    return {name: getattr(args, name) for name in FIELD_NAMES if getattr(args, name, None) is not None}
