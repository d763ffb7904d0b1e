"""The mirrored deconvnet of Zeiler & Fergus (ECCV 2014, Sec. 2.1), exact and batched.

``DeconvNet(model)`` wraps a trained chain CNN without copying or changing it. ``forward``
records, for one image batch, every max-pool's switches and every ReLU's forward sign;
``project`` sends chosen activations down the mirror to pixel space:

=================  ==========================================================
forward layer      mirror (signal ``g`` at the layer's output -> its input)
=================  ==========================================================
max-pool           unpool: ``g`` added at the recorded switch (overlaps sum)
ReLU               ``max(g, 0)`` (deconvnet), ``max(g, 0)*[x>0]`` (guided),
                   ``g*[x>0]`` (gradient)
conv (W, b)        ``conv_transpose2d(g, W)``, no bias
eval BatchNorm     ``g * weight / sqrt(running_var + eps)`` (no shift)
LRN, dropout       identity
avg-pool, linear,  their adjoints (transposes)
flatten, adaptive
=================  ==========================================================

This equals reverse-mode autodiff from the seed with the ReLU rule replaced (METHOD.md §1);
``tests/test_deconvnet_oracle.py`` checks it against autograd to float64 round-off.

Two paths give the same numbers: the full-image path carries ``[M, C, H, W]`` maps down; the
windowed path (``project_window``) carries each unit's receptive-field cone only, a window per
layer whose origin moves with the unit, so thousands of single-unit projections cost a fraction
of a full pass each. Windows follow ``origin_in = origin_out * stride - padding`` and
``size_in = (size_out - 1) * stride + (kernel - 1) * dilation + 1`` per axis; positions outside the
real map (padding) are zeroed at every layer.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deconvis.mirror.chain import (ADAPTIVE_AVG, AVGPOOL, BN, CONV, LINEAR, MAXPOOL, OTHER, RELU, RESHAPE, SKIP,
                            Step, layer_aliases, preferred_alias, trace_chain)
from deconvis.utils.device import auto_batch_size, batched
from deconvis.errors import DeconvisError, close_matches

RULES = ("deconvnet", "guided", "gradient")
_WINDOW_KINDS = {CONV, RELU, MAXPOOL, AVGPOOL, BN, SKIP}
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
UnitsLike = Union[Tensor, Sequence[Sequence[int]]]


def _model_dtype_device(model: nn.Module) -> Tuple[torch.dtype, torch.device]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _valid(origin: Tensor, size: Tuple[int, int], hw: Tuple[int, int]) -> Tensor:
    """[M, 1, h, w] bool: which positions of each unit's window (top-left ``origin`` [M, 2],
    ``size`` (h, w)) lie inside a map of size ``hw``."""
    dev = origin.device
    rows = origin[:, 0, None] + torch.arange(size[0], device=dev)
    cols = origin[:, 1, None] + torch.arange(size[1], device=dev)
    ok = ((rows >= 0) & (rows < hw[0]))[:, :, None] & ((cols >= 0) & (cols < hw[1]))[:, None, :]
    return ok[:, None]


def _gather_window(full: Tensor, n_idx: Tensor, origin: Tensor, size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """Windows of ``full`` [N, C, H, W] for M units.

    ``n_idx`` [M] image index, ``origin`` [M, 2] top-left (y, x) in map pixels (may be negative),
    ``size`` (h, w). Returns (windows [M, C, h, w] with out-of-map positions clamped to the edge,
    valid [M, 1, h, w] bool: position lies inside the map).
    """
    H, W = full.shape[-2:]
    dev = full.device
    rows = (origin[:, 0, None] + torch.arange(size[0], device=dev)).clamp(0, H - 1)  # [M, h]
    cols = (origin[:, 1, None] + torch.arange(size[1], device=dev)).clamp(0, W - 1)  # [M, w]
    win = full[n_idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return win.permute(0, 3, 1, 2), _valid(origin, size, (H, W))


def _crop_or_pad(raw: Tensor, raw_origin: Tuple[int, int], size: Tuple[int, int]) -> Tensor:
    """Place ``raw`` [M, C, h, w] (whose [0, 0] sits at map pixel ``raw_origin``) on the map
    window [0, size): crop what lies outside, zero-fill what ``raw`` does not reach."""
    top, left = raw_origin
    bottom = size[0] - (top + raw.shape[-2])
    right = size[1] - (left + raw.shape[-1])
    return F.pad(raw, (left, right, top, bottom))


class DeconvNet:
    """Zeiler-Fergus mirror of a chain CNN (AlexNet, VGG11-19 with/without BN, nested Sequential).

    The mirror shares the model's parameters (never copies them), so it stays current while the
    model trains, and it never changes the model, its mode, or its outputs. dtype and device
    follow the model's parameters.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise DeconvisError(f"DeconvNet needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._chain = trace_chain(model)
        self.steps: List[Step] = self._chain.steps
        self._index = self._chain.index
        self.aliases: Dict[str, str] = layer_aliases(self.steps)
        self._display = preferred_alias(self.steps, self.aliases)
        self._clear()

    # ------------------------------------------------------------------ names
    @property
    def layer_names(self) -> List[str]:
        """Step names (module names from ``named_modules()``) in execution order."""
        return [s.name for s in self.steps]

    def resolve(self, name: str) -> str:
        """Alias (``conv5``, ``conv5_3``, ``pool1``, ``fc6``) or step name -> step name."""
        if name in self._index:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise DeconvisError(f"unknown layer {name!r} in {type(self.model).__name__}"
                            + close_matches(name, list(self.aliases) + self.layer_names))

    def display_name(self, layer: str) -> str:
        """The conventional name to show for a step (its alias, else the step name)."""
        name = self.resolve(layer)
        return self._display.get(name, name)

    def conv_layers(self) -> List[str]:
        """The rectified output of every conv layer, in order: ZF's layers 1..5 for AlexNet."""
        convs = [k for k in self.aliases if k.startswith("conv") and "_" not in k]
        return [self.aliases[k] for k in sorted(convs, key=lambda a: int(a[4:]))]

    def step(self, layer: str) -> Step:
        return self.steps[self._index[self.resolve(layer)]]

    def receptive_fields(self, input_size):
        """The receptive-field table (:class:`deconvis.graph.rf.RFTable`) of the wrapped model for
        images of ``input_size`` (int or (h, w) pixels); computed once per size and cached."""
        from deconvis.graph.rf import table_from_traced, trace_graph

        key = tuple(input_size) if isinstance(input_size, (tuple, list)) else (int(input_size),) * 2
        cache = self.__dict__.setdefault("_rf_cache", {})
        if key not in cache:
            cache[key] = table_from_traced(trace_graph(self.model), key)
        return cache[key]

    # ----------------------------------------------------------------- forward
    def release(self) -> None:
        """Drop everything the last ``forward`` recorded (activations, switches, ReLU signs), so
        no memory is held between uses; ``project`` then needs a new ``forward``."""
        self._clear()

    def _clear(self) -> None:
        self._acts: Dict[str, Tensor] = {}
        self._in_shape: Dict[str, torch.Size] = {}
        self._relu_mask: Dict[str, Tensor] = {}
        self._switch: Dict[str, Tensor] = {}
        self._image_shape: Optional[torch.Size] = None

    def _prepare_images(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor):
            raise DeconvisError(f"images must be a torch.Tensor [N, C, H, W], got {type(images).__name__}")
        if images.dim() == 3:
            raise DeconvisError(f"images have shape {list(images.shape)}: a batch needs 4 dims [N, C, H, W]; "
                                "use images.unsqueeze(0) for one image")
        if images.dim() != 4:
            raise DeconvisError(f"images have shape {list(images.shape)}; expected [N, C, H, W]")
        first = next((s for s in self.steps if s.kind == CONV), None)
        if first is not None and images.shape[1] != first.module.in_channels:
            raise DeconvisError(f"images have {images.shape[1]} channels but the first conv "
                                f"{first.name!r} expects {first.module.in_channels}")
        dtype, device = _model_dtype_device(self.model)
        return images.to(device=device, dtype=dtype)

    def _run(self, images: Tensor, upto: int, record: bool) -> Dict[str, Tensor]:
        """Interpret the traced graph on ``images`` up to step index ``upto`` (inclusive)."""
        x = self._prepare_images(images)
        env: Dict[torch.fx.Node, object] = {}
        step_of = {s.node: s for s in self.steps}
        acts: Dict[str, Tensor] = {}
        last = self.steps[upto].node if self.steps else None
        model = self.model
        for node in self._chain.graph_module.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
                continue
            if node.op == "output":
                break
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            s = step_of.get(node)
            try:
                if s is None:  # shape query, constant
                    if node.op == "get_attr":
                        out = getattr(self._chain.graph_module, node.target)
                    elif node.op == "call_method":
                        out = getattr(args[0], node.target)(*args[1:], **kwargs)
                    else:
                        out = node.target(*args, **kwargs)
                else:
                    out = self._forward_step(s, model, node, args, kwargs, record)
            except DeconvisError:
                raise
            except RuntimeError as exc:
                msg = str(exc).splitlines()[0]
                raise DeconvisError(f"forward failed at {s.name if s else node.name!r} for images of shape "
                                    f"{list(x.shape)} ({msg}); are the images too small or of the wrong size "
                                    "for this network?") from exc
            env[node] = out
            if s is not None:
                acts[s.name] = out
            if node is last:
                break
        return acts

    def _forward_step(self, s: Step, model: nn.Module, node, args, kwargs, record: bool) -> Tensor:
        x = args[0]
        if record and isinstance(x, Tensor):
            self._in_shape[s.name] = x.shape
        if s.kind == RELU:
            y = F.relu(x)
            if record:
                self._relu_mask[s.name] = y > 0
            return y
        if s.kind == MAXPOOL and s.module is not None:
            y, idx = F.max_pool2d(x, s.kernel, s.stride, s.padding, s.dilation,
                                  ceil_mode=s.extra["ceil_mode"], return_indices=True)
            if record:
                self._switch[s.name] = idx
            return y
        if s.kind == BN and s.module is not None and not s.why_unsupported:
            m = s.module
            return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        if s.kind == SKIP and (isinstance(s.module, _DROPOUT_TYPES) or s.module is None):
            return x  # dropout: eval semantics, never random
        if node.op == "call_module":
            return model.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    @torch.no_grad()
    def forward(self, images: Tensor, layers: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        """Run ``images`` [N, C, H, W] through the model, recording switches and ReLU signs.

        Returns ``{step name: activation}`` for every step (or for ``layers`` only; the run then
        stops at the deepest of them). Later ``project`` calls refer to this batch.
        """
        names = [self.resolve(l) for l in layers] if layers is not None else None
        upto = max(self._index[n] for n in names) if names else len(self.steps) - 1
        self._clear()
        acts = self._run(images, upto, record=True)
        self._acts = acts
        self._image_shape = images.shape
        return {n: acts[n] for n in names} if names is not None else dict(acts)

    __call__ = forward

    @torch.inference_mode()
    def activations(self, images: Tensor, layers: Iterable[str]) -> Dict[str, Tensor]:
        """Activations of ``layers`` only ({step name: tensor}), fast: no switches recorded, and the
        run stops at the deepest requested layer. Does not touch the state ``forward`` recorded."""
        names = [self.resolve(l) for l in layers]
        if not names:
            return {}
        acts = self._run(images, max(self._index[n] for n in names), record=False)
        return {n: acts[n] for n in names}

    # --------------------------------------------------------------- helpers
    def _need_forward(self, layer: str) -> str:
        if not self._acts:
            raise DeconvisError("project() needs a batch: call forward(images) first")
        name = self.resolve(layer)
        if name not in self._acts:
            raise DeconvisError(f"layer {layer!r} was not computed by the last forward(); "
                                "call forward(images) without layers= or include it")
        return name

    def _check_path(self, name: str) -> None:
        for i in range(self._index[name], -1, -1):
            s = self.steps[i]
            if s.kind == OTHER or s.why_unsupported:
                raise DeconvisError(
                    f"cannot project {name!r}: step {i} {s.name!r} ({s.type_name}) lies on the path to the input "
                    f"and {s.why_unsupported or 'has no deconvnet mirror'}; project a layer below it")
            if s.kind == AVGPOOL:
                ex = s.extra
                if (not ex["count_include_pad"] and s.padding != (0, 0)) or (
                        ex["ceil_mode"] and self._avg_partial(s)):
                    raise DeconvisError(f"cannot project through {s.name!r}: AvgPool2d with border windows of "
                                        "varying size (count_include_pad=False with padding, or ceil_mode "
                                        "partial windows) is not supported")

    def _avg_partial(self, s: Step) -> bool:
        shape = self._in_shape.get(s.name)
        out = self._acts.get(s.name)
        if shape is None or out is None:
            return False
        for ax in (0, 1):
            n_floor = (shape[-2 + ax] + 2 * s.padding[ax] - s.kernel[ax]) // s.stride[ax] + 1
            if out.shape[-2 + ax] != n_floor:
                return True
        return False

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
        units = units.long().to(act.device)
        spatial = list(act.shape[2:]) if act.dim() == 4 else [1, 1]
        limits = [act.shape[0], act.shape[1]] + spatial
        for col, what in enumerate(("image", "channel", "y", "x")):
            bad = (units[:, col] < 0) | (units[:, col] >= limits[col])
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise DeconvisError(f"unit {units[row].tolist()} is out of range for {name!r}: {what} must be in "
                                    f"[0, {limits[col]}) (activation shape {list(act.shape)})")
        return units

    @staticmethod
    def _check_rule(rule: str) -> None:
        if rule not in RULES:
            raise DeconvisError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")

    # -------------------------------------------------------------- projection
    @torch.no_grad()
    def project(self, layer: str, units: UnitsLike, rule: str = "deconvnet",
                batch_size: Optional[int] = None) -> Tensor:
        """Reconstructions [M, C_in, H, W] of ``units`` [M, 4] = (image, channel, y, x) of ``layer``
        in the last forward batch; each seeded with its own activation, all else zero.
        ``batch_size`` units go down together (default: sized by free memory; halved on OOM)."""
        name = self._need_forward(layer)
        self._check_rule(rule)
        self._check_path(name)
        units = self._check_units(name, units)
        act = self._acts[name]
        if batch_size is None:
            batch_size = auto_batch_size(self._bytes_per_unit(name, windowed=False), act.device)

        def run(chunk: Tensor) -> Tensor:
            m = chunk.shape[0]
            seed = act.new_zeros((m,) + tuple(act.shape[1:]))
            if act.dim() == 4:
                vals = act[chunk[:, 0], chunk[:, 1], chunk[:, 2], chunk[:, 3]]
                seed[torch.arange(m, device=act.device), chunk[:, 1], chunk[:, 2], chunk[:, 3]] = vals
            else:
                vals = act[chunk[:, 0], chunk[:, 1]]
                seed[torch.arange(m, device=act.device), chunk[:, 1]] = vals
            return self._mirror(name, seed, chunk[:, 0], None, rule)

        return torch.cat(batched(run, units, batch_size, "projection batch"))

    @torch.no_grad()
    def project_map(self, layer: str, image_index: int, channels: Iterable[int],
                    rule: str = "deconvnet") -> Tensor:
        """Whole-feature-map mode: for each channel, all its activations in image
        ``image_index`` seeded at once (ZF's strongest feature map). -> [len(channels), C_in, H, W]."""
        name = self._need_forward(layer)
        self._check_rule(rule)
        self._check_path(name)
        act = self._acts[name]
        chans = torch.as_tensor(list(channels), dtype=torch.long, device=act.device)
        units = torch.stack([torch.full_like(chans, int(image_index)), chans,
                             torch.zeros_like(chans), torch.zeros_like(chans)], 1)
        self._check_units(name, units)
        seed = act.new_zeros((len(chans),) + tuple(act.shape[1:]))
        seed[torch.arange(len(chans), device=act.device), chans] = act[int(image_index)][chans]
        return self._mirror(name, seed, units[:, 0], None, rule)

    @torch.no_grad()
    def project_window(self, layer: str, units: UnitsLike, rule: str = "deconvnet",
                       batch_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Fast path: each unit's reconstruction on its receptive-field box only.

        Returns (rec [M, C_in, rh, rw], boxes LongTensor [M, 4] = (y0, y1, x0, x1), half-open,
        unclipped, input pixels). ``rec`` is zero where the box runs past the image; pasted onto a
        zero image it equals :meth:`project` to round-off. Layers whose path to the input holds a
        Linear/Flatten/adaptive pool see the whole image: their box is the image.
        """
        name = self._need_forward(layer)
        self._check_rule(rule)
        self._check_path(name)
        units = self._check_units(name, units)
        path = self.steps[: self._index[name] + 1]
        if any(s.kind not in _WINDOW_KINDS for s in path) or self._acts[name].dim() != 4:
            rec = self.project(name, units, rule)
            H, W = rec.shape[-2:]
            boxes = torch.tensor([0, H, 0, W], device=rec.device).repeat(len(units), 1)
            return rec, boxes
        act = self._acts[name]
        if batch_size is None:
            batch_size = auto_batch_size(self._bytes_per_unit(name, windowed=True), act.device)

        def run(chunk: Tensor) -> Tuple[Tensor, Tensor]:
            m = chunk.shape[0]
            seed = act.new_zeros((m, act.shape[1], 1, 1))
            seed[torch.arange(m, device=act.device), chunk[:, 1], 0, 0] = \
                act[chunk[:, 0], chunk[:, 1], chunk[:, 2], chunk[:, 3]]
            rec, origin = self._mirror(name, seed, chunk[:, 0], chunk[:, 2:4].clone(), rule)
            box = torch.stack([origin[:, 0], origin[:, 0] + rec.shape[-2],
                               origin[:, 1], origin[:, 1] + rec.shape[-1]], 1)
            return rec, box

        parts = batched(run, units, batch_size, "projection batch")
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def window_sizes(self, layer: str) -> Dict[str, Tuple[int, int]]:
        """Per step on the path of ``layer`` down to the input: the (h, w) of one unit's window at
        that step's *input* (the receptive-field cone); the input's entry is the RF size."""
        name = self.resolve(layer)
        h, w = 1, 1
        sizes: Dict[str, Tuple[int, int]] = {}
        for i in range(self._index[name], -1, -1):
            s = self.steps[i]
            if s.kind in (CONV, AVGPOOL, MAXPOOL):
                h = (h - 1) * s.stride[0] + (s.kernel[0] - 1) * s.dilation[0] + 1
                w = (w - 1) * s.stride[1] + (s.kernel[1] - 1) * s.dilation[1] + 1
            sizes[s.name] = (h, w)
        return sizes

    def _bytes_per_unit(self, name: str, windowed: bool) -> int:
        """Rough working memory of one unit's projection (signal, masks, indices, temporaries)."""
        elem = self._acts[name].element_size()
        sizes = self.window_sizes(name) if windowed else None
        total = 0
        for i in range(self._index[name], -1, -1):
            s = self.steps[i]
            shape = self._in_shape[s.name]
            chans = shape[1] if len(shape) > 1 else 1
            if windowed:
                h, w = sizes[s.name]
                total += chans * h * w * (elem * 3 + 8)
            else:
                total += int(torch.Size(shape[1:]).numel()) * (elem * 3 + 8)
        return total

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

    # ------------------------------------------------------------------ mirror
    def _mirror(self, name: str, g: Tensor, n_idx: Tensor, origin: Optional[Tensor], rule: str):
        """Carry signal ``g`` (at the output of step ``name``) down to the input.

        Full path when ``origin`` is None (g covers whole maps); windowed path otherwise (g is a
        window per unit with top-left ``origin`` [M, 2]). Returns the input-space signal, plus the
        final origins on the windowed path.
        """
        windowed = origin is not None
        for i in range(self._index[name], -1, -1):
            s = self.steps[i]
            in_shape = self._in_shape[s.name]
            in_hw = tuple(in_shape[-2:]) if len(in_shape) == 4 else None
            if s.kind == RELU:
                if rule != "gradient":
                    g = g.clamp(min=0)
                if rule != "deconvnet":
                    mask = self._relu_mask[s.name]
                    if windowed:
                        mask = _gather_window(mask, n_idx, origin, tuple(g.shape[-2:]))[0]
                    else:
                        mask = mask[n_idx]
                    g = g * mask
            elif s.kind == BN:
                m = s.module
                scale = torch.rsqrt(m.running_var + m.eps)
                if m.weight is not None:
                    scale = scale * m.weight
                g = g * scale.to(g.dtype).view(1, -1, 1, 1)
            elif s.kind == SKIP:
                pass
            elif s.kind in (CONV, AVGPOOL, MAXPOOL):
                raw_origin = (origin * torch.tensor(s.stride, device=g.device)
                              - torch.tensor(s.padding, device=g.device)) if windowed else None
                if s.kind == MAXPOOL:
                    raw_size = tuple((g.shape[-2 + a] - 1) * s.stride[a] + (s.kernel[a] - 1) * s.dilation[a] + 1
                                     for a in (0, 1))
                    g = self._unpool(s, g, n_idx, origin, raw_origin, raw_size, in_hw)
                else:
                    if s.kind == CONV:
                        w, groups = s.module.weight, s.module.groups
                    else:
                        c = g.shape[1]
                        div = s.extra["divisor_override"] or s.kernel[0] * s.kernel[1]
                        w = g.new_full((c, 1) + s.kernel, 1.0 / div)
                        groups = c
                    g = F.conv_transpose2d(g, w.to(g.dtype), stride=s.stride, dilation=s.dilation, groups=groups)
                    if not windowed:
                        g = _crop_or_pad(g, (-s.padding[0], -s.padding[1]), in_hw)
                if windowed:
                    origin = raw_origin
                    g = g * _valid(origin, tuple(g.shape[-2:]), in_hw)
            elif s.kind == LINEAR:
                g = g @ s.module.weight.to(g.dtype)
            elif s.kind == RESHAPE:
                g = g.reshape((g.shape[0],) + tuple(in_shape[1:]))
            elif s.kind == ADAPTIVE_AVG:
                g = self._adaptive_adjoint(s, g, in_shape)
            else:  # pragma: no cover - _check_path rejects these first
                raise DeconvisError(f"{s.name!r} ({s.type_name}) has no deconvnet mirror")
        return (g, origin) if windowed else g

    def _unpool(self, s: Step, g: Tensor, n_idx: Tensor, origin: Optional[Tensor], raw_origin: Optional[Tensor],
                raw_size: Tuple[int, int], in_hw: Tuple[int, int]) -> Tensor:
        """Max-unpool: add each value of ``g`` at its switch (summing where windows overlap)."""
        switch = self._switch[s.name]
        M, C = g.shape[:2]
        W_in = in_hw[1]
        if origin is None:
            idx = switch[n_idx].reshape(M, C, -1)
            out = g.new_zeros((M, C, in_hw[0] * in_hw[1]))
            return out.scatter_add_(2, idx, g.reshape(M, C, -1)).view(M, C, *in_hw)
        idx = _gather_window(switch, n_idx, origin, tuple(g.shape[-2:]))[0]
        ry = (idx // W_in - raw_origin[:, 0, None, None, None]).clamp(0, raw_size[0] - 1)
        rx = (idx % W_in - raw_origin[:, 1, None, None, None]).clamp(0, raw_size[1] - 1)
        flat = (ry * raw_size[1] + rx).reshape(M, C, -1)
        out = g.new_zeros((M, C, raw_size[0] * raw_size[1]))
        return out.scatter_add_(2, flat, g.reshape(M, C, -1)).view(M, C, *raw_size)

    @staticmethod
    def _adaptive_adjoint(s: Step, g: Tensor, in_shape: torch.Size) -> Tensor:
        if tuple(g.shape[-2:]) == tuple(in_shape[-2:]):
            return g
        with torch.enable_grad():
            z = g.new_zeros((g.shape[0],) + tuple(in_shape[1:]), requires_grad=True)
            (adj,) = torch.autograd.grad(F.adaptive_avg_pool2d(z, s.module.output_size), z, g)
        return adj
