"""What each torch.fx node of a CNN does, as far as geometry and the mirror care.

One place for the op tables that the receptive-field walk (:mod:`deconvis.graph.rf`), the
effective receptive field (:mod:`deconvis.graph.erf`) and the mirror (:mod:`deconvis.mirror`)
share: which modules, functions and methods are elementwise, merges, reshapes, windows (conv
and pools, with their kernel, stride, padding and dilation) or ReLU-family units, and how an
in-place op maps to its out-of-place twin.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

Pair = Tuple[int, int]

PASS_MODULES: Tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink,
    nn.BatchNorm2d, nn.SyncBatchNorm, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Identity,
)
# elementwise / per-position functions (ReLU-like, dropout, LRN, eval batch norm)
PASS_FUNCS = {f for f in (
    F.relu, getattr(F, "relu_", None), torch.relu, torch.relu_, F.relu6, F.leaky_relu,
    getattr(F, "leaky_relu_", None), F.elu, getattr(F, "elu_", None), F.selu, F.celu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, getattr(F, "hardtanh_", None), F.sigmoid, F.tanh,
    torch.sigmoid, torch.tanh, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, F.prelu, F.threshold,
    F.dropout, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout, F.local_response_norm,
    F.batch_norm, torch.abs, torch.neg, operator.neg, torch.clamp, torch.clip, torch.exp, torch.square,
    torch.sqrt,
) if f is not None}
try:  # torchvision's stochastic depth (identity in eval) is an fx leaf function
    from torchvision.ops import stochastic_depth as _stochastic_depth
    PASS_FUNCS.add(_stochastic_depth)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
                 "clamp_min_", "clamp_max", "abs", "neg", "exp", "square", "sqrt", "contiguous", "float",
                 "double", "half", "to", "type_as", "clone", "detach", "__neg__"}
# maps combined position by position
MERGE_FUNCS = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub,
                operator.truediv, operator.itruediv, torch.add, torch.mul, torch.sub, torch.div,
                torch.cat, torch.concat, torch.stack, torch.maximum, torch.minimum,
                getattr(torch, "concatenate", None)} - {None}
MERGE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "maximum", "minimum"}
CAT_FUNCS = {torch.cat, torch.concat, getattr(torch, "concatenate", None)} - {None}
# shape changes: keep the geometry when the spatial dims survive as the last two, else whole
RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.mean, torch.sum,
                  torch.amax, torch.amin}
RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "mean", "sum", "amax", "amin",
                    "view_as", "reshape_as"}
SPLIT_FUNCS = {torch.chunk, torch.split}
SPLIT_METHODS = {"chunk", "split"}
WHOLE_MODULES: Tuple[type, ...] = (nn.Linear, nn.Bilinear)
WHOLE_FUNCS = {F.linear}
NON_TENSOR_METHODS = {"size", "dim", "numel"}
# modules the ZF mirror passes straight through (dropout in eval, LRN as ZF skip it, identity)
SKIP_MODULES: Tuple[type, ...] = (nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                                  nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity)


def _pair(v: Any) -> Pair:
    """An int or a sequence -> (h, w); an empty sequence -> (1, 1)."""
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (1, 1)
    return (int(v), int(v))


def node_arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of an fx call ``node``, given positionally or as keyword ``name``; else ``default``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)




def window_params(node: torch.fx.Node, gm: torch.fx.GraphModule, shapes: Dict[torch.fx.Node, Any]
                   ) -> Optional[Dict[str, Any]]:
    """Kernel/stride/padding/dilation/ceil_mode (h, w pairs) of a conv or pool node, else None.

    ``padding`` may be the string 'same'/'valid' for convolutions."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            k, d = _pair(m.kernel_size), _pair(m.dilation)
            pad: Any = m.padding
            if isinstance(pad, str):
                pad = (0, 0) if pad == "valid" else ((d[0] * (k[0] - 1)) // 2, (d[1] * (k[1] - 1)) // 2)
            return dict(k=k, s=_pair(m.stride), p=_pair(pad), d=d, ceil=False, conv=True,
                        same=m.padding == "same")
        if isinstance(m, nn.MaxPool2d):
            return dict(k=_pair(m.kernel_size), s=_pair(m.stride or m.kernel_size), p=_pair(m.padding),
                        d=_pair(m.dilation), ceil=bool(m.ceil_mode), conv=False, same=False)
        if isinstance(m, nn.AvgPool2d):
            return dict(k=_pair(m.kernel_size), s=_pair(m.stride or m.kernel_size), p=_pair(m.padding),
                        d=(1, 1), ceil=bool(m.ceil_mode), conv=False, same=False)
        if isinstance(m, nn.LPPool2d):
            return dict(k=_pair(m.kernel_size), s=_pair(m.stride or m.kernel_size), p=(0, 0), d=(1, 1),
                        ceil=bool(m.ceil_mode), conv=False, same=False)
        return None
    if node.op != "call_function":
        return None
    t = node.target
    name = getattr(t, "__name__", "")
    if t in (F.conv2d, torch.conv2d) or name == "conv2d":
        w = node_arg(node, 1, "weight")
        wshape = shapes.get(w) if isinstance(w, torch.fx.Node) else None
        if wshape is None or len(wshape) != 4:
            return None
        k = (int(wshape[2]), int(wshape[3]))
        d = _pair(node_arg(node, 5, "dilation", 1))
        pad = node_arg(node, 4, "padding", 0)
        same = pad == "same"
        if isinstance(pad, str):
            pad = (0, 0) if pad == "valid" else ((d[0] * (k[0] - 1)) // 2, (d[1] * (k[1] - 1)) // 2)
        return dict(k=k, s=_pair(node_arg(node, 3, "stride", 1)), p=_pair(pad), d=d, ceil=False, conv=True, same=same)
    if t in (F.max_pool2d, torch.max_pool2d) or name in ("max_pool2d", "max_pool2d_with_indices"):
        k = _pair(node_arg(node, 1, "kernel_size"))
        s = node_arg(node, 2, "stride", None)
        return dict(k=k, s=_pair(s) if s not in (None, [], ()) else k, p=_pair(node_arg(node, 3, "padding", 0)),
                    d=_pair(node_arg(node, 4, "dilation", 1)), ceil=bool(node_arg(node, 5, "ceil_mode", False)),
                    conv=False, same=False)
    if t in (F.avg_pool2d,) or name == "avg_pool2d":
        k = _pair(node_arg(node, 1, "kernel_size"))
        s = node_arg(node, 2, "stride", None)
        return dict(k=k, s=_pair(s) if s not in (None, [], ()) else k, p=_pair(node_arg(node, 3, "padding", 0)),
                    d=(1, 1), ceil=bool(node_arg(node, 4, "ceil_mode", False)), conv=False, same=False)
    return None




def kind_name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return str(node.target)
    t = node.target
    return str(getattr(t, "__name__", t))




# ------------------------------------------------------------------------------ ReLU family
@dataclass(frozen=True)
class ReluUnit:
    """A ReLU-family unit: ``kind`` is ``relu``, ``relu6``, ``leaky`` (constant ``slope``) or
    ``prelu`` (learned slope, ``weight`` is the fx node or module holding it)."""

    kind: str
    slope: float = 0.0
    weight: Any = None


_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None)} - {None}
_LEAKY_FUNCS = {F.leaky_relu, getattr(F, "leaky_relu_", None)} - {None}


def relu_unit(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Optional[ReluUnit]:
    """The ReLU-family unit a node computes (module, function or method; in-place or not), else None."""
    t = node.target
    if node.op == "call_module":
        m = gm.get_submodule(t)
        if isinstance(m, nn.ReLU):
            return ReluUnit("relu")
        if isinstance(m, nn.ReLU6):
            return ReluUnit("relu6")
        if isinstance(m, nn.LeakyReLU):
            return ReluUnit("leaky", float(m.negative_slope))
        if isinstance(m, nn.PReLU):
            return ReluUnit("prelu", weight=m)
        return None
    if node.op == "call_function":
        if t in _RELU_FUNCS:
            return ReluUnit("relu")
        if t is F.relu6:
            return ReluUnit("relu6")
        if t in _LEAKY_FUNCS:
            return ReluUnit("leaky", float(node_arg(node, 1, "negative_slope", 0.01)))
        if t in (F.prelu, torch.prelu):
            return ReluUnit("prelu", weight=node_arg(node, 1, "weight"))
        return None
    if node.op == "call_method" and t in ("relu", "relu_"):
        return ReluUnit("relu")
    return None


# ------------------------------------------------------------------------------- in-place ops
_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


def out_of_place(node: torch.fx.Node) -> Tuple[Any, Dict[str, Any]]:
    """(target, kwargs) to run ``node`` without writing into its input: ``x += y`` becomes
    ``x + y``, ``x.add_(y)`` becomes ``x.add(y)``, ``inplace=True`` becomes ``False``."""
    t, kwargs = node.target, dict(node.kwargs)
    if kwargs.get("inplace"):
        kwargs["inplace"] = False
    if node.op == "call_function":
        if t in _INPLACE_OPERATORS:
            return _INPLACE_OPERATORS[t], kwargs
        name = getattr(t, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            twin = getattr(torch, name[:-1], None) or getattr(F, name[:-1], None)
            if twin is not None:
                return twin, kwargs
    elif node.op == "call_method" and isinstance(t, str) and t.endswith("_") and not t.endswith("__") \
            and hasattr(torch.Tensor, t[:-1]):
        return t[:-1], kwargs
    return t, kwargs


def module_inplace(m: nn.Module) -> bool:
    """Whether calling ``m`` would overwrite its input (an ``inplace=True`` activation)."""
    return bool(getattr(m, "inplace", False))
