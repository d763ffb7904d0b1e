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
import pickle
import re
import sys
import dataclasses
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
    import torchvision.models as tvm  # start-up time: torchvision's model zoo is slow to import

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


def build_model(spec: str, **builtin_kwargs: Any) -> nn.Module:
    """Build the (randomly initialised) network named by ``spec``; ``builtin_kwargs`` go to a
    built-in model's builder (e.g. ``num_classes`` recorded in a deconvis checkpoint)."""
    if spec in BUILTIN_MODELS:
        fn = _load_callable(BUILTIN_MODELS[spec])
        model = fn(**builtin_kwargs)
    elif ":" in spec:
        fn = _load_callable(spec)
        try:
            model = fn() if callable(fn) and not isinstance(fn, nn.Module) else fn
        except Exception as exc:
            raise DeconvisError(f"calling {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        import torchvision.models as tvm  # start-up time: torchvision's model zoo is slow to import

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


def torchvision_weights(spec: str, name: str):
    """The torchvision weights enum member ``name`` (``DEFAULT``, ``IMAGENET1K_V1`` or
    ``Enum.MEMBER``) of model ``spec``; reads metadata only, downloads nothing. A one-line
    :class:`DeconvisError` for an unknown model or weights name."""
    import torchvision.models as tvm  # start-up time: torchvision's model zoo is slow to import

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
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found is None:  # not a torch file (or a damaged one)
            why = re.search(r"WeightsUnpickler error: *\n*\s*([^\n]+)", text)
            raise DeconvisError(f"cannot read checkpoint {path!r}: not a readable torch file "
                                f"({why.group(1).strip() if why else 'unpickling failed'})") from None
        # torch's advice (load with weights_only=False) is not for deconvis users to follow
        raise DeconvisError(f"checkpoint {path!r} holds a Python object ({found.group(1)}), not just tensors; "
                            "deconvis never unpickles objects (that could run arbitrary code): save only the "
                            "weights (torch.save(model.state_dict(), path)) and pass that file") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DeconvisError(f"cannot read checkpoint {path!r}: {type(exc).__name__}: {first}") from None
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


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _resnet_name(state: Dict[str, torch.Tensor]) -> Optional[str]:
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    bottleneck = any(k.startswith("layer1.0.conv3.") for k in state)
    known = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
             ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
             ((3, 8, 36, 3), True): "resnet152"}
    return known.get((tuple(blocks), bottleneck))


def describe_state_dict(state: Dict[str, torch.Tensor], meta: Optional[Dict[str, Any]] = None) -> str:
    """A short guess at what network a state dict belongs to: the model a deconvis checkpoint
    names, a torchvision family recognised by its key names and conv count, and the number of
    outputs of its last weight matrix."""
    meta = meta or {}
    if meta.get("model"):
        return f"a deconvis checkpoint of model {meta['model']!r}"
    keys = list(state)
    convs = [k for k in keys if k.endswith(".weight") and state[k].dim() == 4]
    mats = [k for k in keys if k.endswith(".weight") and state[k].dim() == 2]
    outputs = f", {state[mats[-1]].shape[0]} outputs" if mats else ""
    guess = ""
    if any(k.startswith("layer1.0.conv1.") for k in keys) and any(k.startswith("fc.") for k in keys):
        guess = _resnet_name(state) or "a ResNet"
    elif any(k.startswith("features.denseblock") for k in keys):
        guess = "a DenseNet"
    elif any(k.startswith("Mixed_") for k in keys):
        guess = "inception_v3"
    elif keys and all(re.match(r"(features|classifier)\.\d+\.(weight|bias|running_|num_batches)", k)
                      for k in keys) and convs:
        bn = "_bn" if any(k.endswith("running_mean") for k in keys) else ""
        first = state[convs[0]].shape
        vgg = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}.get(len(convs))
        if len(convs) == 5 and first[-1] == 11:
            guess = "alexnet"
        elif len(convs) == 5 and first[-1] == 7:
            guess = "a ZF-style net (like deconvis's zfnet_demo)"
        elif vgg and first[-1] == 3:
            guess = vgg + bn
    what = guess if guess else "an unrecognised network"
    return f"{what} ({len(keys)} tensors, {len(convs)} conv layers{outputs})"


def check_shapes(model: nn.Module, state: Dict[str, torch.Tensor], path: str, spec: str,
                 meta: Optional[Dict[str, Any]] = None) -> None:
    """DeconvisError naming the first tensor of ``state`` whose shape differs from ``model``'s,
    both shapes, and what the file looks like it belongs to (load_state_dict would raise a long
    'size mismatch' traceback, even with ``strict=False``)."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise DeconvisError(
                f"checkpoint {path!r} does not fit model {spec!r}: {key} is {_shape(value)} in the file but "
                f"{_shape(own[key])} in the model; the file looks like {describe_state_dict(state, meta)}: "
                "pass the matching --model (or another checkpoint)")


def load_into(model: nn.Module, state: Dict[str, torch.Tensor], path: str, spec: str,
              meta: Optional[Dict[str, Any]] = None) -> None:
    """Load ``state`` (read from ``path``) into ``model``; a one-line DeconvisError when the
    shapes or the key sets differ."""
    check_shapes(model, state, path, spec, meta)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DeconvisError(
            f"checkpoint {path!r} does not fit model {spec!r}: missing keys {list(missing)[:5]}, "
            f"unexpected keys {list(unexpected)[:5]}; the file looks like {describe_state_dict(state, meta)}: "
            "check --model matches the checkpoint")


def load_model(spec: str, weights: Optional[str] = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Build ``spec``, load ``weights`` into it, put it in eval mode on ``device``."""
    weights = weights or "random"
    preprocess = Preprocess()
    if os.path.isfile(weights) or weights.endswith((".pth", ".pt", ".ckpt")):
        if not os.path.isfile(weights):
            raise DeconvisError(f"checkpoint {weights!r} does not exist")
        state, meta = _state_dict_from_checkpoint(weights)
        name = meta.get("model", spec) if spec in ("", "auto") else spec
        classes = meta.get("classes")
        kwargs = {"num_classes": len(classes)} if name in BUILTIN_MODELS and isinstance(classes, list) else {}
        model = build_model(name, **kwargs)
        load_into(model, state, weights, spec, meta)
        if "preprocess" in meta:
            preprocess = Preprocess.from_dict(meta["preprocess"])
    elif weights.lower() == "random":
        model = build_model(spec)
    else:
        w = torchvision_weights(spec, weights)
        path = _hub_checkpoint_path(w.url)
        if not os.path.isfile(path):
            raise DeconvisError(
                f"{spec} weights {w.name} are not in the torch hub cache and deconvis never downloads: "
                f"put {os.path.basename(w.url)} (from {w.url}) at {path} "
                f"(or set TORCH_HOME), or use --weights random or a checkpoint path")
        model = build_model(spec)
        try:
            hub_state, _ = _state_dict_from_checkpoint(path)
        except DeconvisError as exc:
            raise DeconvisError(f"{exc} (the hub cache file of {spec} weights {w.name}; delete it or "
                                "use --weights random)") from None
        load_into(model, hub_state, path, spec)
        tf = w.transforms()
        crop = tf.crop_size[0] if isinstance(tf.crop_size, (list, tuple)) else tf.crop_size
        resize = tf.resize_size[0] if isinstance(tf.resize_size, (list, tuple)) else tf.resize_size
        preprocess = Preprocess(resize=int(resize), crop=(int(crop), int(crop)),
                                mean=tuple(tf.mean), std=tuple(tf.std))  # type: ignore[arg-type]
    model.eval().to(device)
    return LoadedModel(model=model, spec=spec, weights=weights, preprocess=preprocess)


def asset_path(name: str) -> str:
    """The file ``name`` shipped in ``deconvis/assets`` (may not exist)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", name)


def resolve_weights(weights: str, config_dir: Optional[str] = None) -> str:
    """``asset:NAME`` -> the file in ``deconvis/assets``; relative checkpoint paths that do not
    exist from the working directory are tried against ``config_dir``."""
    if weights.startswith("asset:"):
        path = asset_path(weights[len("asset:"):])
        if not os.path.isfile(path):
            raise DeconvisError(f"weights {weights!r}: {path} does not exist; this checkout has no trained demo "
                                "checkpoint yet: train it (deconvis train) or use --weights random")
        return path
    if weights.lower() == "random" or os.path.isabs(weights) or os.path.exists(weights):
        return weights
    if config_dir and os.path.exists(os.path.join(config_dir, weights)):
        return os.path.join(config_dir, weights)
    return weights


def with_resize_crop(pp: Preprocess, resize: Optional[int], crop: Optional[int]) -> Preprocess:
    """``pp`` with ``--resize`` (short side, pixels) and ``--crop`` (square side, pixels) applied;
    None keeps the weights' value. A crop alone scales the resize by the same ratio."""
    if resize is None and crop is None:
        return pp
    crop_hw = (crop, crop) if crop is not None else pp.crop
    size = resize if resize is not None else max(1, round(crop_hw[0] * pp.resize / pp.crop[0]))
    return dataclasses.replace(pp, resize=int(size), crop=(int(crop_hw[0]), int(crop_hw[1])))
