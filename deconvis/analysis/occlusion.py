"""Occlusion sensitivity (Zeiler & Fergus 2014, Sec. 4.2, Fig. 7), exact and incremental.

A square of ``size`` pixels, filled with ``fill``, slides over the image with ``stride`` pixels
between positions (every position lies wholly inside the image; the last one stops where the
next would run past the border, so a stride that does not divide ``H - size`` leaves a margin).
For each position :func:`occlusion` records, from one incremental pass
(:mod:`deconvis.analysis.occlusion_engine`):

(b) the total activation (summed over space) of the feature map of ``layer`` that is strongest
    in the unoccluded image (the channel holding the largest single activation);
(c) (once) that map's deconvnet projection (:meth:`DeconvNet.project_map`);
(d) the probability (softmax of the output) of the ``target`` class, by default the unoccluded
    top class;
(e) the most probable class and its probability.

Maps are [rows, cols] over square positions; ``tops_y[i]``, ``tops_x[j]`` are the top-left
pixel of the square of cell (i, j).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from deconvis.analysis.occlusion_engine import IncrementalOcclusion
from deconvis.errors import DeconvisError
from deconvis.mirror.deconvnet import DeconvNet

Pair = Tuple[int, int]
FILLS = ("mean", "zero")


def _pair(v: Union[int, Sequence[int]], what: str) -> Pair:
    vals = [v, v] if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else list(v) \
        if isinstance(v, (tuple, list)) else None
    if vals is None or len(vals) != 2 or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
                                                 for a in vals):
        raise DeconvisError(f"{what} must be an int or (height, width) of ints, got {v!r}")
    return int(vals[0]), int(vals[1])


def grid(extent: int, size: int, stride: int) -> List[int]:
    """Top (or left) pixels of the square positions along one axis: 0, stride, ... while the
    square fits inside ``extent`` pixels."""
    return list(range(0, extent - size + 1, stride))


def fill_values(image: Tensor, fill: Union[str, float]) -> Tensor:
    """The occluder's value per channel [C] in the model's input space: ``mean`` = the image's
    mean per channel, ``zero`` = 0 (for normalised inputs the training set's mean colour, ZF's
    grey), a number = that value in every channel."""
    if isinstance(fill, str):
        key = fill.strip().lower()
        if key == "mean":
            return image[0].mean((1, 2))
        if key == "zero":
            return image.new_zeros(image.shape[1])
        try:
            fill = float(key)
        except ValueError:
            raise DeconvisError(f"fill {fill!r} is not one of {', '.join(FILLS)} or a number") from None
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not math.isfinite(float(fill)):
        raise DeconvisError(f"fill {fill!r} must be one of {', '.join(FILLS)} or a finite number")
    return image.new_full((image.shape[1],), float(fill))


@dataclass
class OcclusionResult:
    """Maps over square positions ([rows, cols], row i = top pixel ``tops_y[i]``) and their context.

    ``activation`` (b): total activation of channel ``channel`` of ``layer``; ``projection`` (c):
    that map's deconvnet projection [C_in, H, W] (input space); ``probability`` (d): probability
    of class ``target``; ``top_class`` / ``top_probability`` (e): most probable class per
    position. ``class_names`` names every class that appears (index -> name).
    """

    layer: str
    layer_label: str
    channel: int
    size: Pair
    stride: Pair
    fill: str
    fill_value: List[float]
    image_size: Pair
    tops_y: List[int]
    tops_x: List[int]
    activation: np.ndarray
    clean_activation: float
    projection: np.ndarray
    target: int
    probability: np.ndarray
    clean_probability: float
    top_class: np.ndarray
    top_probability: np.ndarray
    clean_top_class: int
    class_names: Dict[int, str]
    fallback: List[str] = field(default_factory=list)
    whole: List[str] = field(default_factory=list)
    macs_bound: float = 1.0

    def name(self, cls: int) -> str:
        return self.class_names.get(int(cls), f"class {int(cls)}")

    def to_json(self) -> Dict[str, Any]:
        """JSON-ready record (maps as nested lists, rows = square tops)."""
        return {
            "layer": self.layer, "layer_label": self.layer_label, "channel": self.channel,
            "square_size": list(self.size), "stride": list(self.stride), "fill": self.fill,
            "fill_value": [float(v) for v in self.fill_value], "image_size": list(self.image_size),
            "tops_y": list(self.tops_y), "tops_x": list(self.tops_x),
            "activation": self.activation.tolist(), "clean_activation": self.clean_activation,
            "target": self.target, "target_name": self.name(self.target),
            "probability": self.probability.tolist(), "clean_probability": self.clean_probability,
            "top_class": self.top_class.tolist(), "top_probability": self.top_probability.tolist(),
            "clean_top_class": self.clean_top_class,
            "class_names": {str(k): v for k, v in sorted(self.class_names.items())},
            "computed_in_full": {"whole_image_units": self.whole, "not_windowable": self.fallback},
            "arithmetic_bound": self.macs_bound,
        }


def _strongest_channel(act: Tensor) -> int:
    """Channel of ``act`` [1, C, ...] holding the largest single activation (ties: lower index)."""
    flat = act[0].reshape(act.shape[1], -1).amax(1)
    return int(torch.argmax(flat))


def occlusion(model: nn.Module, image: Tensor, layer: Optional[str] = None, size: Union[int, Pair] = 32,
              stride: Union[int, Pair] = 8, fill: Union[str, float] = "mean", target: Optional[int] = None,
              batch_size: int = 64, class_names: Optional[Sequence[str]] = None, rule: str = "deconvnet",
              progress: bool = False) -> OcclusionResult:
    """Occlusion sensitivity of ``model`` on ``image`` ([C, H, W] or [1, C, H, W], model input space).

    ``layer``: the layer of map (b) (row, container or alias; default the last conv layer, ZF's
    layer 5); ``size``/``stride``: square side and step in pixels (int or (h, w)); ``fill``:
    ``mean``, ``zero`` or a number (see :func:`fill_values`); ``target``: class of map (d)
    (default: the unoccluded top class); ``batch_size``: squares per incremental pass;
    ``class_names``: names by class index (default: ``class N``).
    """
    if not isinstance(image, Tensor):
        raise DeconvisError(f"image must be a torch.Tensor [C, H, W], got {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise DeconvisError(f"image must have shape [C, H, W] or [1, C, H, W], got {list(image.shape)}")
    H, W = int(image.shape[-2]), int(image.shape[-1])
    size_hw, stride_hw = _pair(size, "size"), _pair(stride, "stride")
    if min(size_hw) < 1 or size_hw[0] > H or size_hw[1] > W:
        raise DeconvisError(f"square {size_hw[0]}x{size_hw[1]} px does not fit the {H}x{W} image; use --size "
                            f"between 1 and {min(H, W)}")
    if min(stride_hw) < 1:
        raise DeconvisError(f"stride {stride_hw[0]}x{stride_hw[1]} must be at least 1 pixel")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise DeconvisError(f"batch size {batch_size!r} must be at least 1")

    dn = DeconvNet(model)
    x = dn.prepare_images(image)
    layer_name = dn.resolve(layer) if layer is not None else _default_layer(dn)
    fill_vec = fill_values(x, fill)
    act = dn.forward(x)[layer_name]
    channel = _strongest_channel(act)
    clean_activation = float(act[0, channel].sum())
    projection = dn.project_map(layer_name, 0, [channel], rule=rule)[0].detach().cpu().numpy()
    dn.release()

    try:
        table = dn.receptive_fields((H, W))
    except DeconvisError:
        table = None
    eng = IncrementalOcclusion(model, x, size_hw, [layer_name], graph=dn.graph, table=table, mirror=dn.mirror)
    if eng.fallback:
        warnings.warn(f"occlusion: {len(eng.fallback)} op(s) cannot be windowed and run in full for each batch "
                      f"of squares: {', '.join(eng.fallback[:5])}", RuntimeWarning, stacklevel=2)
    clean_probs = torch.softmax(eng.clean[eng.output].reshape(1, -1).to(torch.float64), -1)[0]
    K = clean_probs.numel()
    clean_top = int(torch.argmax(clean_probs))
    if target is None:
        target = clean_top
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= int(target) < K:
        raise DeconvisError(f"target class {target!r} is out of range: the model has {K} classes (0..{K - 1})")
    target = int(target)

    ys, xs = grid(H, size_hw[0], stride_hw[0]), grid(W, size_hw[1], stride_hw[1])
    tops = torch.tensor([(y, x_) for y in ys for x_ in xs], dtype=torch.long)
    act_all, p_all, cls_all, pc_all = [], [], [], []
    chunks = tops.split(int(batch_size))
    if progress:
        chunks = tqdm(chunks, desc="occlusion", unit="batch")
    for chunk in chunks:
        out = eng.run(chunk, fill_vec)
        probs = torch.softmax(out.logits.to(torch.float64), -1)
        act_all.append(out.sums[layer_name][:, channel].to(torch.float64).cpu())
        p_all.append(probs[:, target].cpu())
        pc, cls = probs.max(-1)
        cls_all.append(cls.cpu())
        pc_all.append(pc.cpu())
    shape = (len(ys), len(xs))
    top_class = torch.cat(cls_all).reshape(shape).numpy()
    used = sorted({int(c) for c in np.unique(top_class)} | {target, clean_top})
    names = {c: (str(class_names[c]) if class_names is not None and c < len(class_names) else f"class {c}")
             for c in used}
    return OcclusionResult(
        layer=layer_name, layer_label=dn.display_name(layer if layer is not None else layer_name), channel=channel,
        size=size_hw, stride=stride_hw, fill=str(fill), fill_value=[float(v) for v in fill_vec.cpu()],
        image_size=(H, W), tops_y=ys, tops_x=xs,
        activation=torch.cat(act_all).reshape(shape).numpy(), clean_activation=clean_activation,
        projection=projection, target=target, probability=torch.cat(p_all).reshape(shape).numpy(),
        clean_probability=float(clean_probs[target]), top_class=top_class,
        top_probability=torch.cat(pc_all).reshape(shape).numpy(), clean_top_class=clean_top, class_names=names,
        fallback=list(eng.fallback), whole=list(eng.whole), macs_bound=float(eng.bound))


def _default_layer(dn: DeconvNet) -> str:
    convs = dn.conv_layers()
    if not convs:
        raise DeconvisError(f"{type(dn.model).__name__} has no conv layer to take map (b) from; pass layer=")
    return convs[-1]


__all__ = ["FILLS", "OcclusionResult", "fill_values", "grid", "occlusion"]
