"""AMP candidate pools re-ranked in fp32, against a brute-force fp32 top-k (tests/test_mining.oracle)."""
from __future__ import annotations

import pytest
import torch

from deconvis.mining import TopK, mine
from deconvis.mining.rerank import (AMP_RTOL, PoolTopK, candidate_images, finish, pool_size, uncertain_channels,
                                   uncertain_mask)
from test_mining import as_rows, oracle


def _acts(n: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"a": 5 + 45 * torch.rand(n, 4, 3, 3, generator=g), "b": 5 + 45 * torch.rand(n, 3, 2, 2, generator=g)}


def _stream(topk, acts, ids, batch=7):
    for s in range(0, len(ids), batch):
        sel = torch.tensor(ids[s:s + batch])
        topk.update({name: a[sel] for name, a in acts.items()}, sel)
    return topk


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_rerank_equals_bruteforce_fp32_over_the_candidates(half):
    k, factor, n = 3, 4, 60
    full = _acts(n)
    amp = {name: a.to(half) for name, a in full.items()}
    pool = _stream(TopK(list(full), pool_size(k, factor)), amp, list(range(n)))
    cands = candidate_images(pool)
    assert cands == sorted(set(cands)) and len(cands) < n
    ranked = finish(_stream(PoolTopK(pool, k), full, cands, batch=5), pool)
    assert ranked.seen == pool.seen
    for layer, a in full.items():
        w = pool.winners(layer)
        want = []
        for c in range(a.shape[1]):  # brute force: the fp32 oracle restricted to channel c's candidates
            members = sorted(int(i) for i in w["images"][c][w["valid"][c]])
            want.append(oracle({layer: a[members][:, c:c + 1].numpy()}, members, k)[layer][0])
        got = [[(v, i, y, x) for (v, i, y, x) in row] for row in as_rows(ranked, layer)]
        assert got == want, layer
        # every channel whose pool is certain equals the global fp32 top-k
        doubt = uncertain_mask(pool, ranked, AMP_RTOL[half])[layer]
        assert doubt.shape == (a.shape[1],) and uncertain_channels(pool, ranked, AMP_RTOL[half])[layer] == int(doubt.sum())
        glob = oracle({layer: a.numpy()}, range(n), k)[layer]
        checked = [c for c in range(a.shape[1]) if not doubt[c]]
        assert checked  # not vacuous
        for c in checked:
            assert got[c] == glob[c], (layer, c)
    # the fp32 winners differ from the autocast ranking's first k somewhere (the test is not vacuous)
    assert any([[r[1] for r in row] for row in as_rows(ranked, layer)]
               != [[r[1] for r in row[:k]] for row in as_rows(pool, layer)] for layer in full)


def test_amp_ties_are_resolved_by_fp32_values():
    """Where autocast ties (values rounded equal), the fp32 re-rank orders by the true values,
    not by image index as the autocast ranking does."""
    full = {"l": torch.tensor([[40.01], [40.02], [40.03], [40.04]]).reshape(4, 1, 1, 1)}
    amp = {"l": full["l"].to(torch.bfloat16)}
    pool = _stream(TopK(["l"], 4), amp, [0, 1, 2, 3])
    assert [r[1] for r in as_rows(pool, "l")[0]] == [0, 1, 2, 3]  # all equal in bf16: image order
    ranked = _stream(PoolTopK(pool, 2), full, candidate_images(pool))
    assert [r[1] for r in as_rows(ranked, "l")[0]] == [3, 2]


def test_rerank_through_mine_with_a_loader_of_candidates():
    full = _acts(30, seed=2)
    pool = _stream(TopK(list(full), 6), {n: a.to(torch.float16) for n, a in full.items()}, list(range(30)))
    cands = candidate_images(pool)
    batches = [(torch.stack([torch.tensor(float(i))] * 1), torch.tensor([i])) for i in cands]
    ranked = mine(lambda x: {n: a[x.long()] for n, a in full.items()}, batches, PoolTopK(pool, 2), progress=False)
    ref = _stream(PoolTopK(pool, 2), full, cands)
    for layer in full:
        assert as_rows(ranked, layer) == as_rows(ref, layer)


def test_rerank_split_over_ranks_equals_one_process(tmp_path):
    """The pipeline's re-rank: each rank forwards its share of the candidate images in fp32; the
    merged parts equal one process re-ranking them all (no process group needed to check it)."""
    import dataclasses

    import pipeline_fixtures as fx
    from deconvis.mining.rerank import PoolTopK
    from deconvis.runs import pipeline, precision
    from deconvis.io.images import ImageDataset, make_loader
    from deconvis.runs.distributed import DistInfo

    cfg = fx.tiny_config(tmp_path, amp="bf16", amp_pool=2, k=2)
    ctx = pipeline.prepare(cfg, str(tmp_path / "run"))
    pool = TopK(ctx.layers, precision.mining_k(cfg))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine(lambda x: ctx.dn.activations(x, ctx.layers), make_loader(ImageDataset(ctx.source, ctx.preprocess), 4),
             pool, progress=False)
    one = precision.rerank_part(ctx, pool)
    parts = [precision.rerank_part(dataclasses.replace(ctx, info=DistInfo(rank=r, world=2)), pool) for r in range(2)]
    assert all(isinstance(p, PoolTopK) for p in parts) and 0 < parts[1].seen < one.seen
    merged = TopK(ctx.layers, cfg.k).merge(parts[0]).merge(parts[1])
    ranked, _ = precision.rerank_finish(ctx, merged, pool)
    for layer in ctx.layers:
        assert as_rows(ranked, layer) == as_rows(one, layer)
    assert ranked.seen == pool.seen == 12


def test_pool_size_and_finish_keep_the_pool_bookkeeping():
    """``k * factor`` candidates (``k`` for factor 0 or 1); the re-ranked state takes the pool's
    items seen, unreadable images and non-finite counts (where autocast overflows), as copies."""
    assert [pool_size(3, f) for f in (0, 1, 2, 4)] == [3, 3, 6, 12]
    full = _acts(12)
    full["a"][4, 1] = float("inf")  # image 4's channel 1 is not finite under autocast
    pool = _stream(TopK(list(full), 6), {n: a.to(torch.bfloat16) for n, a in full.items()}, list(range(12)))
    pool.skipped = [7]
    ranked = finish(TopK(list(full), 3), pool)
    assert ranked.seen == pool.seen and ranked.skipped == [7] and ranked.skipped is not pool.skipped
    assert set(ranked.nonfinite) == set(pool.nonfinite) and ranked.nonfinite is not pool.nonfinite
    assert int(ranked.nonfinite["a"][1]) == 1 and int(ranked.nonfinite_first["a"][1]) == 4
    assert ranked.nonfinite_first is not pool.nonfinite_first
    # the unit statistics are the autocast pass's (the re-rank sees only candidates)
    assert set(ranked.stats) == set(full) and all(ranked.stats[n] is pool.stats[n] for n in full)
    assert ranked.stats is not pool.stats


def test_fp16_overflow_competes_in_the_pool_and_is_re_ranked_by_its_fp32_value():
    """Under fp16 an activation above 65504 is +inf: in a pool that will be re-ranked it competes
    as the largest value (NaN never does), so the fp32 re-rank picks that image when it truly
    wins; when more images overflow than the pool holds, the channel is flagged uncertain."""
    g = torch.Generator().manual_seed(3)
    full = {"l": 5 + 45 * torch.rand(20, 2, 2, 2, generator=g)}
    full["l"][6, 0, 1, 0] = 70000.0  # the true winner of channel 0 overflows in fp16
    full["l"][11, 1] = float("nan")  # NaN: never a candidate
    amp = {"l": full["l"].to(torch.float16)}
    assert torch.isposinf(amp["l"][6, 0]).any()
    k, pool_k = 2, 4
    pool = _stream(TopK(["l"], pool_k, inf_wins=True), amp, list(range(20)))
    pool.seen = 20  # (update() does not count items; mine() does)
    assert 6 in as_rows(pool, "l")[0][0] and 11 not in [r[1] for r in as_rows(pool, "l")[1]]
    ranked = finish(_stream(PoolTopK(pool, k), full, candidate_images(pool)), pool)
    want = oracle({"l": torch.nan_to_num(full["l"], nan=-1.0).numpy()}, range(20), k)["l"]
    assert [r[1] for r in as_rows(ranked, "l")[0]] == [r[1] for r in want[0]] and as_rows(ranked, "l")[0][0][1] == 6
    assert as_rows(ranked, "l")[0][0][0] == pytest.approx(70000.0)
    assert uncertain_channels(pool, ranked, AMP_RTOL[torch.float16])["l"] == 0  # one overflow fits the pool
    # six images overflow in channel 1, the pool holds four: their fp16 order is arbitrary -> doubt
    many = full["l"].clone()
    many[:6, 1, 0, 0] = 70000.0 + torch.arange(6.0)
    pool = _stream(TopK(["l"], pool_k, inf_wins=True), {"l": many.to(torch.float16)}, list(range(20)))
    pool.seen = 20
    ranked = finish(_stream(PoolTopK(pool, k), {"l": many}, candidate_images(pool)), pool)
    assert uncertain_channels(pool, ranked, AMP_RTOL[torch.float16])["l"] == 1


def test_an_image_outside_a_channels_pool_cannot_win_there():
    """Images 0 and 1 each enter one channel's pool under autocast; in fp32 each is far stronger
    in the other channel, where it was no candidate: the re-rank must still keep it out."""
    amp = {"l": torch.tensor([[10.0, 5.0], [5.0, 10.0]]).reshape(2, 2, 1, 1)}
    full = {"l": torch.tensor([[10.0, 50.0], [50.0, 10.0]], dtype=torch.float64).reshape(2, 2, 1, 1)}
    pool = _stream(TopK(["l"], 1), amp, [0, 1])
    assert pool.winners("l")["images"][:, 0].tolist() == [0, 1]
    ranked = _stream(PoolTopK(pool, 1), full, candidate_images(pool))
    assert ranked.winners("l")["images"][:, 0].tolist() == [0, 1]
    assert ranked.winners("l")["values"][:, 0].tolist() == [10.0, 10.0]


def test_a_pool_holding_every_readable_image_leaves_no_doubt():
    """Four items, one unreadable, a pool of three: it holds every readable image, so no channel
    is in doubt, though its values tie (with a fourth readable image the same ties are doubt)."""
    amp = {"l": torch.full((4, 2, 1, 1), 10.0)}
    full = {"l": amp["l"].double()}
    for readable, doubt in (([0, 1, 2], False), ([0, 1, 2, 3], True)):
        pool = _stream(TopK(["l"], 3), amp, readable)
        pool.seen, pool.skipped = 4, [i for i in range(4) if i not in readable]
        ranked = _stream(PoolTopK(pool, 1), full, candidate_images(pool))
        mask = uncertain_mask(pool, ranked, AMP_RTOL[torch.bfloat16])["l"]
        assert mask.dtype == torch.bool and mask.tolist() == [doubt, doubt]
        # with rtol 0 a candidate left out that ties the k-th winner is still doubt
        assert uncertain_mask(pool, ranked, 0.0)["l"].tolist() == [doubt, doubt]


def test_doubt_is_the_last_candidate_within_rtol_of_the_kth_re_ranked_value():
    """Pool of 4, k = 3, rtol 5 %: in channel 0 the 4th candidate (9.9) comes within 5 % of the
    3rd winner (10), in channel 1 the 4th (1) does not reach the 3rd (14.9); brute force from the
    definition. A layer that was not re-ranked gets no row, and the next layer still does."""
    v = torch.tensor([[20, 20], [15, 15], [10, 14.9], [9.9, 1], [1, 0.5], [0.5, 0.25]], dtype=torch.float64)
    acts = {"a": v[:, :, None, None], "b": v[:, :, None, None]}
    pool = _stream(TopK(["a", "b"], 4), acts, list(range(6)))
    pool.seen = 6
    cands = torch.tensor(candidate_images(pool))
    ranked = PoolTopK(pool, 3)
    ranked.update_layer("b", acts["b"][cands], cands, ranked.eligible("b", cands))
    mask = uncertain_mask(pool, ranked, 0.05)
    want = []
    for c in range(2):
        col = sorted(v[:, c].tolist(), reverse=True)
        last, kth = col[3], sorted(col[:4], reverse=True)[2]
        want.append(last + 0.05 * abs(last) >= kth)
    assert want == [True, False] and list(mask) == ["b"] and mask["b"].tolist() == want
