"""Effective receptive field (Luo et al. 2016; docs/method.md section 4) and the path-count map.

The ERF map of a layer is ``|d y / d x|`` for the layer's centre unit ``y`` (seed 1 at that unit,
summed over its channels or one chosen channel), summed over the input channels and averaged
over images: a float64 array [H, W] in input pixels. It is zero outside the unit's theoretical
receptive field (:mod:`deconvis.graph.rf`) and usually fills only part of it.

:func:`path_count` is the architecture-only view: a copy of the network with every conv/linear
weight set to 1 and no biases, activations, BN, dropout and LRN removed (identity), and max/avg
pools replaced by *sum* pools of the same geometry, so the input gradient of the centre unit
counts the paths from each pixel to it.

Neither function changes the user's model: the ERF runs the model itself in eval mode (modes
restored, parameter gradients untouched); the path count works on a deep copy.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from deconvis.errors import DeconvisError
from deconvis.graph.ops import MERGE_FUNCS, PASS_FUNCS, PASS_METHODS, PASS_MODULES, Pair, window_params
from deconvis.graph.rf import (Box, LayerRF, RFTable, TracedGraph, size_pair, clip_box, pool_out_size,
                               resolve_layer, table_from_traced, trace_graph)
from deconvis.graph.trace import truncated_module
from deconvis.io.atomic import atomic_path, write_png
from deconvis.io.rgb import swap_red_blue
from deconvis.utils.device import model_dtype_device


# ------------------------------------------------------------------------------------ helpers
def centre_unit(row: LayerRF, input_size: Pair) -> Tuple[int, int]:
    """The unit of ``row`` whose RF centre lies closest to the image centre (ties: the lower index)."""
    if row.whole:
        return ((row.out[0] - 1) // 2, (row.out[1] - 1) // 2)
    unit = []
    for a in (0, 1):
        v = ((input_size[a] - 1) / 2 - row.start[a]) / row.jump[a]
        unit.append(min(max(math.ceil(v - 0.5), 0), row.out[a] - 1))
    return (unit[0], unit[1])


def _select(y: torch.Tensor, unit: Tuple[int, int], channel: Optional[int], layer: str) -> torch.Tensor:
    """Sum over the batch of the seeded output: unit (y, x), one channel or all channels."""
    if y.dim() == 4:
        if channel is not None and not 0 <= channel < y.shape[1]:
            raise DeconvisError(f"channel {channel} is out of range for layer {layer!r} with {y.shape[1]} channels")
        sel = y[:, :, unit[0], unit[1]]
    elif y.dim() == 2:
        if channel is not None and not 0 <= channel < y.shape[1]:
            raise DeconvisError(f"channel {channel} is out of range for layer {layer!r} with {y.shape[1]} features")
        sel = y
    else:
        raise DeconvisError(f"layer {layer!r} outputs shape {list(y.shape)}; the ERF needs [N, C, h, w] or [N, F]")
    return (sel[:, channel] if channel is not None else sel).sum()


@dataclass
class ERF:
    """An effective-receptive-field map.

    ``map``: float64 [H, W], mean over images of ``sum_c |d y / d x_c|``; ``unit``: (y, x) of the
    seeded unit of ``layer`` (the row name); ``rf_box``: its theoretical half-open box (unclipped),
    ``clipped_box``: the same box clipped to the image.
    """

    layer: str
    unit: Tuple[int, int]
    channel: Optional[int]
    map: np.ndarray
    rf_box: Box
    clipped_box: Box
    input_size: Pair
    n_images: int

    def mass_fraction(self, q: float = 0.95) -> float:
        """Fraction of the theoretical RF area (clipped to the image) taken by the fewest pixels
        that together hold ``q`` of the ERF mass (largest values first). NaN for an all-zero map."""
        if not 0.0 < q <= 1.0:
            raise DeconvisError(f"mass fraction q={q} must be in (0, 1]")
        y0, y1, x0, x1 = self.clipped_box
        area = (y1 - y0) * (x1 - x0)
        vals = self.map.ravel()
        if not (vals < 0).any():  # an ERF: zeros (most of the map outside the RF) hold no mass, skip their sort
            vals = vals[vals > 0]
        vals = np.sort(vals)[::-1]
        csum = np.cumsum(vals)
        total = csum[-1] if csum.size else 0.0
        if area <= 0 or total <= 0:
            return float("nan")
        k = int(np.searchsorted(csum, q * total, side="left")) + 1
        return min(k, vals.size) / area


def _prepare(model: nn.Module, layer: str, input_size: Union[int, Sequence[int]], in_channels: int
             ) -> Tuple[TracedGraph, RFTable, str]:
    tg = trace_graph(model)
    table = table_from_traced(tg, input_size, in_channels)
    return tg, table, resolve_layer(model, table, layer)


def effective_receptive_field(model: nn.Module, layer: str, input_size: Union[int, Sequence[int], None] = None,
                              images: Optional[torch.Tensor] = None, n_random: int = 16, seed: int = 0,
                              batch: int = 8, channel: Optional[int] = None,
                              unit: Optional[Tuple[int, int]] = None) -> ERF:
    """ERF map of ``layer``'s centre unit (or ``unit``) over ``images`` [N, C, H, W] or, by
    default, ``n_random`` seeded N(0, 1) images of ``input_size``. Seeds all channels of the unit
    (summed) unless ``channel`` is given. The model runs in eval mode; its modes are restored."""
    if images is not None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise DeconvisError("images must be a tensor [N, C, H, W]")
        size = (int(images.shape[2]), int(images.shape[3]))
        if input_size is not None and size_pair(input_size) != size:
            raise DeconvisError(f"input size {input_size} does not match the images' {size[0]}x{size[1]}")
        in_channels = int(images.shape[1])
    else:
        if input_size is None:
            raise DeconvisError("give input_size or images")
        size = size_pair(input_size)
        in_channels = 3
        if n_random < 1:
            raise DeconvisError(f"n_random={n_random} must be at least 1")
        gen = torch.Generator().manual_seed(int(seed))
        images = torch.randn(n_random, in_channels, size[0], size[1], generator=gen)
    if batch < 1:
        raise DeconvisError(f"batch={batch} must be at least 1")
    tg, table, name = _prepare(model, layer, size, in_channels)
    row = table[name]
    u = centre_unit(row, size) if unit is None else (int(unit[0]), int(unit[1]))
    box = row.box(*u)  # also checks the unit
    sub = truncated_module(tg, tg.node(name))
    dtype, device = model_dtype_device(model)
    modes = {m: m.training for m in model.modules()}
    acc = torch.zeros(size, dtype=torch.float64)
    try:
        model.eval()
        with torch.enable_grad():
            for i in range(0, images.shape[0], batch):
                x = images[i:i + batch].to(device=device, dtype=dtype).requires_grad_(True)
                s = _select(sub(x.clone()), u, channel, name)
                (g,) = torch.autograd.grad(s, x, allow_unused=True)
                if g is not None:
                    acc += g.detach().abs().sum(dim=(0, 1)).to("cpu", torch.float64)
    finally:
        for m, training in modes.items():
            m.training = training
    erf_map = (acc / images.shape[0]).numpy()
    return ERF(layer=name, unit=u, channel=channel, map=erf_map, rf_box=box,
               clipped_box=clip_box(box, size)[0], input_size=size, n_images=int(images.shape[0]))


# ---------------------------------------------------------------------------------- path count
class SumPool2d(nn.Module):
    """Sum over each window of a max/avg pool's geometry (kernel, stride, padding, dilation,
    ceil_mode as PyTorch pools), padding with zeros: [N, C, H, W] -> [N, C, h, w]."""

    def __init__(self, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair = (1, 1), ceil_mode: bool = False):
        super().__init__()
        self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode = kernel, stride, padding, dilation, ceil_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for a in (1, 0):  # F.pad order: width (left, right) then height (top, bottom)
            n, k, s, p, d = x.shape[2 + a], self.kernel[a], self.stride[a], self.padding[a], self.dilation[a]
            target = pool_out_size(n, k, s, p, d, self.ceil_mode)
            extra = max(0, (target - 1) * s + d * (k - 1) + 1 - n - 2 * p)
            pads += [p, p + extra]
        c = x.shape[1]
        ones = torch.ones(c, 1, self.kernel[0], self.kernel[1], dtype=x.dtype, device=x.device)
        return F.conv2d(F.pad(x, pads), ones, stride=self.stride, dilation=self.dilation, groups=c)


def _path_count_rewrite(gm: torch.fx.GraphModule):
    count = [0]

    def rewrite(g: torch.fx.Graph, n: torch.fx.Node, env: Dict[torch.fx.Node, torch.fx.Node]) -> Optional[torch.fx.Node]:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, PASS_MODULES):
                return env[n.args[0]]  # activation, BN, dropout, LRN: identity
            if isinstance(m, nn.AdaptiveMaxPool2d):
                return g.call_function(F.adaptive_avg_pool2d, (env[n.args[0]], m.output_size))
        if n.op == "call_function" and n.target in PASS_FUNCS and n.target not in MERGE_FUNCS:
            return env[n.args[0]]
        if n.op == "call_method" and n.target in PASS_METHODS:
            return env[n.args[0]]
        if n.op in ("call_module", "call_function"):
            win = window_params(n, gm, {})
            if win is not None and not win["conv"]:
                count[0] += 1
                name = f"_deconvis_sumpool{count[0]}"
                gm.add_submodule(name, SumPool2d(win["k"], win["s"], win["p"], win["d"], win["ceil"]))
                return g.call_module(name, (env[n.args[0]],))
        return None

    return rewrite


def path_count(model: nn.Module, layer: str, input_size: Union[int, Sequence[int]], channel: int = 0,
               in_channels: int = 3, unit: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Contribution-count map float64 [H, W]: for the centre unit (or ``unit``) of ``layer``,
    channel ``channel``, the number of paths from each input pixel (summed over input channels)
    in a copy of the network with unit weights, no biases, no nonlinearity/BN, and sum pools."""
    size = size_pair(input_size)
    work = copy.deepcopy(model).to("cpu", torch.float64)
    tg, table, name = _prepare(work, layer, size, in_channels)
    row = table[name]
    u = centre_unit(row, size) if unit is None else (int(unit[0]), int(unit[1]))
    row.box(*u)
    with torch.no_grad():
        for m in work.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
    sub = truncated_module(tg, tg.node(name), _path_count_rewrite(tg.graph_module))
    work.eval()
    x = torch.zeros(1, in_channels, size[0], size[1], dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        s = _select(sub(x.clone()), u, channel, name)
        (g,) = torch.autograd.grad(s, x, allow_unused=True)
    if g is None:
        return np.zeros(size, dtype=np.float64)
    return g.detach().sum(dim=(0, 1)).numpy()


# -------------------------------------------------------------------------------------- drawing
def heatmap_image(values: np.ndarray, box: Optional[Box] = None, log: bool = False, min_side: int = 256,
                  colormap: Optional[int] = None) -> np.ndarray:
    """RGB uint8 [H*f, W*f, 3] heat map of ``values`` [H, W] (scaled to its maximum; ``log``:
    log1p of values / min positive), enlarged by an integer factor f so the longer side reaches
    ``min_side``, with the half-open input-pixel ``box`` (y0, y1, x0, x1) drawn as a rectangle."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"heat map needs [H, W] values, got shape {v.shape}")
    v = np.where(np.isfinite(v), np.abs(v), 0.0)
    if log and (v > 0).any():
        v = np.log1p(v / v[v > 0].min())
    top = v.max()
    grey = np.zeros(v.shape, np.uint8) if top <= 0 else np.round(v / top * 255).astype(np.uint8)
    f = max(1, int(min_side) // max(v.shape))
    if f > 1:
        grey = cv2.resize(grey, (v.shape[1] * f, v.shape[0] * f), interpolation=cv2.INTER_NEAREST)
    bgr = cv2.applyColorMap(grey, cv2.COLORMAP_INFERNO if colormap is None else colormap)
    if box is not None:
        y0, y1, x0, x1 = box
        if y1 > y0 and x1 > x0:
            cv2.rectangle(bgr, (x0 * f, y0 * f), (x1 * f - 1, y1 * f - 1), (0, 255, 0), 1)
    return swap_red_blue(bgr)


def write_heatmap(path: Union[str, os.PathLike], values: np.ndarray, box: Optional[Box] = None,
                  log: bool = False, min_side: int = 256) -> None:
    """Write :func:`heatmap_image` as a PNG, atomically."""
    write_png(path, heatmap_image(values, box, log=log, min_side=min_side))


def write_npy(path: Union[str, os.PathLike], array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))
            f.flush()
            os.fsync(f.fileno())


__all__ = ["ERF", "SumPool2d", "centre_unit", "effective_receptive_field", "heatmap_image", "path_count",
           "write_heatmap", "write_npy"]
