"""The mirror over a traced graph: a forward that records, and a backward with the ReLU rule replaced.

:class:`Mirror` interprets the graph of a :class:`~deconvis.graph.trace.TracedGraph` on an image
batch, keeping every node's value and every max-pool's switches (:meth:`Mirror.run`), then
carries a seed at one node back to the input (:meth:`Mirror.backward`), node by node in reverse:

* ReLU-family units apply the :class:`~deconvis.mirror.rules.Rule` (deconvnet, guided, gradient);
* a max-pool puts each value back at its recorded switch (windows that overlap add);
* a conv applies its transposed filters, no bias; eval-mode BatchNorm its per-channel scale;
* LRN and dropout pass the signal through (ZF skip them);
* Linear, reshapes, residual adds (the signal goes to both inputs), concatenations (split by
  channel) and products (each factor gets the signal times the other, at its recorded value) have
  explicit rules;
* every other op takes its exact local derivative at the recorded forward (a vector-Jacobian
  product by autograd on that one op: LayerNorm, GELU, SiLU, Hardswish, sigmoid gates, pads,
  permutes, pools of any kind).

This is reverse-mode differentiation from the seed with the ReLU-family rule changed; on a chain
it is exactly Zeiler & Fergus's deconvnet. The forward always has eval semantics (dropout off,
BatchNorm on its running statistics) whatever the model's mode, and never writes into a tensor
it recorded (in-place ops run out of place).

:meth:`Mirror.backward_window` carries each unit's cone only (see :class:`WindowPlan`).

The op classification is :mod:`deconvis.mirror.classify`; the larger local rules are in
:mod:`deconvis.mirror.local_rules` (re-exported here for :mod:`deconvis.mirror.window`).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from deconvis.errors import DeconvisError
from deconvis.graph import ops
from deconvis.graph.trace import TracedGraph, signal_inputs
from deconvis.mirror.classify import DROPOUT, Node, Op, classify
from deconvis.mirror.local_rules import accumulate_grad, grad_pairs, prelu_slope, reduce_to, relu_rule, bn_scale
from deconvis.mirror.rules import Rule
from deconvis.mirror.tconv import conv_transpose


class Mirror:
    """Forward with recording and backward with the ReLU rule replaced, over one traced graph."""

    def __init__(self, tg: TracedGraph):
        self.tg = tg
        self.gm = tg.graph_module
        self.order: List[Node] = [n for n in self.gm.graph.nodes if n in tg.signal]
        self.position = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        self.ops: Dict[Node, Op] = {n: classify(n, tg) for n in self.order}
        self.node_inputs: Dict[Node, List[Node]] = {n: signal_inputs(n, tg.signal) for n in self.order}
        self._ancestors: Dict[Node, List[Node]] = {}
        last_use: Dict[Node, int] = {}
        for i, n in enumerate(self.gm.graph.nodes):
            torch.fx.node.map_arg((n.args, n.kwargs), lambda a: last_use.__setitem__(a, i))
        self._last_use = last_use
        self._scratch = threading.local()  # the windowed backward's reusable buffers, per thread
        # eval BatchNorm right after a conv that feeds nothing else: its scale is folded into the
        # conv's transposed filters (one product per call over the weights, not per signal element)
        self.bn_after: Dict[Node, nn.Module] = {}
        self.folded_bn: Set[Node] = set()
        for n in self.order:
            ins = self.node_inputs[n]
            if self.ops[n].kind == "bn" and len(ins) == 1 and self.ops[ins[0]].kind == "conv" \
                    and len(ins[0].users) == 1 and self.ops[ins[0]].module.out_channels == self.ops[n].module.num_features:
                self.bn_after[ins[0]] = self.ops[n].module
                self.folded_bn.add(n)

    def scratch(self) -> Dict[Any, Tensor]:
        """This thread's scratch buffers, kept from call to call (see
        :data:`deconvis.mirror.window.REUSE_BUFFERS`); :meth:`release_scratch` drops them."""
        pool = getattr(self._scratch, "pool", None)
        if pool is None:
            pool = self._scratch.pool = {}
        return pool

    def release_scratch(self) -> None:
        """Drop this thread's scratch buffers."""
        self._scratch.pool = {}

    @contextlib.contextmanager
    def fixed_weights(self) -> Iterator[None]:
        """Within this block (on this thread) :meth:`conv_weight` keeps the filters it computes
        for the next calls: the caller promises not to change the model meanwhile (the projection
        phase of a run). An optimizer step or ``load_state_dict`` (a new version of a parameter)
        still recomputes them."""
        before = getattr(self._scratch, "weights", None)
        self._scratch.weights = {} if before is None else before
        try:
            yield
        finally:
            self._scratch.weights = before

    def conv_weight(self, node: Node, dtype: torch.dtype, fold: bool, channels_last: bool = False) -> Tensor:
        """The conv's filters [C_out, C_in/groups, kh, kw] in ``dtype`` (``channels_last``: in that
        memory format); with ``fold`` (the signal reaches this conv through the BatchNorm after it,
        see :attr:`bn_after`) times that BatchNorm's per-channel scale. Computed per call, so it
        follows a model that trains, except inside :meth:`fixed_weights`."""
        module = self.ops[node].module
        bn = self.bn_after.get(node) if fold else None
        cache = getattr(self._scratch, "weights", None)
        if cache is not None:
            sources = [module.weight] if bn is None else [module.weight, bn.weight, bn.running_var]
            try:
                stamp = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources if t is not None)
            except RuntimeError:  # an inference-mode tensor has no version counter: no caching
                cache = None
            else:
                key = (node, dtype, bn is not None, channels_last)
                hit = cache.get(key)
                if hit is not None and hit[0] == stamp:
                    return hit[1]
        w = module.weight.to(dtype)
        if bn is not None:
            w = w * bn_scale(bn).to(dtype).view(-1, 1, 1, 1)
        if channels_last:
            w = w.contiguous(memory_format=torch.channels_last)
        if cache is not None:
            cache[key] = (stamp, w.detach())
        return w

    # ------------------------------------------------------------------------- forward
    def ancestors(self, target: Node) -> List[Node]:
        """Signal nodes the target depends on (itself included), in execution order."""
        if target not in self._ancestors:
            seen = {target}
            stack = [target]
            while stack:
                for a in self.node_inputs.get(stack.pop(), []):
                    if a not in seen:
                        seen.add(a)
                        stack.append(a)
            self._ancestors[target] = [n for n in self.order if n in seen]
        return self._ancestors[target]

    def run(self, x: Tensor, stop: Optional[Node], record: bool, keep: Sequence[Node] = ()) -> Tuple[Dict[Node, Any], Dict[Node, Tensor]]:
        """Run the graph on ``x`` [N, C, H, W] up to ``stop`` (inclusive; None: the whole graph).

        Returns (values, switches). With ``record`` every value is kept and max-pool switches
        are recorded; without, only ``keep`` nodes are kept (the rest freed after last use)."""
        env: Dict[Node, Any] = {}
        switches: Dict[Node, Tensor] = {}
        keep_set = set(keep)
        for i, node in enumerate(self.gm.graph.nodes):
            if node.op == "output":
                break
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "get_attr":
                env[node] = _fetch_attr(self.gm, node.target)
            else:
                args = torch.fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
                try:
                    env[node] = self.forward_node(node, args, kwargs, record, switches)
                except DeconvisError:
                    raise
                except RuntimeError as exc:
                    msg = (str(exc).strip().splitlines() or [""])[0]
                    raise DeconvisError(
                        f"forward failed at {self.tg.row_names.get(node, node.name)!r} "
                        f"({self.tg.kind(node)}) for images of shape {list(x.shape)} ({msg}); are the images too "
                        "small or of the wrong size or channel count for this network?") from exc
            if node is stop:
                break
            if not record:
                for a in _arg_nodes(node):
                    if self._last_use.get(a) == i and a not in keep_set:
                        env.pop(a, None)
        return env, switches

    def forward_node(self, node: Node, args: tuple, kwargs: dict, record: bool, switches: Dict[Node, Tensor]) -> Any:
        """Run one node forward on ``args``/``kwargs``; with ``record``, store its max-pool switches
        in ``switches`` for the backward pass."""
        op = self.ops.get(node)
        if op is not None:
            k = op.kind
            if k == "relu":
                x, u = args[0], op.unit
                if u.kind == "relu":
                    return F.relu(x)
                if u.kind == "relu6":
                    return F.relu6(x)
                if u.kind == "leaky":
                    return F.leaky_relu(x, u.slope)
                w = op.module.weight if op.module is not None else (args[1] if len(args) > 1 else kwargs["weight"])
                return F.prelu(x, w)
            if k == "maxpool":
                w = op.win
                if record:
                    y, idx = F.max_pool2d(args[0], w["k"], w["s"], w["p"], w["d"], ceil_mode=w["ceil"],
                                          return_indices=True)
                    switches[node] = idx
                    return y
                return F.max_pool2d(args[0], w["k"], w["s"], w["p"], w["d"], ceil_mode=w["ceil"])
            if k == "bn":
                m = op.module
                return F.batch_norm(args[0], m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
            if k == "skip" and (op.module is None or isinstance(op.module, DROPOUT + (nn.Identity,))) \
                    and node.target not in (F.local_response_norm,) and node.op != "call_method":
                return args[0]
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            if ops.module_inplace(m) and args and isinstance(args[0], Tensor):
                args = (args[0].clone(),) + tuple(args[1:])
            return m(*args, **kwargs)
        target, kw = ops.out_of_place(node)
        kw = {**kwargs, **{k: v for k, v in kw.items() if k == "inplace"}}
        if node.op == "call_method":
            return getattr(args[0], target)(*args[1:], **kw)
        return target(*args, **kw)

    # ------------------------------------------------------------------------ backward
    def backward(self, env: Dict[Node, Any], switches: Dict[Node, Tensor], target: Node, seed: Tensor,
                 n_idx: Tensor, rule: Rule) -> Tensor:
        """Carry ``seed`` [M, ...] (a signal at ``target``'s output for M units; unit m belongs to
        image ``n_idx[m]`` of the recorded batch) down to the input: [M, C, H, W]."""
        grads: Dict[Node, Any] = {target: seed}
        owned: Dict[Node, bool] = {target: False}  # may the node's signal be overwritten in place?
        x0 = env[self.tg.input_node]
        for node in reversed(self.ancestors(target)):
            g = grads.pop(node, None)
            if g is None:
                continue
            if node.op == "placeholder":
                return g
            mine = owned.pop(node, False)
            for inp, gi, fresh in self._vjp(node, g, mine, env, switches, n_idx, rule, node is target):
                accumulate_grad(grads, inp, gi, owned, fresh)
        return seed.new_zeros((len(n_idx),) + tuple(x0.shape[1:]))

    def _vjp(self, node: Node, g: Any, mine: bool, env: Dict[Node, Any], switches: Dict[Node, Tensor],
             n_idx: Tensor, rule: Rule, is_target: bool) -> List[Tuple[Node, Any, bool]]:
        """The signals [(input node, signal, fresh)] that ``node``'s backward sends to its inputs;
        ``fresh``: the signal is the backward's own (``mine`` says the same of ``g``)."""
        op = self.ops[node]
        k = op.kind
        ins = self.node_inputs[node]
        if k == "relu":
            x = env[ins[0]][n_idx] if rule is not Rule.DECONVNET or op.unit.kind in ("leaky", "prelu") else None
            return [(ins[0], relu_rule(op.unit, g, x, rule, prelu_slope(op, node, env, g.dim()), inplace=mine), True)]
        if k == "conv":
            m, w = op.module, op.win
            xs = env[ins[0]].shape
            out_pad = tuple(xs[2 + a] - ((g.shape[2 + a] - 1) * w["s"][a] - 2 * w["p"][a]
                                         + w["d"][a] * (w["k"][a] - 1) + 1) for a in (0, 1))
            gi = conv_transpose(g, self.conv_weight(node, g.dtype, not is_target), stride=w["s"],
                                padding=w["p"], output_padding=out_pad, groups=m.groups, dilation=w["d"])
            return [(ins[0], gi, True)]
        if k == "maxpool":
            x = env[ins[0]]
            M, C = g.shape[:2]
            idx = switches[node][n_idx].reshape(M, C, -1)
            out = g.new_zeros((M, C, x.shape[-2] * x.shape[-1]))
            out.scatter_add_(2, idx, g.reshape(M, C, -1))
            return [(ins[0], out.view(M, C, *x.shape[-2:]), True)]
        if k == "bn":
            if node in self.folded_bn:  # its scale is in the conv below (conv_weight)
                return [(ins[0], g, mine)]
            scale = bn_scale(op.module).to(g.dtype).view((1, -1) + (1,) * (g.dim() - 2))
            return [(ins[0], g.mul_(scale) if mine else g * scale, True)]
        if k == "skip":
            return [(ins[0], g, mine)]
        if k == "linear":
            return [(ins[0], g @ op.module.weight.to(g.dtype), True)]
        if k == "reshape":
            x = env[ins[0]]
            if isinstance(x, Tensor) and env[node].shape[0] == x.shape[0]:
                return [(ins[0], g.reshape((g.shape[0],) + tuple(x.shape[1:])), mine)]
        if k in ("add", "sub") and len(node.args) == 2:
            out = []
            for pos, a in enumerate(node.args):
                if isinstance(a, Node) and a in self.tg.signal:
                    gi = -g if (k == "sub" and pos == 1) else g
                    out.append((a, reduce_to(gi, (g.shape[0],) + tuple(env[a].shape[1:])), False))
            return out
        if k == "mul" and len(node.args) == 2:
            out = []
            for pos, a in enumerate(node.args):
                if isinstance(a, Node) and a in self.tg.signal:
                    other = node.args[1 - pos]
                    val = env[other] if isinstance(other, Node) else other
                    if isinstance(other, Node) and other in self.tg.signal:
                        val = val[n_idx]
                    gi = g * val
                    out.append((a, reduce_to(gi, (g.shape[0],) + tuple(env[a].shape[1:])), True))
            return out
        if k == "cat":
            tensors = node.args[0]
            dim = ops.node_arg(node, 1, "dim", 0)
            if dim % g.dim() == 0:
                raise DeconvisError(
                    f"{self.tg.row_names[node]!r} concatenates along the batch dimension (dim 0), which mixes "
                    "images; the mirror projects each unit on its own image, so it cannot run back through "
                    f"it. Fix: mine a layer before {self.tg.row_names[node]!r}, or concatenate along the "
                    "channels (dim 1).")
            sizes = [env[t].shape[dim] if isinstance(t, Node) else t.shape[dim] for t in tensors]
            parts = torch.split(g, sizes, dim=dim)  # disjoint views: each as much ours as g is
            return [(t, p, mine) for t, p in zip(tensors, parts) if isinstance(t, Node) and t in self.tg.signal]
        return [(a, gi, False) for a, gi in self._generic_vjp(node, g, env, n_idx)]

    def _generic_vjp(self, node: Node, g: Any, env: Dict[Node, Any], n_idx: Tensor) -> List[Tuple[Node, Any]]:
        """Exact local derivative of one op at its recorded inputs, by autograd on that op alone."""
        M = len(n_idx)
        leaves: Dict[Node, Tensor] = {}
        aux: Dict[Node, Any] = {}

        def value(a: Node) -> Any:
            if a in self.tg.signal:
                if a not in leaves:
                    v = env[a]
                    if isinstance(v, Tensor):
                        leaves[a] = v[n_idx].detach().requires_grad_(v.is_floating_point())
                    else:  # tuple output (chunk/split): gather each element
                        leaves[a] = tuple(t[n_idx].detach().requires_grad_(True) for t in v)
                return leaves[a]
            return self.aux_value(a, env, M, aux)

        args = torch.fx.node.map_arg(node.args, value)
        kwargs = torch.fx.node.map_arg(node.kwargs, value)
        with torch.enable_grad():
            out = self.forward_node(node, args, kwargs, record=False, switches={})
            outs, gs = grad_pairs(out, g)
            flat: List[Tensor] = []
            owners: List[Tuple[Node, Optional[int]]] = []
            for a, leaf in leaves.items():
                if isinstance(leaf, tuple):
                    for i, t in enumerate(leaf):
                        flat.append(t)
                        owners.append((a, i))
                elif leaf.requires_grad:
                    flat.append(leaf)
                    owners.append((a, None))
            if not flat or not outs:
                return []
            grads = torch.autograd.grad(outs, flat, gs, allow_unused=True)
        result: Dict[Node, Any] = {}
        for (a, i), gr in zip(owners, grads):
            if i is None:
                if gr is not None:
                    result[a] = gr
            else:
                cur = list(result.get(a, [None] * len(leaves[a])))
                cur[i] = gr
                result[a] = tuple(cur)
        return list(result.items())

    def aux_value(self, a: Node, env: Dict[Node, Any], M: int, memo: Dict[Node, Any]) -> Any:
        """A non-signal value recomputed for a batch of ``M`` (``x.size(0)`` means M, not N)."""
        if a in memo:
            return memo[a]
        if a.op == "get_attr":
            val = env[a]
        elif a.op == "placeholder" or a in self.tg.signal:
            v = env[a]
            val = torch.empty((M,) + tuple(v.shape[1:]), dtype=v.dtype, device="meta")
        elif a.op in ("call_function", "call_method") and a not in self.tg.signal and depends_on_signal(a, self.tg):
            args = torch.fx.node.map_arg(a.args, lambda n: self.aux_value(n, env, M, memo))
            kwargs = torch.fx.node.map_arg(a.kwargs, lambda n: self.aux_value(n, env, M, memo))
            if a.op == "call_method":
                val = getattr(args[0], a.target)(*args[1:], **kwargs)
            else:
                val = a.target(*args, **kwargs)
        else:
            val = env[a]
        memo[a] = val
        return val


# ------------------------------------------------------------------------------ small helpers
def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _arg_nodes(node: Node) -> List[Node]:
    found: List[Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a))
    return found


def depends_on_signal(a: Node, tg: TracedGraph) -> bool:
    """Whether fx node ``a`` depends on the traced graph's input signal (else it is a constant)."""
    seen, stack = set(), [a]
    while stack:
        n = stack.pop()
        if n in tg.signal:
            return True
        for b in _arg_nodes(n):
            if b not in seen:
                seen.add(b)
                stack.append(b)
    return False


__all__ = ["Mirror", "Op", "classify", "bn_scale", "prelu_slope", "reduce_to", "relu_rule"]
