"""Independent oracle for the mirror: autograd through a copy of the original model with the
ReLU backward rule replaced (METHOD.md §1). LRN gets an identity backward (the mirror skips it);
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
