"""Independent oracle for the mirror: autograd through a copy of the original model with the
ReLU backward rule replaced (docs/method.md section 1). LRN gets an identity backward (the mirror skips it);
max-pool, conv, BN, linear and pooling backward are PyTorch's own."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class _RuleReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rule):
        ctx.rule = rule
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if ctx.rule == "deconvnet":
            return g.clamp(min=0), None
        if ctx.rule == "guided":
            return g.clamp(min=0) * (x > 0), None
        return g * (x > 0), None


class _IdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


class RuleReLU(nn.Module):
    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def forward(self, x):
        return _RuleReLU.apply(x, self.rule)


class SkipBackward(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return _IdentityBackward.apply(x, self.inner)


def _patch(module: nn.Module, rule: str) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(module, name, RuleReLU(rule))
        elif isinstance(child, nn.LocalResponseNorm):
            setattr(module, name, SkipBackward(child))
        else:
            _patch(child, rule)


def oracle_project(model: nn.Module, images: torch.Tensor, layer: str, units: torch.Tensor,
                   rule: str, patch_functional_relu: bool = False) -> torch.Tensor:
    """Reconstructions [M, C, H, W] by autograd: each unit seeded with its own activation."""
    m = copy.deepcopy(model).eval()
    _patch(m, rule)
    captured = {}
    m.get_submodule(layer).register_forward_hook(lambda mod, i, o: captured.__setitem__("a", o))
    x = images[units[:, 0]].clone().requires_grad_(True)
    orig_relu = F.relu
    if patch_functional_relu:
        F.relu = lambda t, inplace=False: _RuleReLU.apply(t, rule)
    try:
        m(x)
    finally:
        F.relu = orig_relu
    act = captured["a"]
    seed = torch.zeros_like(act)
    ar = torch.arange(len(units))
    if act.dim() == 4:
        seed[ar, units[:, 1], units[:, 2], units[:, 3]] = act[ar, units[:, 1], units[:, 2], units[:, 3]]
    else:
        seed[ar, units[:, 1]] = act[ar, units[:, 1]]
    (g,) = torch.autograd.grad(act, x, seed)
    return g.detach()


# --------------------------------------------------------------------------------------------
# Graph oracle: the model's own forward (no torch.fx) under a TorchFunctionMode that swaps the
# backward of every ReLU-family call (module or functional, in-place or not), LRN given an
# identity backward, then one torch.autograd.grad from the seed. Written independently of
# deconvis's mirror: it shares no code with deconvis.
from torch.overrides import TorchFunctionMode  # noqa: E402


def _slope_of(kind, x, slope):
    if kind == "leaky":
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))
    if kind == "prelu":
        w = slope.reshape((1, -1) + (1,) * (x.dim() - 2)) if slope.numel() > 1 else slope.reshape(())
        return torch.where(x > 0, torch.ones_like(x), w.expand_as(x))
    if kind == "relu6":
        return ((x > 0) & (x < 6)).to(x.dtype)
    return (x > 0).to(x.dtype)


class _RuleAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rule, kind, slope):
        ctx.rule, ctx.kind = rule, kind
        ctx.slope = slope.detach() if isinstance(slope, torch.Tensor) else slope
        ctx.save_for_backward(x)
        if kind == "relu":
            return x.clamp(min=0)
        if kind == "relu6":
            return x.clamp(0, 6)
        return x * _slope_of(kind, x, ctx.slope)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = _slope_of(ctx.kind, x, ctx.slope)
        if ctx.rule == "gradient":
            out = g * s
        elif ctx.rule == "guided":
            out = g.clamp(min=0) * s
        elif ctx.kind in ("relu", "relu6"):
            out = g.clamp(min=0)
        else:  # deconvnet on a leaky unit: g where g > 0, slope * g elsewhere
            neg = torch.full_like(g, ctx.slope) if ctx.kind == "leaky" else _slope_of("prelu", -torch.ones_like(x), ctx.slope)
            out = torch.where(g > 0, g, neg * g)
        return out, None, None, None


class _LRNSkip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, args, kwargs):
        return F.local_response_norm(x, *args, **kwargs)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class RuleMode(TorchFunctionMode):
    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("inplace"):  # F.silu(x, inplace=True) would overwrite the captured activation
            kwargs["inplace"] = False
        x = args[0] if args else kwargs.get("input")
        if func in (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, getattr(F, "relu_", None)):
            return _RuleAct.apply(x, self.rule, "relu", None)
        if func is F.relu6:
            return _RuleAct.apply(x, self.rule, "relu6", None)
        if func is F.hardtanh:
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            if (lo, hi) == (0.0, 6.0):
                return _RuleAct.apply(x, self.rule, "relu6", None)
        if func in (F.leaky_relu, getattr(F, "leaky_relu_", None)):
            slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
            return _RuleAct.apply(x, self.rule, "leaky", float(slope))
        if func in (F.prelu, torch.prelu):
            w = args[1] if len(args) > 1 else kwargs["weight"]
            return _RuleAct.apply(x, self.rule, "prelu", w)
        if func is F.local_response_norm:
            return _LRNSkip.apply(x, tuple(args[1:]), kwargs)
        return func(*args, **kwargs)


def graph_oracle_project(model, images, module_name, units, rule, call=1):
    """Reconstructions [M, C, H, W] of ``units`` (image, channel, y, x) of the output of module
    ``module_name`` (its ``call``-th call) by autograd through the model's own eval forward."""
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if getattr(mod, "inplace", False):
            mod.inplace = False
    seen = {"n": 0}
    captured = {}

    def hook(mod, inp, out):
        seen["n"] += 1
        if seen["n"] == call:
            captured["a"] = out

    m.get_submodule(module_name).register_forward_hook(hook)
    x = images[units[:, 0]].clone().requires_grad_(True)
    with RuleMode(rule):
        m(x)
    act = captured["a"]
    seed = torch.zeros_like(act)
    ar = torch.arange(len(units))
    if act.dim() == 4:
        seed[ar, units[:, 1], units[:, 2], units[:, 3]] = act[ar, units[:, 1], units[:, 2], units[:, 3]].detach()
    else:
        seed[ar, units[:, 1]] = act[ar, units[:, 1]].detach()
    (g,) = torch.autograd.grad(act, x, seed)
    return g.detach()
