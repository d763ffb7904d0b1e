"""Load the network to study: a torchvision model, a user's callable, or deconvis's own demo net.

Model specs (``load_model(spec)``):

* a torchvision classification name: ``alexnet``, ``vgg16``, ``vgg16_bn``, ``resnet50``, ...
* ``package.module:callable`` or ``path/to/file.py:callable`` returning an ``nn.Module``
* a built-in name from :data:`BUILTIN_MODELS` (the demo net the project trains itself)

Weights (``weights=``): ``None``/``"random"`` (random init), a torchvision weights enum name
(``DEFAULT``, ``IMAGENET1K_V1``, ...; taken from the torch hub cache only, never downloaded),
or a path to a local checkpoint (a state dict, or a dict holding one under ``state_dict``/
``model``/``model_state_dict``; loaded with ``weights_only=True``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from deconvis.errors import DeconvisError, close_matches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> "module:callable" of models that ship with deconvis
BUILTIN_MODELS: Dict[str, str] = {
    "zfnet_demo": "deconvis.training.demo_model:zfnet_demo",
}


@dataclass(frozen=True)
class Preprocess:
    """How images become network input: resize the short side to ``resize`` pixels, centre-crop
    ``crop`` (h, w) pixels, scale to [0, 1], normalise by ``mean``/``std`` per RGB channel."""

    resize: int = 256
    crop: Tuple[int, int] = (224, 224)
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> Dict[str, Any]:
        return {"resize": self.resize, "crop": list(self.crop), "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Preprocess":
        crop = d.get("crop", (224, 224))
        crop = (int(crop), int(crop)) if isinstance(crop, (int, float)) else tuple(int(c) for c in crop)
        return cls(resize=int(d.get("resize", 256)), crop=crop,  # type: ignore[arg-type]
                   mean=tuple(float(m) for m in d.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
                   std=tuple(float(s) for s in d.get("std", IMAGENET_STD)))  # type: ignore[arg-type]


@dataclass
class LoadedModel:
    """A model ready for study, in eval mode, with the preprocessing its weights expect."""

    model: nn.Module
    spec: str
    weights: str
    preprocess: Preprocess = field(default_factory=Preprocess)


def torchvision_names() -> list:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _load_callable(spec: str) -> Callable[..., Any]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise DeconvisError(f"model spec {spec!r} must look like package.module:callable or file.py:callable")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise DeconvisError(f"model file {target!r} does not exist")
        mod_name = "_deconvis_user_" + os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise DeconvisError(f"cannot import model file {target!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # user's code failed: say where
            raise DeconvisError(f"importing {target!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise DeconvisError(f"cannot import module {target!r} for model spec {spec!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise DeconvisError(f"{target!r} has no attribute {attr!r}"
                            + close_matches(attr, [a for a in dir(module) if not a.startswith("_")]))
    return fn


def build_model(spec: str) -> nn.Module:
    """Build the (randomly initialised) network named by ``spec``."""
    if spec in BUILTIN_MODELS:
        fn = _load_callable(BUILTIN_MODELS[spec])
        model = fn()
    elif ":" in spec:
        fn = _load_callable(spec)
        try:
            model = fn() if callable(fn) and not isinstance(fn, nn.Module) else fn
        except Exception as exc:
            raise DeconvisError(f"calling {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        import torchvision.models as tvm

        names = torchvision_names()
        if spec not in names:
            raise DeconvisError(f"unknown model {spec!r}: not a torchvision model, a built-in "
                                f"({', '.join(BUILTIN_MODELS)}) nor module:callable"
                                + close_matches(spec, names + list(BUILTIN_MODELS)))
        model = tvm.get_model(spec, weights=None)
    if not isinstance(model, nn.Module):
        raise DeconvisError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _hub_checkpoint_path(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _torchvision_weights(spec: str, name: str):
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(spec)
    except Exception as exc:
        raise DeconvisError(f"weights {name!r} need a torchvision model name, not {spec!r}") from exc
    key = name.split(".")[-1]
    try:
        return enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise DeconvisError(f"{spec} has no weights {name!r}; choose one of "
                            f"{', '.join(w.name for w in enum)}, 'random' or a checkpoint path") from None


def _state_dict_from_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DeconvisError(f"cannot read checkpoint {path!r}: {type(exc).__name__}: {exc}") from exc
    meta: Dict[str, Any] = {}
    if isinstance(ckpt, dict):
        meta = ckpt.get("deconvis", {}) if isinstance(ckpt.get("deconvis", {}), dict) else {}
        for key in ("state_dict", "model_state_dict", "model"):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise DeconvisError(f"checkpoint {path!r} holds no state dict (expected a dict of tensors)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt.items()}
    return state, meta


def load_model(spec: str, weights: Optional[str] = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Build ``spec``, load ``weights`` into it, put it in eval mode on ``device``."""
    weights = weights or "random"
    preprocess = Preprocess()
    if os.path.isfile(weights) or weights.endswith((".pth", ".pt", ".ckpt")):
        if not os.path.isfile(weights):
            raise DeconvisError(f"checkpoint {weights!r} does not exist")
        state, meta = _state_dict_from_checkpoint(weights)
        model = build_model(meta.get("model", spec) if spec in ("", "auto") else spec)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise DeconvisError(
                f"checkpoint {weights!r} does not fit model {spec!r}: missing keys {list(missing)[:5]}, "
                f"unexpected keys {list(unexpected)[:5]}; check --model matches the checkpoint")
        if "preprocess" in meta:
            preprocess = Preprocess.from_dict(meta["preprocess"])
    elif weights.lower() == "random":
        model = build_model(spec)
    else:
        w = _torchvision_weights(spec, weights)
        path = _hub_checkpoint_path(w.url)
        if not os.path.isfile(path):
            raise DeconvisError(
                f"{spec} weights {w.name} are not in the torch hub cache and deconvis never downloads: "
                f"put {os.path.basename(w.url)} (from {w.url}) at {path} "
                f"(or set TORCH_HOME), or use --weights random or a checkpoint path")
        model = build_model(spec)
        model.load_state_dict(w.get_state_dict(progress=False, check_hash=False))
        tf = w.transforms()
        crop = tf.crop_size[0] if isinstance(tf.crop_size, (list, tuple)) else tf.crop_size
        resize = tf.resize_size[0] if isinstance(tf.resize_size, (list, tuple)) else tf.resize_size
        preprocess = Preprocess(resize=int(resize), crop=(int(crop), int(crop)),
                                mean=tuple(tf.mean), std=tuple(tf.std))  # type: ignore[arg-type]
    model.eval().to(device)
    return LoadedModel(model=model, spec=spec, weights=weights, preprocess=preprocess)
