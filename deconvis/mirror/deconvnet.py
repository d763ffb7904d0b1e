"""The mirrored deconvnet of Zeiler & Fergus (ECCV 2014, Sec. 2.1), on any traced CNN, exact and batched.

``DeconvNet(model)`` wraps a trained CNN without copying or changing it: AlexNet, VGG, ZF-style
chains, and graphs (ResNet, DenseNet, GoogLeNet, MobileNet, EfficientNet, ShuffleNet, SqueezeNet,
ConvNeXt, your own). ``forward`` records one image batch (every node's value, every max-pool's
switches); ``project`` sends chosen activations down the mirror to pixel space:

=================  ==========================================================
forward op         mirror (signal ``g`` at the op's output -> its input)
=================  ==========================================================
max-pool           unpool: ``g`` added at the recorded switch (overlaps sum)
ReLU family        the rule: ``max(g, 0)`` (deconvnet), ``max(g, 0)*[x>0]``
                   (guided), ``g*[x>0]`` (gradient); ReLU6, LeakyReLU, PReLU
                   likewise (:mod:`deconvis.mirror.rules`)
conv (W, b)        transposed filters, no bias (any stride, padding, dilation,
                   groups: depthwise convs included)
eval BatchNorm     ``g * weight / sqrt(running_var + eps)`` (no shift)
LRN, dropout       identity
residual add       ``g`` to both inputs; concat: split by channel
anything else      its exact derivative at the recorded forward (Linear,
                   LayerNorm, GELU, SiLU, Hardswish, gates, pools, reshapes)
=================  ==========================================================

This is reverse-mode differentiation from the seed with the ReLU-family rule replaced;
``tests/test_mirror_graph.py`` checks it against an independent autograd oracle to float64
round-off on the torchvision zoo. Attention layers are refused: they are not convolutional and
neither the mirror's rules nor receptive fields describe them.

Two paths give the same numbers: the full path carries ``[M, C, H, W]`` maps down; the windowed
path (``project_window``) carries each unit's receptive-field cone only
(:mod:`deconvis.mirror.window`), so thousands of single-unit projections cost a fraction of a
full pass each where receptive fields are small.
"""
from __future__ import annotations

from typing import ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from deconvis.errors import DeconvisError
from deconvis.graph.rf import RFTable, table_from_traced
from deconvis.graph.trace import trace_graph
from deconvis.mirror.engine import Mirror
from deconvis.mirror.rules import RULES, Rule  # noqa: F401 - RULES re-exported
from deconvis.mirror.window import WindowPlan, backward_window, paste, plan_window
from deconvis.utils.device import auto_batch_size, batched, model_dtype_device

UnitsLike = Union[Tensor, Sequence[Sequence[int]]]
_ATTENTION = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


#: above this share of the full backward's work (:attr:`WindowPlan.work`) the windowed path
#: costs more than it saves (gathers, masks and pastes), so project_window runs the full path
WINDOW_WORK_LIMIT = 0.6


#: maps of the largest size the full backward is taken to hold at once (memory estimate)
FULL_LIVE_MAPS = 4


def cut_boxes(rec: Tensor, boxes: Tensor) -> Tensor:
    """Full-image reconstructions [M, C, H, W] cut to half-open unclipped boxes [M, 4] of one size
    (y0, y1, x0, x1): [M, C, rh, rw], zero where a box runs past the image."""
    M, C, H, W = rec.shape
    b = boxes.tolist()
    rh, rw = (b[0][1] - b[0][0], b[0][3] - b[0][2]) if b else (0, 0)
    out = rec.new_zeros((M, C, rh, rw))
    for i, (y0, y1, x0, x1) in enumerate(b):
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
        if cy1 > cy0 and cx1 > cx0:
            out[i, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = rec[i, :, cy0:cy1, cx0:cx1]
    return out


def _dense(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``t`` contiguous in ``memory_format``; for ``torch.preserve_format``, ``t`` itself when it is
    contiguous or channels-last contiguous, else a contiguous copy."""
    if memory_format is torch.preserve_format:
        if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
            return t
        return t.contiguous()
    return t.contiguous(memory_format=memory_format)


class DeconvNet:
    """Zeiler-Fergus mirror of a CNN given as any torch.fx-traceable ``nn.Module``.

    The mirror shares the model's parameters (never copies them), so it stays current while the
    model trains, and it never changes the model, its mode, or its outputs. Its forward has eval
    semantics (dropout off, BatchNorm on running statistics). dtype and device follow the
    model's parameters.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise DeconvisError(f"DeconvNet needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.graph = trace_graph(model)
        self._refuse_attention()
        self.mirror = Mirror(self.graph)
        self._rf_cache: Dict[Tuple[int, int], RFTable] = {}
        self._plans: Dict[Tuple[str, Tuple[int, int]], Optional[WindowPlan]] = {}
        self._clear()

    def _refuse_attention(self) -> None:
        nodes = [n for n in self.graph.graph_module.graph.nodes if n in self.graph.signal]
        for i, n in enumerate(nodes):
            m = self.graph.module(n)
            name = getattr(n.target, "__name__", str(n.target))
            if isinstance(m, _ATTENTION) or "scaled_dot_product_attention" in name:
                raise DeconvisError(
                    f"{type(self.model).__name__} has an attention op at node {i} of {len(nodes)} "
                    f"({self.graph.row_names[n]!r}, {self.graph.kind(n)}); the deconvnet mirrors convolutional "
                    "networks only: attention mixes positions by data-dependent weights, which neither the "
                    "mirror's rules nor receptive fields describe")

    # ------------------------------------------------------------------ names
    @property
    def layer_names(self) -> List[str]:
        """Row names (module names from ``named_modules()``, fx names for functions) in execution order."""
        return self.graph.layer_names

    @property
    def aliases(self) -> Dict[str, str]:
        """Conventional names (``conv5``, ``conv5_3``, ``pool2``, ``fc6``) -> row names (chains only)."""
        return dict(self.graph.aliases)

    def resolve(self, name: str) -> str:
        """Alias, container (``layer3``) or row name -> row name."""
        return self.graph.resolve(name)

    def display_name(self, layer: str) -> str:
        """The name to show for a layer (see :meth:`TracedGraph.label`)."""
        return self.graph.label(layer)

    def conv_layers(self) -> List[str]:
        """ZF's layers 1..5 for AlexNet (the rectified conv maps of a chain); for graphs, the
        output of every top-level stage that holds a conv (ResNet: stem, ``layer1``..``layer4``)."""
        return self.graph.conv_layers()

    def receptive_fields(self, input_size: Union[int, Sequence[int]]) -> RFTable:
        """The receptive-field table (:class:`deconvis.graph.rf.RFTable`) of the wrapped model for
        images of ``input_size`` (int or (h, w) pixels), from the same trace; cached per size."""
        key = tuple(int(v) for v in input_size) if isinstance(input_size, (tuple, list)) else (int(input_size),) * 2
        if key not in self._rf_cache:
            in_ch = self._in_channels() or 3
            self._rf_cache[key] = table_from_traced(self.graph, key, in_ch)
        return self._rf_cache[key]

    # ----------------------------------------------------------------- forward
    def release(self) -> None:
        """Drop everything the last ``forward`` recorded (activations, switches) and the windowed
        backward's scratch buffers, so no memory is held between uses; ``project`` then needs a
        new ``forward``."""
        self._clear()
        self.mirror.release_scratch()

    def fixed_weights(self) -> ContextManager[None]:
        """A block in which the model does not change (the projection phase of a run): the
        transposed convs' filters (dtype, BatchNorm scale, memory layout) are computed once and
        kept, instead of per call (:meth:`deconvis.mirror.engine.Mirror.fixed_weights`)."""
        return self.mirror.fixed_weights()

    def _clear(self) -> None:
        self._env: Dict = {}
        self._switches: Dict = {}
        self._acts: Dict[str, Tensor] = {}
        self._image_shape: Optional[torch.Size] = None

    def _in_channels(self) -> Optional[int]:
        for m in self.model.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
        return None

    def prepare_images(self, images: Tensor) -> Tensor:
        """``images`` [N, C, H, W] checked (one-line DeconvisError naming the fix) and moved to the
        model's device and dtype."""
        if not isinstance(images, Tensor):
            raise DeconvisError(f"images must be a torch.Tensor [N, C, H, W], got {type(images).__name__}")
        if images.dim() == 3:
            raise DeconvisError(f"images have shape {list(images.shape)}: a batch needs 4 dims [N, C, H, W]; "
                                "use images.unsqueeze(0) for one image")
        if images.dim() != 4:
            raise DeconvisError(f"images have shape {list(images.shape)}; expected [N, C, H, W]")
        in_ch = self._in_channels()
        if in_ch is not None and images.shape[1] != in_ch:
            first = next(n for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d))
            raise DeconvisError(f"images have {images.shape[1]} channels but the first conv {first!r} expects {in_ch}")
        dtype, device = model_dtype_device(self.model)
        return images.to(device=device, dtype=dtype)

    def _names(self, layers: Optional[Iterable[str]]) -> Optional[List[str]]:
        if layers is None:
            return None
        if isinstance(layers, str):
            layers = [layers]
        return [self.resolve(l) for l in layers]

    def _deepest(self, names: List[str]):
        pos = self.mirror.position
        return max((self.graph.node(n) for n in names), key=lambda n: pos[n])

    @torch.no_grad()
    def forward(self, images: Tensor, layers: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        """Run ``images`` [N, C, H, W] through the model, recording every value and switch.

        Returns ``{row name: activation}`` for every layer (or for ``layers`` only; the run then
        stops at the deepest of them). Later ``project`` calls refer to this batch."""
        names = self._names(layers)
        stop = self._deepest(names) if names else None
        x = self.prepare_images(images)
        self._clear()
        env, switches = self.mirror.run(x, stop, record=True)
        self._env, self._switches = env, switches
        self._acts = {self.graph.row_names[n]: v for n, v in env.items()
                      if n in self.graph.signal and n.op != "placeholder" and isinstance(v, Tensor)}
        self._image_shape = x.shape
        return {n: self._acts[n] for n in names} if names is not None else dict(self._acts)

    __call__ = forward

    @torch.inference_mode()
    def activations(self, images: Tensor, layers: Iterable[str]) -> Dict[str, Tensor]:
        """Activations of ``layers`` only ({row name: tensor}), fast: nothing recorded, values
        freed after their last use, the run stops at the deepest requested layer. Does not touch
        the state ``forward`` recorded."""
        names = self._names(layers)
        if not names:
            return {}
        nodes = [self.graph.node(n) for n in names]
        env, _ = self.mirror.run(self.prepare_images(images), self._deepest(names), record=False, keep=nodes)
        return {n: env[node] for n, node in zip(names, nodes)}

    # --------------------------------------------------------------- helpers
    def _need_forward(self, layer: str) -> str:
        if not self._acts:
            raise DeconvisError("project() needs a batch: call forward(images) first")
        name = self.resolve(layer)
        if name not in self._acts:
            raise DeconvisError(f"layer {layer!r} was not computed by the last forward(); "
                                "call forward(images) without layers= or include it")
        return name

    def _check_units(self, name: str, units: UnitsLike) -> Tensor:
        act = self._acts[name]
        if not isinstance(units, Tensor):
            units = torch.as_tensor(units)
        if units.dim() == 1 and units.numel() == 4:
            units = units[None]
        if units.dim() != 2 or units.shape[1] != 4:
            raise DeconvisError(f"units must have shape [M, 4] = (image, channel, y, x), got {list(units.shape)}")
        if units.is_floating_point() or units.dtype == torch.bool:
            raise DeconvisError("units must be an integer tensor (LongTensor [M, 4])")
        units = units.long()
        spatial = list(act.shape[2:]) if act.dim() == 4 else [1, 1]
        limits = torch.tensor([act.shape[0], act.shape[1]] + spatial, device=units.device)
        bad = (units < 0) | (units >= limits)  # one check (one host sync at most) for all columns
        if bool(bad.any()):
            row, col = (int(v) for v in bad.nonzero()[0])
            what = ("image", "channel", "y", "x")[col]
            raise DeconvisError(f"unit {units[row].tolist()} is out of range for {name!r}: {what} must be in "
                                f"[0, {int(limits[col])}) (activation shape {list(act.shape)})")
        return units.to(act.device, non_blocking=True)  # checked on the host when given there: no sync

    def _seed(self, name: str, chunk: Tensor) -> Tensor:
        act = self._acts[name]
        m = chunk.shape[0]
        seed = act.new_zeros((m,) + tuple(act.shape[1:]))
        ar = torch.arange(m, device=act.device)
        if act.dim() == 4:
            seed[ar, chunk[:, 1], chunk[:, 2], chunk[:, 3]] = act[chunk[:, 0], chunk[:, 1], chunk[:, 2], chunk[:, 3]]
        else:
            seed[ar, chunk[:, 1]] = act[chunk[:, 0], chunk[:, 1]]
        return seed

    def _bytes_per_unit(self, name: str, plan: Optional[WindowPlan]) -> int:
        """Rough working memory of one unit's projection (signal, temporaries, indices). The full
        backward frees each node's signal once its inputs have theirs, so it holds a few maps at a
        time (a residual block's skip signal waits beside the branch's): its peak is taken as
        :data:`FULL_LIVE_MAPS` of the largest map; the windowed one is summed over the path."""
        node = self.graph.node(name)
        elem = self._acts[name].element_size()
        total = peak = 0
        for n in self.mirror.ancestors(node):
            v = self._env.get(n)
            if not isinstance(v, Tensor):
                continue
            if plan is not None:
                h, w = plan.axes[n][0].size, plan.axes[n][1].size
                total += v.shape[1] * h * w * (elem * 3 + 8)
            else:
                peak = max(peak, int(v[0].numel()) * (elem * 3 + 8))
        return max(total if plan is not None else FULL_LIVE_MAPS * peak, 1)

    # -------------------------------------------------------------- projection
    @torch.no_grad()
    def project(self, layer: str, units: UnitsLike, rule: Union[str, Rule] = "deconvnet",
                batch_size: Optional[int] = None) -> Tensor:
        """Reconstructions [M, C_in, H, W] of ``units`` [M, 4] = (image, channel, y, x) of ``layer``
        in the last forward batch; each seeded with its own activation, all else zero.
        ``batch_size`` units go down together (default: sized by free memory; halved on OOM)."""
        name = self._need_forward(layer)
        rule = Rule.parse(rule)
        units = self._check_units(name, units)
        node = self.graph.node(name)
        if batch_size is None:
            batch_size = auto_batch_size(self._bytes_per_unit(name, None), self._acts[name].device)

        def run(chunk: Tensor) -> Tensor:
            return self.mirror.backward(self._env, self._switches, node, self._seed(name, chunk), chunk[:, 0], rule)

        parts = batched(run, units, batch_size, "projection batch")
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def project_map(self, layer: str, image_index: int, channels: Iterable[int],
                    rule: Union[str, Rule] = "deconvnet") -> Tensor:
        """Whole-feature-map mode: for each channel, all its activations in image
        ``image_index`` seeded at once (ZF's strongest feature map). -> [len(channels), C_in, H, W]."""
        name = self._need_forward(layer)
        rule = Rule.parse(rule)
        act = self._acts[name]
        chans = torch.as_tensor(list(channels), dtype=torch.long, device=act.device)
        units = torch.stack([torch.full_like(chans, int(image_index)), chans,
                             torch.zeros_like(chans), torch.zeros_like(chans)], 1)
        self._check_units(name, units)
        seed = act.new_zeros((len(chans),) + tuple(act.shape[1:]))
        seed[torch.arange(len(chans), device=act.device), chans] = act[int(image_index)][chans]
        return self.mirror.backward(self._env, self._switches, self.graph.node(name), seed, units[:, 0], rule)

    def window_plan(self, layer: str) -> Optional[WindowPlan]:
        """The windowed path's plan for ``layer`` at the recorded input size, or None when the
        layer's projection needs the full path (a gate or global op sees the whole image)."""
        name = self._need_forward(layer)
        hw = tuple(int(v) for v in self._image_shape[-2:])
        key = (name, hw)
        if key not in self._plans:
            try:
                table = self.receptive_fields(hw)
            except DeconvisError:  # no RF table for this graph: every layer takes the full path
                table = None
            self._plans[key] = None if table is None else plan_window(self.mirror, table, self.graph.node(name),
                                                                      self._env)
        return self._plans[key]

    @torch.no_grad()
    def project_window(self, layer: str, units: UnitsLike, rule: Union[str, Rule] = "deconvnet",
                       batch_size: Optional[int] = None, *,
                       memory_format: torch.memory_format = torch.contiguous_format) -> Tuple[Tensor, Tensor]:
        """Fast path: each unit's reconstruction on its receptive-field box only.

        Returns (rec [M, C_in, rh, rw], boxes LongTensor [M, 4] = (y0, y1, x0, x1), half-open,
        unclipped, input pixels: the box of :meth:`RFTable.box`). ``rec`` is zero where the box
        runs past the image; pasted onto a zero image it equals :meth:`project` to round-off.
        Layers that see the whole image (through Linear, global pooling or a squeeze-excitation
        gate) take the full path: their box is the image. ``rec`` is contiguous in
        ``memory_format``; ``torch.preserve_format`` keeps the layout the mirror produced (float32
        on the CPU: often channels-last), dense either way, and saves a copy.
        """
        name = self._need_forward(layer)
        rule = Rule.parse(rule)
        units = self._check_units(name, units)
        plan = self.window_plan(name) if self._acts[name].dim() == 4 else None
        if plan is None:
            rec = self.project(name, units, rule, batch_size)
            H, W = rec.shape[-2:]
            boxes = torch.tensor([0, H, 0, W], device=rec.device).repeat(len(units), 1)
            return rec, boxes
        if plan.work > WINDOW_WORK_LIMIT:  # the cones cover (nearly) whole maps: full path, cut to the box
            rec = self.project(name, units, rule, batch_size)
            boxes = plan.box(units[:, 2:4])
            return cut_boxes(rec, boxes), boxes
        act = self._acts[name]
        if batch_size is None:
            batch_size = auto_batch_size(self._bytes_per_unit(name, plan), act.device)
        ay, ax = plan.axes[plan.nodes[0]]

        def run(chunk: Tensor) -> Tuple[Tensor, Tensor]:
            m = chunk.shape[0]
            seed = act.new_zeros((m, act.shape[1], 1, 1))
            seed[torch.arange(m, device=act.device), chunk[:, 1], 0, 0] = \
                act[chunk[:, 0], chunk[:, 1], chunk[:, 2], chunk[:, 3]]
            u = chunk[:, 2:4]
            rec = backward_window(self.mirror, plan, self._env, self._switches, seed, chunk[:, 0], u, rule)
            if ay.full or ax.full:  # the window is the whole image along an axis: lay it on the RF box
                box_rec = rec.new_zeros(rec.shape[:2] + (ay.R, ax.R))
                paste(box_rec, ((ay.J, -ay.P), (ax.J, -ax.P)), rec, ((ay.a, ay.b), (ax.a, ax.b)), u)
                rec = box_rec
            return rec, plan.box(u)

        parts = batched(run, units, batch_size, "projection batch")
        if len(parts) == 1:  # one chunk: no concatenation (a cropped view is made dense)
            return _dense(parts[0][0], memory_format), parts[0][1]
        # (float32 windows travel channels-last on the CPU, and cat keeps their layout)
        return _dense(torch.cat([p[0] for p in parts]), memory_format), torch.cat([p[1] for p in parts])

    def strongest(self, layer: str, k: int = 1) -> Tensor:
        """The ``k`` strongest units per channel of ``layer`` over the last forward batch (all images
        and positions), as units [C*k, 4] ordered by channel then rank. Ties go to the smaller
        image index, then the first position in row-major order."""
        name = self._need_forward(layer)
        act = self._acts[name]
        if act.dim() == 2:
            act = act[:, :, None, None]
        N, C, h, w = act.shape
        if not 1 <= k <= N * h * w:
            raise DeconvisError(f"k={k} must be in [1, {N * h * w}] for {name!r}")
        flat = act.permute(1, 0, 2, 3).reshape(C, -1)
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
        n, rem = order // (h * w), order % (h * w)
        chans = torch.arange(C, device=act.device)[:, None].expand(C, k)
        return torch.stack([n, chans, rem // w, rem % w], -1).reshape(C * k, 4)

