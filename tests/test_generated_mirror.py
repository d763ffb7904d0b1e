"""The mirror (DeconvNet.project) on generated networks (tests/netgen.py), float64, all three
rules, against the independent autograd oracle (tests/autograd_oracle.py): the model's own eval
forward with the ReLU-family backward swapped, one torch.autograd.grad from the seed."""
from __future__ import annotations

import random

import pytest
import torch

import netgen
from autograd_oracle import graph_oracle_project
from deconvis.mirror.deconvnet import DeconvNet

RULES = ("deconvnet", "guided", "gradient")
DRAWS, SLOW_DRAWS = 60, 600


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = max(float(want.abs().max()), float(got.abs().max()), 1e-300)
    return float((got - want).abs().max()) / scale


def pick_units(act: torch.Tensor, n: int, rng: random.Random) -> torch.Tensor:
    """``n`` units (image, channel, y, x) of ``act`` with a non-zero activation (any when none)."""
    a = act if act.dim() == 4 else act[:, :, None, None]
    idx = (a != 0).nonzero()
    if len(idx) == 0:
        idx = torch.cartesian_prod(*[torch.arange(s) for s in a.shape])
    return idx[sorted(rng.sample(range(len(idx)), min(n, len(idx))))]


def probe_layers(net: netgen.GenNet, rng: random.Random, n: int = 3):
    """The deepest probe (it sees every op) and ``n - 1`` others at random."""
    probes = net.probes
    return sorted(set([probes[-1]] + rng.sample(probes, min(n - 1, len(probes)))), key=probes.index)


def check_mirror(net: netgen.GenNet) -> None:
    rng = random.Random(net.seed)
    x = net.images(2, seed=net.seed)
    dn = DeconvNet(net.model)
    acts = dn.forward(x)
    for layer in probe_layers(net, rng):
        units = pick_units(acts[dn.resolve(layer)], 3, rng)
        for rule in RULES:
            got = dn.project(layer, units, rule=rule)
            want = graph_oracle_project(net.model, x, layer, units, rule)
            assert got.shape == want.shape
            err = rel_err(got, want)
            assert err <= 1e-10, f"{layer} {rule}: relative error {err:.3g}\n{net}"


def test_mirror_matches_oracle_on_generated_nets():
    netgen.check_nets("mirror", check_mirror, DRAWS)


@pytest.mark.slow
def test_mirror_matches_oracle_on_many_generated_nets():
    netgen.check_nets("mirror-slow", check_mirror, SLOW_DRAWS)
