"""Feature visualisation by optimisation: the image that maximises a channel (or one unit).

:func:`visualize_channels` optimises one image per channel, all channels of a chunk in one
forward pass: image ``i`` of the batch is scored by channel ``channels[i]`` alone, so the batch
is many independent problems sharing the arithmetic. Each image is a
:class:`~deconvis.featvis.param.FourierParam` spectrum (decorrelated colour, 1/f scaling), seen
through a fresh random jitter, zoom and rotation at every step (:mod:`deconvis.featvis.robust`),
normalised as the weights expect, and run through the model up to the layer only (a truncated
copy of the traced graph that shares the model's modules). Adam ascends the objective: the mean
of the channel's map, or the unit at (y, x).

The model is not changed: it runs in eval mode (its modes are restored afterwards), gradients
are taken with respect to the spectra only (parameters' ``.grad`` and ``requires_grad`` are left
alone), and no hook is added.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.fx
from torch import Tensor, nn

from deconvis.errors import DeconvisError
from deconvis.featvis import robust
from deconvis.featvis.param import FourierParam
from deconvis.graph.ops import relu_unit
from deconvis.graph.trace import TracedGraph, signal_inputs, trace_graph, truncated_module
from deconvis.io.models import IMAGENET_MEAN, IMAGENET_STD
from deconvis.utils.device import model_dtype_device

Size = Union[int, Sequence[int]]


@dataclass
class FeatVis:
    """Result of :func:`visualize_channels`.

    ``images``: float [C, 3, H, W] in (0, 1), CPU, one per entry of ``channels``; ``objective``:
    float64 [C], the objective of each final image seen untransformed; ``history``: float64
    [steps, C], the objective ascended at each step (under that step's transform; the ReLU's
    input with ``preactivation`` on a ReLU layer); ``layer``: the row name,
    ``label``: the name to show; ``unit``: (y, x) or None for the channel mean; ``seconds``: wall
    time of the optimisation."""

    layer: str
    label: str
    channels: List[int]
    unit: Optional[Tuple[int, int]]
    images: Tensor
    objective: Tensor
    history: Tensor
    size: Tuple[int, int]
    seconds: float
    settings: Dict[str, object] = field(default_factory=dict)


def _size(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        pair = (size, size)
    else:
        pair = tuple(int(v) for v in size)
    if len(pair) != 2 or min(pair) < 1:
        raise DeconvisError(f"image size {size!r} must be a positive int or (h, w) pixels")
    return pair  # type: ignore[return-value]


def channel_seed(seed: int, channel: int) -> int:
    """The seed of channel ``channel``'s initial image: depends on (seed, channel) only."""
    return int(np.random.SeedSequence([int(seed), int(channel)]).generate_state(1)[0])


class LayerObjective:
    """Scores images by a layer's channels: built once per (model, layer), reusable for many
    channel sets. ``layer``: row name, container or alias (:meth:`TracedGraph.resolve`)."""

    def __init__(self, model: nn.Module, layer: str, traced: Optional[TracedGraph] = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.model = model
        self.traced = traced if traced is not None else trace_graph(model)
        self.layer = self.traced.resolve(layer)
        self.label = self.traced.label(layer)
        node = self.traced.node(self.layer)
        self.sub = truncated_module(self.traced, node)
        # a plain ReLU layer can also be scored through its input: the same optimum where the unit
        # fires, and a gradient where it does not yet (Lucid's "_pre_relu" layers)
        self.pre_sub: Optional[torch.fx.GraphModule] = None
        unit = relu_unit(node, self.traced.graph_module)
        ins = signal_inputs(node, self.traced.signal)
        if unit is not None and unit.kind == "relu" and len(ins) == 1 and ins[0].op != "placeholder":
            self.pre_sub = truncated_module(self.traced, ins[0])
        self.dtype, self.device = model_dtype_device(model)
        self.mean = torch.tensor(mean, dtype=self.dtype, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=self.dtype, device=self.device).view(1, -1, 1, 1)
        self.normalization = ([float(v) for v in mean], [float(v) for v in std])

    def output(self, images: Tensor, pre: bool = False) -> Tensor:
        """The layer's output for ``images`` [N, 3, H, W] in [0, 1] (normalised here); ``pre``:
        the input of the layer's ReLU instead, when the layer is one (else its output)."""
        sub = self.pre_sub if pre and self.pre_sub is not None else self.sub
        return sub((images.to(self.device, self.dtype) - self.mean) / self.std)

    def check(self, channels: Sequence[int], unit: Optional[Tuple[int, int]], size: Tuple[int, int]) -> Tuple[int, ...]:
        """DeconvisError (one line) for a channel or unit outside the layer's output at ``size``;
        returns that output's shape without the batch: (C, h, w) or (F,)."""
        with torch.no_grad(), eval_mode(self.model):
            shape = tuple(self.output(torch.full((1, 3, *size), 0.5)).shape[1:])
        if len(shape) not in (1, 3):
            raise DeconvisError(f"layer {self.label!r} outputs shape {list(shape)}; feature visualisation needs "
                                "[N, C, h, w] maps or [N, F] vectors")
        for c in channels:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) < shape[0]:
                raise DeconvisError(f"channel {c!r} is out of range for layer {self.label!r} with {shape[0]} "
                                    f"channels; choose 0..{shape[0] - 1}")
        if unit is not None:
            if len(shape) != 3:
                raise DeconvisError(f"layer {self.label!r} outputs vectors [N, {shape[0]}]; a unit (y, x) needs a "
                                    "map: leave unit unset")
            y, x = unit
            if not (0 <= y < shape[1] and 0 <= x < shape[2]):
                raise DeconvisError(f"unit ({y}, {x}) is outside the {shape[1]}x{shape[2]} map of layer "
                                    f"{self.label!r} at {size[0]}x{size[1]} px; choose y < {shape[1]}, x < {shape[2]}")
        return shape

    def score(self, images: Tensor, channels: Sequence[int], unit: Optional[Tuple[int, int]] = None,
              pre: bool = False) -> Tensor:
        """Objective [N] of image i for channel ``channels[i]``: its map's mean, or the unit at
        ``unit`` (y, x); for a vector layer the feature itself. ``pre``: of the ReLU's input."""
        y = self.output(images, pre)
        idx = torch.arange(y.shape[0], device=y.device)
        ch = torch.as_tensor(list(channels), device=y.device)
        sel = y[idx, ch]
        if sel.dim() == 1:
            return sel
        if unit is not None:
            return sel[:, unit[0], unit[1]]
        return sel.mean(dim=(1, 2))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Inside: ``model`` in eval mode; after: each of its modules back in its own mode."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def visualize_channels(model: nn.Module, layer: str, channels: Optional[Sequence[int]] = None, *,
                       unit: Optional[Tuple[int, int]] = None, steps: int = 256, size: Size = 128,
                       lr: float = 0.05, jitter: int = 8, scale: float = 0.1, rotate: float = 10.0,
                       decorrelate: bool = True, decay_power: float = 1.0, preactivation: bool = True,
                       batch: int = 32, seed: int = 0,
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                       objective: Optional[LayerObjective] = None,
                       progress: Optional[Callable[[int, int], None]] = None) -> FeatVis:
    """Images [C, 3, size, size] in (0, 1) maximising each of ``channels`` of ``layer`` (default:
    all of them) in ``steps`` Adam steps (learning rate ``lr``) on the decorrelated Fourier
    parametrisation, each step under a random shift up to ``jitter`` pixels, zoom
    ``1 +- scale`` and rotation ``+- rotate`` degrees (all 0: no transforms). ``unit``: maximise
    the unit (y, x) of the layer's map instead of the channel mean. ``preactivation``: when the
    layer is a ReLU, ascend its input (so a channel silent on the start image still gets a
    gradient); the reported ``objective`` is always the layer's own output. ``batch``: channels per
    forward. ``mean``/``std``: the input normalisation the weights expect. ``objective``: a
    :class:`LayerObjective` to reuse (its model and layer win). ``progress(done, total)`` is
    called after each chunk of channels.

    Deterministic for a given ``seed``: channel c's image depends on (seed, c), the settings and
    the model only, not on the other channels or ``batch``."""
    hw = _size(size)
    for name, value, low in (("steps", steps, 1), ("batch", batch, 1), ("jitter", jitter, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DeconvisError(f"{name}={value!r} must be an integer >= {low}")
    if not 0 <= scale < 1:
        raise DeconvisError(f"scale={scale} must be in [0, 1) (zoom 1 - scale .. 1 + scale)")
    if not lr > 0:
        raise DeconvisError(f"lr={lr} must be positive")
    obj = objective if objective is not None else LayerObjective(model, layer, mean=mean, std=std)
    if unit is not None:
        unit = (int(unit[0]), int(unit[1]))
    shape = obj.check(list(channels) if channels is not None else [], unit, hw)
    chans = [int(c) for c in channels] if channels is not None else list(range(shape[0]))
    if not chans:
        raise DeconvisError(f"no channels to visualise for layer {obj.label!r}; give at least one")
    param = FourierParam(hw, decay_power=decay_power, decorrelate=decorrelate, dtype=obj.dtype, device=obj.device)
    images, finals, history = [], [], []
    start = time.perf_counter()
    with eval_mode(obj.model), torch.enable_grad():
        for i in range(0, len(chans), batch):
            part = chans[i:i + batch]
            spec = param.random([channel_seed(seed, c) for c in part]).requires_grad_(True)
            opt = torch.optim.Adam([spec], lr=lr)
            gen = torch.Generator().manual_seed(int(seed))  # the same transforms for every chunk
            hist = torch.empty(steps, len(part), dtype=torch.float64)
            for step in range(steps):
                t = robust.draw(gen, jitter, scale, rotate)
                score = obj.score(robust.apply(param.image(spec), t), part, unit, pre=preactivation)
                (grad,) = torch.autograd.grad(-score.sum(), [spec])
                spec.grad = grad
                opt.step()
                hist[step] = score.detach().to("cpu", torch.float64)
            with torch.no_grad():
                img = param.image(spec)
                finals.append(obj.score(img, part, unit).to("cpu", torch.float64))
            images.append(img.detach().to("cpu"))
            history.append(hist)
            if progress is not None:
                progress(min(i + batch, len(chans)), len(chans))
    seconds = time.perf_counter() - start
    settings = dict(steps=steps, size=list(hw), lr=lr, jitter=jitter, scale=scale, rotate=rotate,
                    decorrelate=decorrelate, decay_power=decay_power, preactivation=preactivation, batch=batch, seed=seed,
                    mean=obj.normalization[0], std=obj.normalization[1])
    return FeatVis(layer=obj.layer, label=obj.label, channels=chans, unit=unit, images=torch.cat(images),
                   objective=torch.cat(finals), history=torch.cat(history, dim=1), size=hw, seconds=seconds,
                   settings=settings)
