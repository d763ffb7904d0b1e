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
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from deconvis import config as configbase
from deconvis.config import Config, check_device, flag_name, load_yaml, option
from deconvis.errors import DeconvisError, close_matches
from deconvis.io.images import parse_images_spec
from deconvis.io.pixels import MAX_PIXELS
from deconvis.mirror.rules import Rule

__all__ = ["VisualizeConfig", "AMP_MODES", "ANALYSES", "MINING_KEYS", "FIELD_NAMES", "SHORT_FLAGS", "load_config", "from_mapping",
           "validate", "to_dict", "config_hash", "flag_name", "load_yaml", "add_arguments", "overrides_from_args"]

AMP_MODES = ("none", "bf16", "fp16")
#: the Section 4 analyses a visualize run can add to its report (``--analyses``)
ANALYSES = ("invariance", "correspondence", "diagnose", "occlusion")


@dataclass
class VisualizeConfig(Config):
    """All settings of a top-k visualisation run (ZF 2014, Fig. 2)."""

    model: str = option("zfnet_demo", "model: torchvision name (alexnet, vgg16), module:callable, file.py:callable, or zfnet_demo")
    weights: str = option("random", "weights: torchvision enum name (DEFAULT, IMAGENET1K_V1; hub cache only), "
                                "checkpoint path, asset:NAME (file shipped in deconvis/assets), or random")
    layers: List[str] = option([], "layers to visualise, comma separated (aliases conv1, conv5_3, ... or module "
                               "names); empty = every conv layer")
    k: int = option(9, "strongest images per channel (one activation per image)")
    bottom_k: Optional[int] = option(None, "most negative images per channel before rectification (the minima of the "
                                           "pre-activation of ReLU layers, or a conv layer's own minima), mined and "
                                           "projected beside the top-k on the unit pages; unset: k; 0: off")
    images: Union[str, Dict[str, Any]] = option("builtin:skimage-crops", "image set: folder, torchvision:NAME:ROOT[:SPLIT], "
                                                                    "builtin:skimage or builtin:skimage-crops")
    max_images: Optional[int] = option(None, "use only the first N images of the set")
    max_pixels: int = option(MAX_PIXELS, "skip (log, never decode) image files whose header says they have more "
                                         "pixels (width x height) than this: decompression bombs; default Pillow's "
                                         "limit, about 179 megapixels; 0: no cap")
    channels: Optional[int] = option(None, "visualise only the first N channels of every layer")
    batch_size: int = option(32, "images per mining/projection batch")
    workers: Optional[int] = option(None, "DataLoader worker processes (decode + preprocess in parallel); unset/auto: "
                                          "0 on the CPU (one thread decodes ahead instead), min(8, CPUs per process) on CUDA")
    prefetch_factor: int = option(2, "batches each DataLoader worker loads ahead (with workers > 0)")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; under torchrun each "
                             "process takes cuda:LOCAL_RANK")
    amp: str = option("none", "mixed precision for the mining forward: none, bf16 (CUDA, CPU) or fp16 (CUDA only); "
                          "projections stay in full precision")
    amp_pool: int = option(4, "with --amp: keep k x N candidates per channel under amp and re-rank them in fp32, so "
                              "winners, positions and activations are fp32's among them; 0: keep the amp ranking")
    tf32: bool = option(False, "allow TensorFloat-32 convs/matmuls in the mining forward on Ampere+ GPUs with --amp "
                               "none (faster, 10-bit mantissa); default off: full fp32; part of the run identity")
    channels_last: bool = option(False, "mine with the model and images in channels_last memory format (faster convs "
                                    "on recent GPUs, notably with --amp)")
    profile: bool = option(False, "time every mining batch exactly (synchronises the device around each step: "
                              "slower; per-batch times go to run.log)")
    dist_timeout: int = option(600, "torchrun runs: seconds without progress from a rank (crashed or hung) before "
                                "the others give up with an error; also the limit of one collective")
    rule: str = option("deconvnet", "backward rule for the projection: deconvnet (ZF), guided or gradient")
    seed: int = option(0, "random seed (random weights are drawn from it)")
    resize: Optional[int] = option(None, "override the model's preprocessing: resize the short side to N pixels")
    crop: Optional[int] = option(None, "override the model's preprocessing: centre crop N x N pixels")
    out: str = option("outputs", "output root folder")
    run: str = option("", "run name (folder under --out); default: the config file's name, else the model name",
                      short="-n")
    checkpoint_every: int = option(0, "save the mining state every N batches (0: by time only, see checkpoint_seconds)")
    checkpoint_seconds: int = option(60, "save the mining state at most every N seconds of mining (0: only at the end)")
    project_batch: Optional[int] = option(0, "units handed to one projection call; 0 = auto (batches sized by free "
                                         "device memory, halved on out-of-memory)")
    replay_max_mismatch: Optional[int] = option(0, "replay check: fail the run when more than N projected winners' "
                                                    "recomputed activation differs from the mined value (a changed "
                                                    "model or image set); unset/none: only count them")
    per_sheet: int = option(16, "channels per grid sheet (one image per page)")
    sheet_columns: int = option(4, "channel blocks per sheet row")
    min_tile: int = option(64, "smallest tile side in sheets, pixels (small RF patches are upscaled, nearest)")
    max_tile: int = option(96, "largest tile side in sheets, pixels (large RF patches are downscaled, area)")
    lossless: bool = option(False, "write sheets and every sprite as PNG (pixel-exact; default: JPEG quality 92 "
                                   "for sheets and for tiles of 32 px and more, about 3x smaller)")
    render_only: bool = option(False, "re-render sheets and report from results.json and saved tiles; never re-mine")
    fresh: bool = option(False, "ignore (delete) this run's saved mining state, tiles and results and start over")
    progress: bool = option(True, "show progress bars")
    analyses: List[str] = option([], "Section 4 analyses to run after rendering, each a report section and files "
                                     "under analyses/<name>/: invariance, correspondence, diagnose, occlusion "
                                     "(settings: each subcommand's defaults)")
    analysis_images: int = option(2, "images of the run's set the analyses use (diagnose: up to 32 for the dead "
                                     "filter count)")
    correspondence_parts: str = option("", "part-box file (YAML/JSON, as deconvis correspondence --parts) for the "
                                           "correspondence analysis; empty: the packaged face boxes with the demo "
                                           "net (zfnet_demo), else the analysis is skipped")
    unit_erf: bool = option(True, "unit pages: draw each channel's RF box and its effective receptive field (|d unit / "
                                  "d input| at the top winner, on that image) on one image (about a quarter of the "
                                  "projection phase's time on the demo; --no-unit-erf skips it)")
    checkpoints: List[str] = option([], "unit pages: weights to follow each channel across (ZF Fig. 4 for one unit): "
                                        "checkpoint files, or a `deconvis train` output folder (its snapshot_weights/), "
                                        "in training order; empty: none")
    evolution_images: int = option(256, "with checkpoints: the first N images of the set are searched for each "
                                        "channel's strongest activation at every checkpoint")
    featvis_steps: int = option(0, "unit pages: add each channel's feature visualisation (deconvis featvis, batched "
                                   "over channels) with this many optimisation steps; 0: off")

    def validate(self) -> None:
        """Range and name checks that need no model; raises DeconvisError. Normalises ``rule``."""
        if self.k < 1:
            raise DeconvisError(f"k must be at least 1, got {self.k}")
        if self.k > 100:
            raise DeconvisError(f"k={self.k} is too large for grids (at most 100)")
        for name in ("batch_size", "per_sheet", "sheet_columns", "min_tile", "max_tile", "prefetch_factor",
                     "dist_timeout"):
            if getattr(self, name) < 1:
                raise DeconvisError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "checkpoint_seconds", "amp_pool", "max_pixels", "featvis_steps"):
            if getattr(self, name) < 0:
                raise DeconvisError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("max_images", "channels", "resize", "crop"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise DeconvisError(f"{name} must be at least 1 (or unset), got {v}")
        if self.bottom_k is not None and not 0 <= self.bottom_k <= 100:
            raise DeconvisError(f"bottom_k must be in 0..100 (0: off; unset: k), got {self.bottom_k}")
        for name in ("workers", "replay_max_mismatch"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise DeconvisError(f"{name} must be 0 or more (or unset), got {v}")
        if self.project_batch is not None and self.project_batch < 0:
            raise DeconvisError(f"project_batch must be 0 or unset (auto) or a positive number, got {self.project_batch}")
        for name in self.analyses:
            if name not in ANALYSES:
                raise DeconvisError(f"analyses: unknown analysis {name!r}; choose among {', '.join(ANALYSES)}"
                                    + close_matches(name, ANALYSES))
        self.analyses = list(dict.fromkeys(self.analyses))
        if self.evolution_images < 1:
            raise DeconvisError(f"evolution_images must be at least 1, got {self.evolution_images}")
        if self.analysis_images < 1:
            raise DeconvisError(f"analysis_images must be at least 1, got {self.analysis_images}")
        if self.amp not in AMP_MODES:
            raise DeconvisError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}"
                                + close_matches(self.amp, AMP_MODES))
        if self.min_tile > self.max_tile:
            raise DeconvisError(f"min_tile ({self.min_tile}) is larger than max_tile ({self.max_tile})")
        if self.render_only and self.fresh:
            raise DeconvisError("--render-only and --fresh contradict each other: --fresh discards the results "
                                "that --render-only re-renders; pass one of them")
        self.rule = Rule.parse(self.rule).value
        check_device(self.device)
        if not self.model:
            raise DeconvisError("model is empty; set --model (e.g. alexnet, vgg16, zfnet_demo)")
        if self.run and (os.sep in self.run or self.run in (".", "..") or (os.altsep and os.altsep in self.run)):
            raise DeconvisError(f"run name {self.run!r} must be a plain folder name")

        parse_images_spec(self.images)

    @property
    def bottom_count(self) -> int:
        """Images per channel of the bottom-k: ``bottom_k``, or ``k`` when unset (0: off)."""
        return self.k if self.bottom_k is None else int(self.bottom_k)

    def resolve(self, config_path: Optional[str]) -> None:
        """With a config file and no ``run`` key, the run is named after the file, else the model."""
        if not self.run and config_path:
            self.run = os.path.splitext(os.path.basename(config_path))[0]
        if not self.run:
            self.run = self.model.replace(":", "_").replace("/", "_").replace(".py", "")


# keys that decide which units win: a saved mining state is only reused when these match (the
# pipeline adds derived values: resolved layers, weights digest, image list digest, preprocessing);
# ``rule`` changes only the tiles, which are re-projected without re-mining; ``amp`` (other than
# none) joins the identity in the pipeline, so existing full-precision runs keep their hash
MINING_KEYS = ("model", "weights", "layers", "k", "images", "max_images", "channels", "seed", "resize", "crop")

FIELD_NAMES = tuple(f.name for f in fields(VisualizeConfig))


def from_mapping(values: Mapping[str, Any], base: Optional[VisualizeConfig] = None,
                 source: str = "config") -> VisualizeConfig:
    """``base`` (default: the defaults) with ``values`` applied (coerced, not validated)."""
    cfg = dataclasses.replace(base) if base is not None else VisualizeConfig()
    return cfg.update(values, source=source)


def validate(cfg: VisualizeConfig) -> VisualizeConfig:
    """:meth:`VisualizeConfig.validate`; returns ``cfg``."""
    return cfg.checked(force=True)


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> VisualizeConfig:
    """Defaults < YAML ``path`` < ``overrides`` (e.g. from the command line), validated once.

    With a config file and no ``run`` key, the run is named after the file.
    """
    return VisualizeConfig.load(path, overrides)


def to_dict(cfg: VisualizeConfig) -> Dict[str, Any]:
    """The config as plain JSON-able values."""
    return cfg.to_dict()


def config_hash(values: Mapping[str, Any], keys: Sequence[str]) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of ``values[keys]``."""
    sub = {k: values.get(k) for k in keys}
    return hashlib.sha256(json.dumps(sub, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


#: short aliases: ``torchrun`` abbreviates its own options, so ``torchrun ... -m deconvis visualize
#: --run NAME`` fails ("ambiguous option: --run could match --run-path"); ``-n NAME`` passes through
SHORT_FLAGS = {"run": "-n"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config field (default None = not given, so YAML values survive)."""
    configbase.add_arguments(parser, VisualizeConfig)


def overrides_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The config fields given on the command line (values still strings; coerced later)."""
    return configbase.overrides_from_args(VisualizeConfig, args)
