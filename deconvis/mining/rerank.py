"""Re-rank a candidate pool mined under autocast by full-precision activations.

Under ``--amp fp16``/``bf16`` many activations round to the same number (on 100k values in
[5, 50], the top 9 tie 40 ways in fp16, ~300 ways in bf16) and ties go to early images, so the
low-precision ranking is not the one fp32 would give. The fix in two steps:

1. mine a pool of ``k x factor`` candidates per channel under autocast (a plain
   :class:`~deconvis.mining.TopK` with a larger k and ``inf_wins``: an fp16 overflow, ``+inf``,
   enters the pool as the largest value, so its image is re-ranked by its true value);
2. forward the pool's distinct images again in full precision and keep, per channel, the k best
   *among that channel's candidates* (:class:`PoolTopK`: an image outside a channel's pool cannot
   compete there), with the same total order as mining (value desc, image asc, first position).

The result equals a brute-force full-precision top-k over the candidates (tests check exactly
that). Whether the pool was large enough is estimated per channel (:func:`uncertain_channels`):
an image outside the pool had an autocast value at most the pool's last one, so it could only
have won if that value, within the autocast error, reaches the k-th full-precision winner. A
pool whose last candidate overflowed (``+inf``: more images overflowed than the pool holds, and
their order among themselves is arbitrary) is always in doubt.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from deconvis.mining.mine import EMPTY, TopK

#: relative error assumed for an activation computed under autocast in this dtype (rounding of
#: inputs and weights, ~2^-8 for bf16 and ~2^-11 for fp16 per op, grown over a few layers)
AMP_RTOL: Dict[torch.dtype, float] = {torch.bfloat16: 0.05, torch.float16: 0.01}


def pool_size(k: int, factor: int) -> int:
    """Candidates per channel mined under autocast: ``k * factor`` (``k`` for factor 0 or 1)."""
    return int(k * max(1, factor))


class PoolTopK(TopK):
    """A :class:`TopK` in which image ``i`` competes in channel ``c`` only when it is among that
    channel's candidates in ``pool`` (``pool.state[layer]["images"]`` ``[C, P]``). It collects no
    unit statistics (it sees only candidates; :func:`finish` keeps the pool's)."""

    collect_stats = False

    def __init__(self, pool: TopK, k: int):
        super().__init__(pool.layers, k, pool.device)
        self.pools: Dict[str, Tensor] = {layer: st["images"].to(pool.device) for layer, st in pool.state.items()}

    def eligible(self, layer: str, image_ids: Tensor) -> Optional[Tensor]:
        cand = self.pools.get(layer)
        if cand is None:
            return torch.zeros(image_ids.shape[0], 0, dtype=torch.bool, device=self.device)
        ids = image_ids.to(cand.device)
        return (ids[:, None, None] == cand[None]).any(-1)  # [N, C]; EMPTY never matches a real image


def candidate_images(pool: TopK) -> List[int]:
    """The distinct images of every channel's pool, ascending (one host sync per layer)."""
    seen: set = set()
    for st in pool.state.values():
        imgs = torch.unique(st["images"]).cpu().tolist()
        seen.update(int(i) for i in imgs if int(i) != EMPTY)
    return sorted(seen)


def finish(ranked: TopK, pool: TopK) -> TopK:
    """Give the re-ranked state the pool's bookkeeping: items seen, unreadable images, and the
    non-finite counts, unit statistics and class sums of the autocast pass (where overflow happens), and
    its bottom-k (ranked by the autocast values: the re-rank covers the top-k only). Returns ``ranked``."""
    ranked.seen, ranked.skipped = pool.seen, list(pool.skipped)
    ranked.nonfinite = dict(pool.nonfinite)
    ranked.nonfinite_first = dict(pool.nonfinite_first)
    ranked.stats = dict(pool.stats)
    ranked.classes = dict(pool.classes)
    ranked.bottom, ranked.bottom_of = pool.bottom, dict(pool.bottom_of)  # the minima keep the autocast ranking
    return ranked


def uncertain_mask(pool: TopK, ranked: TopK, rtol: float) -> Dict[str, Tensor]:
    """Per layer, a bool [C] of the channels whose pool may have been too small: the pool is full
    and its last autocast value ``v`` satisfies ``v + rtol*|v| >= `` the k-th re-ranked value (an
    image outside the pool could then have beaten a winner in full precision). A pool that holds
    every readable image leaves no doubt."""
    if pool.seen - len(pool.skipped) <= pool.k:
        return {layer: torch.zeros(st["images"].shape[0], dtype=torch.bool, device=st["images"].device)
                for layer, st in pool.state.items()}
    out: Dict[str, Tensor] = {}
    for layer, st in pool.state.items():
        if layer not in ranked.state:
            continue
        last_v, last_i = st["values"][:, -1], st["images"][:, -1]
        kth = ranked.state[layer]["values"][:, -1]
        full = last_i != EMPTY
        out[layer] = full & ((last_v + rtol * last_v.abs()) >= kth.to(last_v.dtype))  # +inf: always in doubt
    return out


def uncertain_channels(pool: TopK, ranked: TopK, rtol: float) -> Dict[str, int]:
    """Per layer, how many channels :func:`uncertain_mask` marks."""
    return {layer: int(m.sum()) for layer, m in uncertain_mask(pool, ranked, rtol).items()}
