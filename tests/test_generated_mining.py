"""Mining's streaming top-k (deconvis.mining) on generated networks (tests/netgen.py) against a
brute-force sort of all activations, with planted exact ties: repeated images (equal maxima in
different images and batches), a constant image (equal values at many positions of one map),
and ReLU zeros. Images stream in shuffled order, in batches of uneven size, with global ids."""
from __future__ import annotations

import random

import pytest
import torch

import netgen
from deconvis.mining import TopK, mine
from deconvis.mirror.deconvnet import DeconvNet
from test_mining import as_rows, oracle

DRAWS, SLOW_DRAWS = 60, 600


def tied_images(net: netgen.GenNet, rng: random.Random) -> torch.Tensor:
    """8 images [8, C, H, W]: random ones, two exact repeats of image 1, a constant image."""
    x = net.images(8, seed=net.seed)
    x[4] = x[1]
    x[6] = x[1]
    x[3] = rng.choice([0.0, 0.5, -1.0])
    return x


def check_mining(net: netgen.GenNet) -> None:
    rng = random.Random(net.seed)
    x = tied_images(net, rng)
    dn = DeconvNet(net.model)
    layers = [dn.resolve(p) for p in rng.sample(net.probes, min(4, len(net.probes)))]
    layers = list(dict.fromkeys(layers))
    ids = rng.sample(range(100, 200), len(x))          # global dataset indices, not 0..N-1
    order = list(range(len(x)))
    rng.shuffle(order)
    cuts = sorted(rng.sample(range(1, len(x)), 2))
    batches = [order[a:b] for a, b in zip([0] + cuts, cuts + [len(x)])]
    k = rng.choice([1, 3, 10])                          # 10 > 8 images: empty slots stay empty
    seen = {}
    # each image's activations once, alone: a repeated image then gets exactly equal maps (the
    # forward of one image may differ in the last bit with the size of its batch)
    alone = [dn.activations(x[i:i + 1], layers) for i in range(len(x))]

    def activations(images):
        which = [next(j for j in range(len(x)) if torch.equal(x[j], img)) for img in images]
        acts = {name: torch.cat([alone[j][name] for j in which]) for name in layers}
        for name, a in acts.items():
            seen.setdefault(name, []).append(a.clone())
        return acts

    topk = mine(activations, ((x[b], torch.tensor([ids[i] for i in b])) for b in batches), TopK(layers, k),
                progress=False)
    assert topk.seen == len(x)
    every = {name: torch.cat(parts) for name, parts in seen.items()}  # in streaming order
    pos = {img: p for p, img in enumerate(i for b in batches for i in b)}
    for name, a in every.items():  # the planted ties are exact
        assert torch.equal(a[pos[1]], a[pos[4]]) and torch.equal(a[pos[1]], a[pos[6]]), name
    every = {name: a.numpy() for name, a in every.items()}
    want = oracle(every, [ids[i] for b in batches for i in b], k)
    for name in layers:
        assert as_rows(topk, name) == want[name], f"{name} (k={k})\n{net}"


def test_topk_matches_bruteforce_on_generated_nets():
    netgen.check_nets("mining", check_mining, DRAWS)


@pytest.mark.slow
def test_topk_matches_bruteforce_on_many_generated_nets():
    netgen.check_nets("mining-slow", check_mining, SLOW_DRAWS)
