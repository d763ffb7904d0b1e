"""Helpers shared by the Section 4 analyses (invariance, correspondence, diagnosis).

The settings every analysis has (:class:`AnalysisConfig`: model, weights, output folder, device,
threads), loading a network and single images, resolving layer names through :class:`DeconvNet`, the
class-score layer, checks of class ids, and writing figures and Markdown tables atomically.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from deconvis.config import Config, option
from deconvis.errors import DeconvisError, close_matches
from deconvis.io.atomic import write_bytes
from deconvis.io.images import SKIMAGE_PHOTOS, UnreadableImage, normalize, preprocess_image, read_image, skimage_photo
from deconvis.io.models import LoadedModel, Preprocess, load_model, resolve_weights
from deconvis.utils.device import use_device


@dataclass
class AnalysisConfig(Config):
    """The model, its weights, where to write, and where to compute: the first keys of every
    analysis config (a subclass redefines ``out_dir`` to give its own default folder)."""

    model: str = option("zfnet_demo", "torchvision name, module:callable, file.py:callable or zfnet_demo")
    weights: str = option("asset:zfnet_demo.pt", "checkpoint path, asset:NAME, a torchvision weights name or random")
    out_dir: str = option("outputs/analysis", "output folder")
    device: str = option("cpu", "auto, cpu, cuda or cuda:N")
    threads: int = option(0, "torch CPU threads (0: torch's default)")


def apply_threads(threads: int) -> None:
    """Use ``threads`` torch CPU threads (0: leave torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


#: the border fills the transforms and masks know; values in the network's normalised input space
FILLS = ("mean", "black", "edge", "reflect")


def load_network(model: str, weights: str = "random", device: str = "cpu") -> LoadedModel:
    """:func:`deconvis.io.models.load_model` after resolving ``asset:NAME`` weights (files shipped in
    ``deconvis/assets``) and the device (``auto``: cuda, then mps, then cpu)."""
    return load_model(model, resolve_weights(weights or "random"), device=use_device(device))


def read_photo(spec: str, base_dir: Optional[str] = None) -> np.ndarray:
    """``skimage:NAME`` (a photo bundled with scikit-image) or an image file path (relative paths
    tried against ``base_dir`` too) -> uint8 RGB [H, W, 3]."""
    if spec.startswith("skimage:"):
        name = spec[len("skimage:"):]
        if name not in SKIMAGE_PHOTOS:
            raise DeconvisError(f"unknown scikit-image photo {name!r}; choose one of {', '.join(SKIMAGE_PHOTOS)}"
                                + close_matches(name, SKIMAGE_PHOTOS))
        return skimage_photo(name).copy()
    path = spec
    if not os.path.isfile(path) and base_dir and os.path.isfile(os.path.join(base_dir, spec)):
        path = os.path.join(base_dir, spec)
    if not os.path.isfile(path):
        raise DeconvisError(f"image {spec!r} does not exist; give a file path or skimage:NAME (e.g. skimage:astronaut)")
    try:
        return read_image(path)
    except UnreadableImage as exc:
        raise DeconvisError(f"cannot read image {spec!r}: {exc}") from None


def to_input(photo: np.ndarray, pp: Preprocess) -> Tuple[np.ndarray, Tensor]:
    """uint8 RGB photo -> (displayed uint8 [h, w, 3], network input float32 [3, h, w]) as the
    model's preprocessing (short side ``pp.resize``, centre crop ``pp.crop``, normalise)."""
    shown = preprocess_image(photo, pp)
    return shown, normalize(shown, pp)


def fill_value(fill: str, pp: Preprocess) -> Tensor:
    """Per-channel constant [3] in normalised input space for a constant ``fill``: ``mean`` -> 0
    (the normalisation mean colour), ``black`` -> ``-mean / std`` (pixel value 0)."""
    if fill == "mean":
        return torch.zeros(3, dtype=torch.float64)
    if fill == "black":
        return -torch.tensor(pp.mean, dtype=torch.float64) / torch.tensor(pp.std, dtype=torch.float64)
    raise DeconvisError(f"fill {fill!r} is not a constant fill; choose mean or black")


def check_fill(fill: str, allowed: Sequence[str] = FILLS) -> str:
    if fill not in allowed:
        raise DeconvisError(f"fill {fill!r} is unknown; choose one of {', '.join(allowed)}" + close_matches(fill, allowed))
    return fill


def resolve_layers(dn, layers: Sequence[str]) -> List[str]:
    """Row names of ``layers`` (aliases such as conv5 / fc6, container or row names); at least one."""
    layers = list(layers)
    if not layers:
        raise DeconvisError("no layers given; name at least one layer, e.g. conv1 or fc6")
    return [dn.resolve(l) for l in layers]


def output_layer(dn, images: Tensor) -> str:
    """The row name of the class scores: the last layer, which must give [N, K] logits."""
    name = dn.layer_names[-1]
    out = dn.activations(images[:1], [name])[name]
    if out.dim() != 2:
        raise DeconvisError(f"the model's output {name!r} has shape {list(out.shape)}; class probabilities "
                            "need [N, num_classes] logits")
    return name


def check_targets(targets: Sequence[int], num_classes: int) -> List[int]:
    """Class ids as ints in [0, num_classes); DeconvisError otherwise."""
    out = []
    for t in targets:
        t = int(t)
        if not 0 <= t < num_classes:
            raise DeconvisError(f"target class {t} is out of range: the model has {num_classes} classes "
                                f"(0..{num_classes - 1})")
        out.append(t)
    return out


def flat(act: Tensor) -> Tensor:
    """[N, ...] activation -> float64 feature vectors [N, D]."""
    return act.reshape(act.shape[0], -1).double()


def save_figure(fig, path: str, dpi: int = 80) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt  # start-up time: matplotlib loads only when a figure is drawn

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    import matplotlib  # start-up time: matplotlib loads only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up time: matplotlib loads only when a figure is drawn

    return plt


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table (cells formatted with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def jsonable(obj):
    """numpy arrays/scalars inside dicts and lists -> plain Python values (for JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def softmax_prob(logits: Tensor, targets: Tensor) -> np.ndarray:
    """Probability of class ``targets[i]`` for row i of ``logits`` [N, K] (float64) -> [N]."""
    p = torch.softmax(logits.double(), dim=1)
    return p[torch.arange(len(p)), targets.long().to(p.device)].cpu().numpy()


def batch_of(inputs: Sequence[Tensor]) -> Tensor:
    """Stack [3, h, w] inputs; DeconvisError when sizes differ."""
    shapes = {tuple(x.shape) for x in inputs}
    if len(shapes) != 1:
        raise DeconvisError(f"images have different input shapes {sorted(shapes)}; use one preprocessing")
    return torch.stack(list(inputs))

