"""Incremental occlusion on generated networks (tests/netgen.py), float64: maps (b), (d) and (e)
of :func:`deconvis.analysis.occlusion.occlusion` against a plain forward of every occluded copy,
at a random layer, occluder (often not square), stride and fill per net."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

import netgen
from deconvis.analysis.occlusion import occlusion

DRAWS, SLOW_DRAWS = 50, 500
FILLS = ("mean", "zero", "number")


def reference_fill(x: torch.Tensor, kind: str, rng: random.Random):
    """(spec for the API, the occluder's value per channel [C] computed here)."""
    C, H, W = x.shape[-3:]
    if kind == "mean":
        return "mean", x.reshape(C, H * W).sum(1) / (H * W)
    if kind == "zero":
        return "zero", torch.zeros(C, dtype=x.dtype)
    v = round(rng.uniform(-2.0, 2.0), 3)
    return v, torch.full((C,), v, dtype=x.dtype)


def draw_occluder(H: int, W: int, rng: random.Random):
    """A square or rectangle (h, w) and a stride (sy, sx) giving at most about 8 x 8 positions."""
    h = rng.randint(1, H)
    w = h if rng.random() < 0.3 and h <= W else rng.randint(1, W)
    sy = rng.randint(max(1, (H - h) // 7), max(1, H - h))
    sx = rng.randint(max(1, (W - w) // 7), max(1, W - w))
    return (h, w), (sy, sx)


def naive_maps(model, x, tops, size, fill, module):
    """Every occluded copy through the plain eval forward: (logits [P, K], maps of ``module`` [P, C, ...])."""
    store = {}
    hook = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.clone()))  # before in-place ops
    try:
        xo = x.repeat(len(tops), 1, 1, 1)
        for b, (y, x0) in enumerate(tops):
            xo[b, :, y:y + size[0], x0:x0 + size[1]] = fill[:, None, None]
        with torch.no_grad():
            logits = model(xo)
        return logits.reshape(len(tops), -1), store["a"]
    finally:
        hook.remove()


def check_occlusion(net: netgen.GenNet) -> None:
    rng = random.Random(net.seed)
    x = net.images(1, seed=net.seed)
    model = net.model
    H, W = net.size
    # the layer of map (b): a module with a spatial map, at random
    store = {}
    hooks = [model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: store.__setitem__(p, o.clone()))
             for p in net.probes]
    with torch.no_grad():
        clean_logits = model(x).reshape(1, -1)
    for h in hooks:
        h.remove()
    spatial = [p for p in net.probes if isinstance(store.get(p), torch.Tensor) and store[p].dim() == 4]
    layer = rng.choice(spatial)
    size, stride = draw_occluder(H, W, rng)
    spec, fill = reference_fill(x, rng.choice(FILLS), rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ops run in full are listed, not an error
        res = occlusion(model, x, layer=layer, size=size, stride=stride, fill=spec, batch_size=rng.randint(1, 40))
    ys = list(range(0, H - size[0] + 1, stride[0]))
    xs = list(range(0, W - size[1] + 1, stride[1]))
    assert res.tops_y == ys and res.tops_x == xs
    np.testing.assert_allclose(res.fill_value, fill.numpy(), rtol=1e-12, atol=1e-15)
    tops = [(y, x0) for y in ys for x0 in xs]
    logits, maps = naive_maps(model, x, tops, size, fill, model.get_submodule(layer))
    shape = (len(ys), len(xs))
    what = f"layer {layer}, occluder {size} stride {stride} fill {spec}\n{net}"
    # (b): the map holding the largest single clean activation, summed over space
    a0 = store[layer][0]
    ch = int(a0.reshape(a0.shape[0], -1).amax(1).argmax())
    assert res.channel == ch, what
    terms = maps[:, ch].reshape(len(tops), -1)
    want_b = terms.sum(1).reshape(shape).numpy()
    scale = max(float(terms.abs().sum(1).max()), 1e-300)  # round-off scale of the sums
    assert float(np.abs(res.activation - want_b).max()) <= 1e-10 * scale, what
    # (d): probability of the clean top class; (e): the most probable class and its probability
    probs = torch.softmax(logits, -1)
    target = int(clean_logits.argmax())
    assert res.target == target, what
    np.testing.assert_allclose(res.probability, probs[:, target].reshape(shape).numpy(), rtol=1e-9, atol=1e-13,
                               err_msg=what)
    np.testing.assert_allclose(res.top_probability, probs.max(-1).values.reshape(shape).numpy(), rtol=1e-9,
                               atol=1e-13, err_msg=what)
    top2 = probs.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1] > 1e-9).reshape(shape).numpy()  # exact ties may go either way
    np.testing.assert_array_equal(res.top_class[clear], probs.argmax(-1).reshape(shape).numpy()[clear],
                                  err_msg=what)


def test_occlusion_equals_naive_on_generated_nets():
    netgen.check_nets("occlusion", check_occlusion, DRAWS, strategy=netgen.nets(head=True))


@pytest.mark.slow
def test_occlusion_equals_naive_on_many_generated_nets():
    netgen.check_nets("occlusion-slow", check_occlusion, SLOW_DRAWS, strategy=netgen.nets(head=True))
