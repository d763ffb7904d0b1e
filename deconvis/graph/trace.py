"""The one tracer: a model traced once with torch.fx, its node names, containers and aliases.

Every consumer (receptive fields, the effective RF, the mirror, mining, occlusion) asks the
:class:`TracedGraph` for node names and resolves layer names through :meth:`TracedGraph.resolve`,
so a name means the same tensor everywhere.

Names (*row names*):

* ``input`` for the image batch;
* a module call is named as in ``named_modules()`` (``features.0``, ``layer1.0.conv1``); a
  module called more than once (ResNet's shared ``relu``) gets ``#2``, ``#3`` for later calls;
* a function or method call is named by the module whose ``forward`` called it and the op, as
  torchvision's ``get_graph_node_names`` does (``F.relu`` in ``l2``'s forward: ``l2.relu``; in the
  model's own forward: ``flatten``), with ``#2``, ``#3`` for later calls of the same name.

torch.fx's own names of function calls (``relu_4``, ``add_1``: the names before 0.x) still
resolve, to the same node, with a one-time log note giving the new name.

Names a user may also give:

* a container module (``features``, ``layer3``, ``layer3.1``): its output, the last node
  computed inside it;
* conventional aliases, on chain networks only (every op fed by the one before: AlexNet, ZF,
  VGG, plain stacks): ``convN`` (AlexNet, ZF, plain stacks) or ``convB_I`` (VGG: conv I of
  block B) mean the *rectified* map (the first ReLU after the conv past BN, LRN and dropout);
  ``poolN`` numbers max-pools by the conv stage they close (AlexNet ``pool1``, ``pool2``,
  ``pool5``; VGG ``pool1``..``pool5``); ``fcN`` the rectified Linear outputs, numbered from 6
  on nets with five conv stages (AlexNet, ZF, VGG) and from 1 otherwise.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set

import torch
import torch.fx
from torch import nn

from deconvis.errors import DeconvisError, close_matches
from deconvis.graph import ops

log = logging.getLogger("deconvis")

#: op kinds (:meth:`TracedGraph.kind`) whose output is a pre-activation: a mined layer of one of
#: these kinds gets the bottom-k of its own minima (:meth:`TracedGraph.preactivation`)
PREACTIVATION_KINDS = frozenset({"Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Linear", "BatchNorm1d", "BatchNorm2d",
                                 "GroupNorm", "LayerNorm", "add", "iadd", "sub", "isub", "conv2d", "linear",
                                 "batch_norm"})


@dataclass
class TracedGraph:
    """A model traced with torch.fx (eval-mode forward), sharing the model's submodules.

    ``row_names``: fx node -> row name (every node but ``output`` and ``get_attr``);
    ``container_last``: qualified container name -> its last node; ``aliases``: alias -> row
    name (chains only); ``signal``: the nodes whose value depends on the input image;
    ``legacy``: torch.fx's names of function calls (``relu_4``) -> row name, still accepted.
    """

    model: nn.Module
    graph_module: torch.fx.GraphModule
    row_names: Dict[torch.fx.Node, str]
    container_last: Dict[str, torch.fx.Node] = field(default_factory=dict)
    aliases: Dict[str, str] = field(default_factory=dict)
    signal: Set[torch.fx.Node] = field(default_factory=set)
    is_chain: bool = False
    legacy: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nodes: Dict[str, torch.fx.Node] = {name: n for n, name in self.row_names.items()}
        self._label: Dict[str, str] = {}
        self._noted: Set[str] = set()  # legacy names already noted in the log (once per trace)
        for alias, row in self.aliases.items():
            self._label.setdefault(row, alias)
        # a container's output row is shown by the container's name (the outermost one ending there)
        for name, node in sorted(self.container_last.items(), key=lambda kv: (kv[0].count("."), len(kv[0]))):
            if name and node in self.row_names:
                self._label.setdefault(self.row_names[node], name)

    @property
    def model_name(self) -> str:
        return type(self.model).__name__

    @property
    def input_node(self) -> torch.fx.Node:
        return next(n for n in self.graph_module.graph.nodes if n.op == "placeholder")

    def node(self, row_name: str) -> torch.fx.Node:
        """The fx node of a row name (KeyError when unknown)."""
        return self.nodes[row_name]

    def module(self, node: torch.fx.Node) -> Optional[nn.Module]:
        """The module a ``call_module`` node calls, else None."""
        return self.graph_module.get_submodule(node.target) if node.op == "call_module" else None

    def kind(self, node: torch.fx.Node) -> str:
        """Type name of the op (``Conv2d``, ``add``, ``flatten``, ``input``)."""
        return ops.kind_name(node, self.graph_module)

    @property
    def layer_names(self) -> List[str]:
        """Row names of the signal nodes (the input excluded), in execution order."""
        return [self.row_names[n] for n in self.graph_module.graph.nodes
                if n in self.signal and n.op != "placeholder"]

    def resolve(self, name: str) -> str:
        """Row name, container name or alias -> row name; DeconvisError with close matches."""
        if not isinstance(name, str):
            raise DeconvisError(f"a layer name must be a string, got {type(name).__name__}")
        if name in self.nodes:
            return name
        if name in self.container_last and self.container_last[name] in self.row_names:
            return self.row_names[self.container_last[name]]
        if name in self.aliases:
            return self.aliases[name]
        if name in self.legacy:
            row = self.legacy[name]
            if name not in self._noted:
                self._noted.add(name)
                log.warning("note: layer %r is the old (torch.fx) name of %r in %s; it still works, the "
                            "tables and outputs call it %r", name, row, self.model_name, row)
            return row
        raise DeconvisError(f"unknown layer {name!r} in {self.model_name}"
                            + close_matches(name, list(self.aliases) + list(self.container_last) + self.layer_names))

    def label(self, name: str) -> str:
        """The name to show for a layer: the name as given when it is an alias or container,
        else the row's conventional alias when it has one, else the row name."""
        if name in self.aliases or (name in self.container_last and name not in self.nodes):
            return name
        row = self.resolve(name)
        return self._label.get(row, row)

    def preactivation(self, name: str) -> Optional[str]:
        """The row whose minima are ``name``'s bottom-k (the most negative responses before
        rectification): for a ReLU-family unit (ReLU, ReLU6, LeakyReLU, PReLU; module, function or
        method) its input; for a layer that is itself a pre-activation (conv, Linear, BatchNorm,
        GroupNorm/LayerNorm, a residual add or subtraction) the layer itself (its own minima); None
        for anything else (pools, concatenations, the input), whose minima say nothing new."""
        node = self.node(self.resolve(name))
        if ops.relu_unit(node, self.graph_module) is not None:
            ins = signal_inputs(node, self.signal)
            return self.row_names.get(ins[0]) if ins and ins[0].op != "placeholder" else None
        return self.row_names[node] if self.kind(node) in PREACTIVATION_KINDS else None

    def conv_layers(self) -> List[str]:
        """Rows of the rectified conv maps of a chain (ZF's layers 1..5 for AlexNet); for other
        graphs, the output of every top-level child module that holds a conv (ResNet's
        ``layer1``..``layer4`` and stem), in order."""
        if self.is_chain:
            convs = sorted((a for a in self.aliases if a.startswith("conv") and "_" not in a), key=lambda a: int(a[4:]))
            if not convs:
                convs = sorted((a for a in self.aliases if a.startswith("conv")),
                               key=lambda a: tuple(int(v) for v in a[4:].split("_")))
            return [self.aliases[a] for a in convs]
        out: List[str] = []
        for name, child in self.model.named_children():
            if any(isinstance(m, nn.Conv2d) for m in child.modules()) and name in self.container_last:
                out.append(self.resolve(name))
        return out


def _caller(node: torch.fx.Node) -> str:
    """Qualified name of the module whose ``forward`` made this call ('' for the model's own)."""
    stack = node.meta.get("nn_module_stack") or {}
    quals = [q for q, _t in stack.values()]
    return quals[-1] if quals else ""


def _op_name(node: torch.fx.Node) -> str:
    """The op part of a function or method call's name: its fx name without fx's ``_N`` suffix."""
    m = re.fullmatch(r"(.+?)_(\d+)", node.name)
    return m.group(1) if m else node.name


def _row_names(gm: torch.fx.GraphModule) -> Dict[torch.fx.Node, str]:
    """Row names (see the module docstring): a module call by its qualified name, a function or
    method call by its caller's qualified name and the op; ``#k`` for the k-th use of a name."""
    names: Dict[torch.fx.Node, str] = {}
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            names[node] = "input"
            continue
        if node.op in ("output", "get_attr"):
            continue
        if node.op == "call_module":
            base = node.target
        else:
            caller = _caller(node)
            base = f"{caller}.{_op_name(node)}" if caller else _op_name(node)
        count = calls.get(base, 0) + 1
        calls[base] = count
        names[node] = base if count == 1 else f"{base}#{count}"
    return names


def _legacy_names(gm: torch.fx.GraphModule, names: Dict[torch.fx.Node, str]) -> Dict[str, str]:
    """The names of earlier versions (module calls ``target#k``, function calls by fx node name)
    that now mean another name -> the row name, where they do not clash with a current name."""
    current = set(names.values())
    legacy: Dict[str, str] = {}
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node not in names or node.op == "placeholder":
            continue
        if node.op == "call_module":
            count = calls.get(node.target, 0) + 1
            calls[node.target] = count
            old = node.target if count == 1 else f"{node.target}#{count}"
        else:
            old = node.name
        if old != names[node] and old not in current:
            legacy[old] = names[node]
    return legacy


def _signal_nodes(gm: torch.fx.GraphModule) -> Set[torch.fx.Node]:
    """Nodes whose value depends on the input tensor (shape queries excluded)."""
    signal: Set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            signal.add(node)
            continue
        if node.op in ("output", "get_attr"):
            continue
        if node.op == "call_method" and node.target in ops.NON_TENSOR_METHODS:
            continue
        if node.op == "call_function" and node.target is getattr:
            continue
        if any(a in signal for a in _inputs(node)):
            signal.add(node)
    return signal


def _inputs(node: torch.fx.Node) -> List[torch.fx.Node]:
    found: List[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n not in found else None)
    return found


def signal_inputs(node: torch.fx.Node, signal: Set[torch.fx.Node]) -> List[torch.fx.Node]:
    """The input-dependent tensor nodes among ``node``'s arguments, in order, each once."""
    return [a for a in _inputs(node) if a in signal]


def _chain_aliases(gm: torch.fx.GraphModule, order: List[torch.fx.Node], names: Dict[torch.fx.Node, str]
                   ) -> Dict[str, str]:
    """Conventional aliases of a chain (see the module docstring)."""
    kinds: List[str] = []
    for n in order:
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        win = ops.window_params(n, gm, {})
        if ops.relu_unit(n, gm) is not None:
            kinds.append("relu")
        elif isinstance(m, nn.Conv2d):
            kinds.append("conv")
        elif isinstance(m, nn.MaxPool2d) or (win is not None and not win["conv"] and "max" in ops.kind_name(n, gm)):
            kinds.append("maxpool")
        elif isinstance(m, nn.Linear):
            kinds.append("linear")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d) + ops.SKIP_MODULES):
            kinds.append("skip")
        else:
            kinds.append("other")

    def rectified(i: int) -> str:
        j = i + 1
        while j < len(order) and kinds[j] == "skip":
            j += 1
        return names[order[j]] if j < len(order) and kinds[j] == "relu" else names[order[i]]

    blocks: List[List[int]] = [[]]
    pools: List[int] = []  # conv count before each pool
    n_conv = 0
    for i, k in enumerate(kinds):
        if k == "conv":
            n_conv += 1
            blocks[-1].append(i)
        elif k == "maxpool":
            pools.append(n_conv)
            if blocks[-1]:
                blocks.append([])
    blocks = [b for b in blocks if b]
    vgg = len([b for b in blocks]) >= 5 and any(len(b) > 1 for b in blocks)
    aliases: Dict[str, str] = {}
    if vgg:
        for b, block in enumerate(blocks, 1):
            for i, idx in enumerate(block, 1):
                aliases[f"conv{b}_{i}"] = rectified(idx)
    else:
        convs = [i for i, k in enumerate(kinds) if k == "conv"]
        for c, idx in enumerate(convs, 1):
            aliases[f"conv{c}"] = rectified(idx)
    pool_nodes = [i for i, k in enumerate(kinds) if k == "maxpool"]
    for p, idx in enumerate(pool_nodes):
        if vgg:
            number = sum(1 for b in blocks if b[0] < idx)
        else:
            number = pools[p]
        if number and f"pool{number}" not in aliases:
            aliases[f"pool{number}"] = names[order[idx]]
    stages = len(blocks) if vgg else n_conv
    base = 6 if stages == 5 else 1
    for f, idx in enumerate([i for i, k in enumerate(kinds) if k == "linear"]):
        aliases[f"fc{base + f}"] = rectified(idx)
    return aliases


def trace_graph(model: nn.Module) -> TracedGraph:
    """Trace ``model`` once with ``torch.fx.symbolic_trace`` (in eval mode; modes restored).

    DeconvisError when it cannot be traced (data-dependent control flow) or does not take
    exactly one image batch."""
    if not isinstance(model, nn.Module):
        raise DeconvisError(f"deconvis needs a torch.nn.Module, got {type(model).__name__}")
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # trace the eval-mode forward (self.training branches, functional dropout)
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise DeconvisError(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {first}); deconvis needs "
            "a traceable forward (no control flow that depends on tensor values or shapes)") from exc
    finally:
        for m, training in modes.items():
            m.training = training
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise DeconvisError(f"{type(model).__name__}.forward takes {len(placeholders)} inputs; deconvis needs "
                            "a network of exactly one image batch")
    names = _row_names(gm)
    last: Dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node not in names or node.op == "placeholder":
            continue
        for qual, _type in (node.meta.get("nn_module_stack") or {}).values():
            if qual:
                last[qual] = node
    signal = _signal_nodes(gm)
    order = [n for n in gm.graph.nodes if n in signal and n.op != "placeholder"]
    chain = True
    prev = placeholders[0]
    for n in order:
        ins = signal_inputs(n, signal)
        if len(ins) != 1 or ins[0] is not prev:
            chain = False
            break
        prev = n
    aliases = _chain_aliases(gm, order, names) if chain else {}
    return TracedGraph(model, gm, names, last, aliases, signal, chain, _legacy_names(gm, names))


def truncated_module(tg: TracedGraph, target: torch.fx.Node,
                     rewrite: Optional[Callable[[torch.fx.Graph, torch.fx.Node, Dict[torch.fx.Node, torch.fx.Node]],
                                                Optional[torch.fx.Node]]] = None) -> torch.fx.GraphModule:
    """A graph module computing ``target``'s value from the input batch, stopping there (the layers
    after it are not run). It shares the traced model's submodules: nothing is copied and the
    model is not changed. ``rewrite(graph, node, env)`` may return a replacement for a node."""
    g = torch.fx.Graph()
    env: Dict[torch.fx.Node, torch.fx.Node] = {}
    for n in tg.graph_module.graph.nodes:
        if n.op == "output":
            break
        new = rewrite(g, n, env) if rewrite is not None else None
        env[n] = new if new is not None else g.node_copy(n, lambda a: env[a])
        if n is target:
            break
    g.output(env[target])
    return torch.fx.GraphModule(tg.graph_module, g)
