"""Prepare a run: load the model and the image set, resolve the layers once into
:class:`~deconvis.runs.layers.LayerSpec` records, and check on one grey image that every layer
can be mined and projected -- so every user error surfaces before any work starts."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from deconvis.errors import DeconvisError
from deconvis.io.images import ImageSource, open_images
from deconvis.io.models import Preprocess, load_model, resolve_weights, with_resize_crop
from deconvis.mirror.deconvnet import DeconvNet
from deconvis.runs import precision
from deconvis.runs.config import VisualizeConfig
from deconvis.runs.distributed import DistInfo
from deconvis.runs.layers import LayerSpec, layer_specs
from deconvis.runs.phases.rundir import Identity, run_identity
from deconvis.utils.device import bf16_native, model_dtype_device, use_device


@dataclass
class Context:
    """Everything prepared (and validated) before any work starts."""

    cfg: VisualizeConfig
    run_dir: str
    device: torch.device
    dtype: torch.dtype
    loaded: Any                    # models.LoadedModel
    dn: Any                        # deconvnet.DeconvNet
    specs: List[LayerSpec]         # the visualised layers, in the order given
    preprocess: Preprocess
    source: ImageSource
    identity: Identity
    info: DistInfo = field(default_factory=DistInfo)
    amp: Optional[torch.dtype] = None  # autocast dtype of the mining forward

    @property
    def layers(self) -> List[str]:
        """Step names of the visualised layers (what the deconvnet and the top-k index by)."""
        return [s.name for s in self.specs]

    @property
    def mining_hash(self) -> str:
        return self.identity.mining_hash

    @property
    def projection_hash(self) -> str:
        return self.identity.projection_hash


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
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


def autocast(ctx: Context) -> Any:
    """The mining forward's autocast context (a no-op without ``--amp``)."""
    if ctx.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.amp)


def _resolve_layers(dn, cfg: VisualizeConfig) -> List[str]:
    """``--layers`` as step names (aliases resolved, duplicates dropped); every conv layer if empty."""
    if not cfg.layers:
        layers = dn.conv_layers()
        if not layers:
            raise DeconvisError(f"model {cfg.model!r} has no conv layers; name --layers explicitly")
        return layers
    out: List[str] = []
    for name in cfg.layers:
        step = dn.resolve(name)
        if step not in out:
            out.append(step)
    return out


def prepare(cfg: VisualizeConfig, run_dir: str, config_dir: Optional[str] = None,
            info: Optional[DistInfo] = None) -> Context:
    """Load the model and image set, resolve layers, check they can be mined and projected.

    All user errors surface here, before any mining. ``info`` (from
    :func:`deconvis.runs.distributed.session`) gives this rank's device; default: ``cfg.device``."""
    device = info.device if info is not None else use_device(cfg.device)  # (a session made it current)
    info = info if info is not None else DistInfo(device=device, timeout_s=cfg.dist_timeout)
    amp = amp_dtype(cfg.amp, device)
    source = open_images(cfg.images, cfg.max_images, base_dir=config_dir, max_pixels=cfg.max_pixels)
    weights = resolve_weights(cfg.weights, config_dir)
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, weights, device)
    pp = with_resize_crop(loaded.preprocess, cfg.resize, cfg.crop)
    dn = DeconvNet(loaded.model)
    layers = _resolve_layers(dn, cfg)
    dtype = model_dtype_device(loaded.model)[0]
    # dry run on one grey image: map sizes, and that every layer can be projected
    probe = torch.zeros(1, 3, *pp.crop, device=device, dtype=dtype)
    specs = layer_specs(dn, layers, dn.forward(probe), pp.crop, cfg.channels)
    for spec in specs:
        dn.project_window(spec.name, torch.zeros(1, 4, dtype=torch.long), rule=cfg.rule)
    if amp is not None:  # the mining forward works under autocast here (an unsupported op fails now)
        try:
            with torch.autocast(device_type=device.type, dtype=amp):
                dn.activations(probe, layers)
        except DeconvisError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DeconvisError(f"--amp {cfg.amp} does not work for this model on {device.type} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0]}); use --amp none") from exc
    return Context(cfg=cfg, run_dir=run_dir, device=device, dtype=dtype, loaded=loaded, dn=dn, specs=specs,
                   preprocess=pp, source=source, identity=run_identity(cfg, layers, weights, source, pp,
                                                                          precision.identity_extra(cfg, device)),
                   info=info, amp=amp)
