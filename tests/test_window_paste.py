"""``deconvis.mirror.window.paste`` (adding windowed maps into a larger one) against a brute-force
loop over every pixel, on random shapes and origins, including windows partly or wholly outside."""
from __future__ import annotations

import random

import torch

from deconvis.mirror.window import paste


def _brute(dst, dst_org, src, src_org, u):
    """``dst`` plus ``src`` pasted pixel by pixel, and how many units' windows miss ``dst`` wholly."""
    out, missed = dst.clone(), 0
    M, _, h, w = src.shape
    H, W = dst.shape[-2:]
    for m in range(M):
        oy = (src_org[0][0] - dst_org[0][0]) * int(u[m, 0]) + src_org[0][1] - dst_org[0][1]
        ox = (src_org[1][0] - dst_org[1][0]) * int(u[m, 1]) + src_org[1][1] - dst_org[1][1]
        missed += not (oy < H and oy + h > 0 and ox < W and ox + w > 0)
        for i in range(h):
            for j in range(w):
                if 0 <= oy + i < H and 0 <= ox + j < W:
                    out[m, :, oy + i, ox + j] += src[m, :, i, j]
    return out, missed


def test_paste_equals_a_pixel_loop_on_random_shapes_and_origins():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    kinds = {"same jumps": 0, "y jump differs": 0, "x jump differs": 0, "a window wholly outside": 0}
    for case in range(300):
        M, C = rng.randint(1, 4), rng.randint(1, 3)
        h, w, H, W = rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 9), rng.randint(1, 9)
        jumps = [[rng.randint(0, 3), rng.randint(0, 3)] for _ in range(2)]  # [axis][src, dst]
        if case % 3 == 0:
            jumps[case % 2][1] = jumps[case % 2][0]  # one axis alike
        if case % 5 == 0:
            jumps = [[j[0], j[0]] for j in jumps]  # both alike: the shared-offset path
        src_org = tuple((jumps[a][0], rng.randint(-12, 12)) for a in (0, 1))
        dst_org = tuple((jumps[a][1], rng.randint(-12, 12)) for a in (0, 1))
        if case % 7 == 0:  # jumps differ, and each dst offset happens to equal the src jump
            src_org, dst_org = ((2, 1), (3, 0)), ((0, 2), (1, 3))
            jumps = [[2, 0], [3, 1]]
        u = torch.randint(0, 5, (M, 2), generator=g)
        src = torch.randn(M, C, h, w, generator=g, dtype=torch.float64)
        dst = torch.randn(M, C, H, W, generator=g, dtype=torch.float64)  # pasting adds to what is there
        want, missed = _brute(dst, dst_org, src, src_org, u)
        paste(dst, dst_org, src, src_org, u)
        assert torch.equal(dst, want), (case, src_org, dst_org)
        same = [jumps[a][0] == jumps[a][1] for a in (0, 1)]
        kinds["same jumps"] += all(same)
        kinds["y jump differs"] += (not same[0]) and same[1]
        kinds["x jump differs"] += same[0] and not same[1]
        kinds["a window wholly outside"] += missed > 0
    assert all(kinds.values()), kinds
