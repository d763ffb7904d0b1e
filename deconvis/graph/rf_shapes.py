"""Shape propagation for the receptive-field walk: one forward pass of a zero image through the
traced graph (fake tensors first, a real image when they fail) recording every node's output shape,
with one-line DeconvisErrors for inputs too small for, or not fitting, the network.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch
import torch.fx

from deconvis.errors import DeconvisError
from deconvis.graph.ops import Pair, kind_name, window_params
from deconvis.graph.rf_geometry import conv_out_size, pool_out_size
from deconvis.graph.trace import TracedGraph
from deconvis.utils.device import model_dtype_device

class _NodeFailed(Exception):
    def __init__(self, node: torch.fx.Node, exc: BaseException):
        super().__init__(str(exc))
        self.node, self.exc = node, exc


class _TooSmall(Exception):
    def __init__(self, node: torch.fx.Node, in_hw: Pair, out_hw: Pair):
        super().__init__(f"{out_hw}")
        self.node, self.in_hw, self.out_hw = node, in_hw, out_hw


def shape_of(v: Any) -> Any:
    """A value's shape as the RF walk reads it: a tuple for a tensor, a list of tuples for a
    tuple of tensors, else None."""
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return [tuple(t.shape) for t in v]
    return None


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once, recording every node's output shape; stops early on a too-small map."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.shapes: Dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op in ("call_module", "call_function"):
            win = window_params(n, self.module, self.shapes)
            x = n.args[0] if n.args else None
            xs = self.shapes.get(x) if isinstance(x, torch.fx.Node) else None
            if win is not None and isinstance(xs, tuple) and len(xs) >= 3 and not win["same"]:
                in_hw = (int(xs[-2]), int(xs[-1]))
                fn = conv_out_size if win["conv"] else \
                    (lambda n_, k, s, p, d, c=win["ceil"]: pool_out_size(n_, k, s, p, d, c))
                out = tuple(fn(in_hw[a], win["k"][a], win["s"][a], win["p"][a], win["d"][a]) for a in (0, 1))
                if min(out) < 1:
                    raise _TooSmall(n, in_hw, (max(out[0], 0), max(out[1], 0)))
        try:
            val = super().run_node(n)
        except (DeconvisError, _TooSmall):
            raise
        except Exception as exc:
            failed = _NodeFailed(n, exc)
            failed.shapes = self.shapes  # type: ignore[attr-defined]
            raise failed from exc
        self.shapes[n] = shape_of(val)
        return val


def _run_recorder(gm: torch.fx.GraphModule, x: torch.Tensor, fake: bool) -> "_Recorder":
    rec = _Recorder(gm)
    if not fake:
        with torch.no_grad():
            rec.run(x)
        return rec
    from torch._subclasses.fake_tensor import FakeTensorMode  # start-up time: loaded only for a fake-tensor shape pass

    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)  # a failing op is retried for real below; keep its log quiet
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            rec.run(mode.from_tensor(x))
    finally:
        log.setLevel(level)
    return rec


def propagate(tg: TracedGraph, size: Pair, in_channels: int) -> Dict[torch.fx.Node, Any]:
    """Output shape of every node for one [1, in_channels, H, W] zero image (eval mode, no_grad).

    Shapes come from fake tensors (no arithmetic: instant even for VGG at 224 px); if that fails
    for any reason other than a too-small map, a real zero image is run instead."""
    model = tg.model
    dtype, device = model_dtype_device(model)
    modes = {m: m.training for m in model.modules()}
    hw = f"{size[0]}x{size[1]}"
    x = torch.zeros(1, in_channels, size[0], size[1], dtype=dtype, device=device)
    msg = None
    rec: Optional[_Recorder] = None
    try:
        model.eval()
        try:
            rec = _run_recorder(tg.graph_module, x, fake=True)
        except _TooSmall:
            raise
        except Exception:  # fake tensors unsupported here, or the forward fails: run it for real
            rec = _run_recorder(tg.graph_module, x, fake=False)
    except _TooSmall as e:
        name, kind = tg.row_names.get(e.node, e.node.name), kind_name(e.node, tg.graph_module)
        msg = (f"input {hw} is too small for {tg.model_name}: layer {name} ({kind}) would have size "
               f"{e.out_hw[0]}x{e.out_hw[1]} (its input is {e.in_hw[0]}x{e.in_hw[1]}); use a larger input size")
    except _NodeFailed as e:
        name, kind = tg.row_names.get(e.node, e.node.name), kind_name(e.node, tg.graph_module)
        first = (str(e.exc).strip().splitlines() or [""])[0]
        shapes = e.shapes if hasattr(e, "shapes") else {}
        xin = e.node.args[0] if e.node.args else None
        xs = shapes.get(xin) if isinstance(xin, torch.fx.Node) else None
        windowed = window_params(e.node, tg.graph_module, shapes) is not None
        small = "too small" in first.lower() or (windowed and "size" in first.lower())
        if small:
            seen = f"its input is {xs[-2]}x{xs[-1]}: " if isinstance(xs, tuple) and len(xs) >= 3 else ""
            msg = (f"input {hw} is too small for {tg.model_name}: layer {name} ({kind}) would have size < 1 "
                   f"({seen}{type(e.exc).__name__}: {first}); use a larger input size")
        else:
            msg = (f"input {hw} with {in_channels} channels does not fit {tg.model_name}: layer {name} ({kind}) "
                   f"failed ({type(e.exc).__name__}: {first}); use the input size and channels the model was built for")
    finally:
        for m, training in modes.items():
            m.training = training
    if msg is not None:
        raise DeconvisError(msg)
    assert rec is not None
    return rec.shapes
