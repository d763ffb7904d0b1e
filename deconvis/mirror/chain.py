"""Turn a chain CNN into an ordered list of steps, each with the geometry its mirror needs.

A *chain* is a network whose traced graph (torch.fx) feeds each tensor op from the one before it:
AlexNet, VGG, ZF-style nets and any nested ``nn.Sequential``. Residual adds and concatenations
are not chains; the ZF mirror is undefined there and :func:`trace_chain` says so.

Each :class:`Step` names one tensor op: a module call (named as in ``named_modules()``, with
``#2``, ``#3`` suffixes for second and later calls of the same module) or a function/method call
(named by its fx node, e.g. ``flatten``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from deconvis.errors import DeconvisError

Pair = Tuple[int, int]

# step kinds
CONV, RELU, MAXPOOL, AVGPOOL, BN, SKIP, LINEAR, RESHAPE, ADAPTIVE_AVG, OTHER = (
    "conv", "relu", "maxpool", "avgpool", "bn", "skip", "linear", "reshape", "adaptive_avg", "other")

_SKIP_MODULES = (nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Dropout, nn.Dropout2d, nn.Dropout1d,
                 nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity)
_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None)} - {None}
_DROPOUT_FUNCS = {F.dropout, F.dropout2d, torch.dropout}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous"}
_NON_TENSOR_METHODS = {"size", "dim", "numel"}


def _pair(v: Any) -> Pair:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


@dataclass
class Step:
    """One tensor op of the chain, in execution order.

    ``kernel/stride/padding/dilation`` are (h, w) pairs for conv and pool steps (padding = the
    top/left padding in pixels of the step's input); other steps leave them ``None``.
    """

    name: str
    kind: str
    node: torch.fx.Node
    module: Optional[nn.Module] = None
    kernel: Optional[Pair] = None
    stride: Optional[Pair] = None
    padding: Optional[Pair] = None
    dilation: Optional[Pair] = None
    why_unsupported: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        if self.module is not None:
            return type(self.module).__name__
        return str(getattr(self.node.target, "__name__", self.node.target))


def _conv_padding(conv: nn.Conv2d) -> Pair:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        k, d = _pair(conv.kernel_size), _pair(conv.dilation)  # 'same': PyTorch pads total//2 first
        return ((d[0] * (k[0] - 1)) // 2, (d[1] * (k[1] - 1)) // 2)
    return _pair(conv.padding)


def _module_step(name: str, node: torch.fx.Node, m: nn.Module) -> Step:
    if isinstance(m, nn.Conv2d):
        why = "" if m.padding_mode == "zeros" else f"padding_mode={m.padding_mode!r} (only 'zeros' mirrors exactly)"
        return Step(name, CONV, node, m, _pair(m.kernel_size), _pair(m.stride), _conv_padding(m),
                    _pair(m.dilation), why_unsupported=why)
    if isinstance(m, nn.ReLU):
        return Step(name, RELU, node, m)
    if isinstance(m, nn.MaxPool2d):
        return Step(name, MAXPOOL, node, m, _pair(m.kernel_size), _pair(m.stride or m.kernel_size),
                    _pair(m.padding), _pair(m.dilation), extra={"ceil_mode": m.ceil_mode})
    if isinstance(m, nn.AvgPool2d):
        k = _pair(m.kernel_size)
        return Step(name, AVGPOOL, node, m, k, _pair(m.stride or m.kernel_size), _pair(m.padding), (1, 1),
                    extra={"ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad,
                           "divisor_override": m.divisor_override})
    if isinstance(m, nn.BatchNorm2d):
        why = "" if m.track_running_stats and m.running_var is not None else \
            "BatchNorm2d without running statistics has no eval-mode scale"
        return Step(name, BN, node, m, why_unsupported=why)
    if isinstance(m, _SKIP_MODULES):
        return Step(name, SKIP, node, m)
    if isinstance(m, nn.Linear):
        return Step(name, LINEAR, node, m)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return Step(name, RESHAPE, node, m)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return Step(name, ADAPTIVE_AVG, node, m)
    return Step(name, OTHER, node, m, why_unsupported=f"{type(m).__name__} has no deconvnet mirror")


def _function_step(node: torch.fx.Node) -> Step:
    t = node.target
    if node.op == "call_function":
        if t in _RELU_FUNCS:
            return Step(node.name, RELU, node)
        if t in _DROPOUT_FUNCS:
            return Step(node.name, SKIP, node)
        if t in _RESHAPE_FUNCS:
            return Step(node.name, RESHAPE, node)
        return Step(node.name, OTHER, node, why_unsupported=f"function {getattr(t, '__name__', t)} has no deconvnet mirror")
    if t in _RESHAPE_METHODS:
        return Step(node.name, RESHAPE, node)
    if t in ("relu", "relu_"):
        return Step(node.name, RELU, node)
    return Step(node.name, OTHER, node, why_unsupported=f"method .{t}() has no deconvnet mirror")


def _node_inputs(node: torch.fx.Node) -> List[torch.fx.Node]:
    found: List[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


@dataclass
class Chain:
    """The traced graph module and its tensor steps in execution order."""

    graph_module: torch.fx.GraphModule
    steps: List[Step]
    index: Dict[str, int]  # step name -> position in ``steps``


def trace_chain(model: nn.Module) -> Chain:
    """Trace ``model`` with torch.fx and check that it is a chain; raise DeconvisError if not."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise DeconvisError(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "DeconvNet needs a traceable chain network (no data-dependent control flow in forward)") from exc
    steps: List[Step] = []
    calls: Dict[str, int] = {}
    tensor_nodes: set = set()
    prev: Optional[torch.fx.Node] = None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise DeconvisError(f"{type(model).__name__}.forward takes {len(placeholders)} inputs; DeconvNet needs exactly one image batch")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            prev = node
            tensor_nodes.add(node)
            continue
        if node.op == "output":
            break
        if node.op == "get_attr" or (node.op == "call_method" and node.target in _NON_TENSOR_METHODS) \
                or (node.op == "call_function" and node.target is getattr):
            continue  # shape queries and constants feed reshapes, not the signal
        tin = [n for n in _node_inputs(node) if n in tensor_nodes]
        if node.op == "call_function" and node.target is operator.getitem:
            raise DeconvisError(f"{type(model).__name__} is not a chain: node {node.name!r} indexes a tuple output; "
                                "DeconvNet supports sequential CNNs (AlexNet, VGG, nested Sequential)")
        if len(tin) != 1 or tin[0] is not prev:
            srcs = ", ".join(n.name for n in tin) or "nothing"
            raise DeconvisError(
                f"{type(model).__name__} is not a chain: {node.name!r} takes input from {srcs} "
                f"instead of only the previous op {prev.name if prev is not None else '?'}; the ZF deconvnet "
                "mirrors sequential CNNs (AlexNet, VGG, ZF, nested Sequential), not residual or multi-branch graphs")
        if node.op == "call_module":
            count = calls.get(node.target, 0) + 1
            calls[node.target] = count
            name = node.target if count == 1 else f"{node.target}#{count}"
            step = _module_step(name, node, gm.get_submodule(node.target))
        else:
            step = _function_step(node)
        steps.append(step)
        tensor_nodes.add(node)
        prev = node
    return Chain(gm, steps, {s.name: i for i, s in enumerate(steps)})


def layer_aliases(steps: List[Step]) -> Dict[str, str]:
    """Conventional names -> step names.

    ``convN`` (N-th Conv2d, 1-based) and ``convB_I`` (I-th conv of block B, blocks ending at each
    max-pool) mean the *rectified* map: the first ReLU after the conv (past BN, LRN, dropout) when
    there is one, else the conv output. ``poolN`` is the N-th max-pool; ``fcN`` the N-th Linear
    (rectified likewise), numbered from 6 when the net has five conv stages (AlexNet, ZF, VGG),
    else from 1.
    """
    aliases: Dict[str, str] = {}

    def rectified(i: int) -> str:
        j = i + 1
        while j < len(steps) and steps[j].kind in (BN, SKIP):
            j += 1
        if j < len(steps) and steps[j].kind == RELU:
            return steps[j].name
        return steps[i].name

    n_conv = n_pool = n_fc = 0
    block, in_block = 1, 0
    block_sizes: List[int] = []
    fc_targets: List[str] = []
    for i, s in enumerate(steps):
        if s.kind == CONV:
            n_conv += 1
            in_block += 1
            aliases[f"conv{n_conv}"] = rectified(i)
            aliases[f"conv{block}_{in_block}"] = rectified(i)
        elif s.kind == MAXPOOL:
            n_pool += 1
            aliases[f"pool{n_pool}"] = s.name
            if in_block:
                block_sizes.append(in_block)
                block += 1
                in_block = 0
        elif s.kind == LINEAR:
            n_fc += 1
            fc_targets.append(rectified(i))
    if in_block:
        block_sizes.append(in_block)
    base = 6 if (n_conv == 5 or len(block_sizes) == 5) else 1
    for i, target in enumerate(fc_targets):
        aliases[f"fc{base + i}"] = target
    return aliases


def preferred_alias(steps: List[Step], aliases: Dict[str, str]) -> Dict[str, str]:
    """Step name -> the alias to show for it (``convB_I`` for VGG-style nets of >= 5 blocks,
    ``convN`` otherwise, ``poolN``, ``fcN``)."""
    n_blocks = len([s for s in steps if s.kind == MAXPOOL])
    vgg_style = n_blocks >= 5
    out: Dict[str, str] = {}
    for alias, target in aliases.items():
        is_block = "_" in alias
        if alias.startswith("conv") and is_block != vgg_style:
            continue
        out.setdefault(target, alias)
    return out
