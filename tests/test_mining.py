"""Streaming top-k mining against a brute-force oracle (sort everything in Python)."""
from __future__ import annotations

import io
import math
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from deconvis.errors import DeconvisError
from deconvis.mining import EMPTY, TopK, channel_maxima, hooked_activations, mine


def oracle(acts: dict, ids, k: int) -> dict:
    """Per layer and channel, the k best (value, image, y, x) by brute force in plain Python:
    per image the max over positions (first in row-major order), then sort by (-value, image)."""
    out = {}
    for layer, a in acts.items():
        a = np.asarray(a, dtype=np.float64)
        if a.ndim == 2:
            a = a[:, :, None, None]
        n, c, h, w = a.shape
        rows = []
        for ch in range(c):
            cands = []
            for i in range(n):
                best, by, bx = -math.inf, 0, 0
                for y in range(h):
                    for x in range(w):
                        v = a[i, ch, y, x]
                        if math.isnan(v):
                            continue  # handled below
                        if v > best:
                            best, by, bx = v, y, x
                if np.isnan(a[i, ch]).any() or not math.isfinite(best):  # NaN/+inf: no candidate
                    continue
                cands.append((best, int(ids[i]), by, bx))
            cands.sort(key=lambda t: (-t[0], t[1]))
            rows.append(cands[:k])
        out[layer] = rows
    return out


def as_rows(topk: TopK, layer: str, check_pos: bool = True):
    w = topk.winners(layer)
    rows = []
    for ch in range(w["values"].shape[0]):
        row = []
        for r in range(topk.k):
            if not w["valid"][ch, r]:
                continue
            row.append((float(w["values"][ch, r]), int(w["images"][ch, r]),
                        int(w["ys"][ch, r]), int(w["xs"][ch, r])))
        rows.append(row)
    return rows


def run_stream(acts: dict, k: int, batch: int, order=None, ids=None) -> TopK:
    n = next(iter(acts.values())).shape[0]
    ids = torch.arange(n) if ids is None else torch.as_tensor(ids)
    order = list(range(n)) if order is None else order
    topk = TopK(list(acts), k)
    for s in range(0, len(order), batch):
        sel = torch.tensor(order[s:s + batch])
        topk.update({name: a[sel] for name, a in acts.items()}, ids[sel])
    return topk


def tie_heavy_acts(seed: int, n: int = 13) -> dict:
    """Small-integer maps: many equal values across images and within an image; some images
    repeat exactly (whole-image ties)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 4, (n, 5, 3, 4), generator=g).to(torch.float64)
    a[7] = a[2]            # a repeated image
    a[11] = a[2]
    a[4] = 1.0             # a constant image: ties at every position -> (0, 0)
    b = torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)
    b[9] = b[3]
    fc = torch.randint(0, 3, (n, 6), generator=g).to(torch.float64)  # a [N, C] layer
    return {"conv_a": a, "conv_b": b, "fc": fc}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 4, 13])
@pytest.mark.parametrize("k", [1, 3, 20])
def test_stream_matches_bruteforce_with_ties(seed, batch, k):
    acts = tie_heavy_acts(seed)
    topk = run_stream(acts, k, batch)
    want = oracle({n: a.numpy() for n, a in acts.items()}, range(13), k)
    for layer in acts:
        assert as_rows(topk, layer) == want[layer], layer


def test_known_tie_breaks():
    a = torch.zeros(4, 1, 2, 3, dtype=torch.float64)
    a[1, 0, 1, 2] = 5.0
    a[3, 0] = 5.0          # every position ties -> first in row-major order (0, 0)
    a[2, 0, 0, 1] = 5.0
    a[2, 0, 1, 0] = 5.0    # two maxima -> (0, 1)
    topk = run_stream({"l": a}, k=4, batch=2, order=[3, 2, 1, 0])
    assert as_rows(topk, "l")[0] == [(5.0, 1, 1, 2), (5.0, 2, 0, 1), (5.0, 3, 0, 0), (0.0, 0, 0, 0)]


def test_order_of_images_does_not_matter():
    acts = tie_heavy_acts(5)
    ref = run_stream(acts, 3, 5)
    perm = list(range(13))
    random.Random(3).shuffle(perm)
    got = run_stream(acts, 3, 3, order=perm)
    for layer in acts:
        assert as_rows(got, layer) == as_rows(ref, layer)


def test_fewer_images_than_k_leaves_empty_slots():
    acts = {"l": torch.randn(2, 3, 2, 2, dtype=torch.float64)}
    topk = run_stream(acts, k=5, batch=1)
    w = topk.winners("l")
    assert w["valid"].sum(1).tolist() == [2, 2, 2]
    assert (w["images"][~w["valid"]] == EMPTY).all()
    assert as_rows(topk, "l") == oracle({"l": acts["l"].numpy()}, range(2), 5)["l"]


def test_nan_and_inf_never_win_and_are_counted():
    a = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    a[1, 0, 1, 1] = float("nan")
    a[2, 0, 0, 0] = float("inf")
    a[3, 1, 0, 0] = float("-inf")  # one -inf among finite values: the finite maximum counts
    topk = run_stream({"l": a}, k=5, batch=2)
    rows = as_rows(topk, "l")
    assert [r[1] for r in rows[0]] == sorted([0, 3, 4], key=lambda i: -float(a[i, 0].max()))
    assert all(math.isfinite(r[0]) for row in rows for r in row)
    assert rows == oracle({"l": a.numpy()}, range(5), 5)["l"]
    assert topk.nonfinite["l"].tolist() == [2, 0]
    assert topk.nonfinite_first["l"].tolist() == [1, EMPTY]
    back = TopK.from_state_dict(torch.load(_roundtrip(topk.state_dict()), weights_only=True))
    assert back.nonfinite["l"].tolist() == [2, 0]


@pytest.mark.parametrize("seed", [0, 1])
def test_merge_of_shards_equals_single_pass(seed):
    acts = tie_heavy_acts(seed, n=17)
    n = 17
    ids = list(range(n))
    random.Random(seed).shuffle(ids)
    shard_a, shard_b = sorted(ids[:8]), sorted(ids[8:])
    single = run_stream(acts, 4, 5)
    a = run_stream(acts, 4, 3, order=shard_a)
    b = run_stream(acts, 4, 2, order=shard_b)
    a.seen, b.seen = len(shard_a), len(shard_b)
    merged = a.merge(b)
    for layer in acts:
        assert as_rows(merged, layer) == as_rows(single, layer)
    assert merged.seen == n
    # merging into an empty state, and an empty state into a full one
    empty = TopK(list(acts), 4)
    for layer in acts:
        assert as_rows(TopK(list(acts), 4).merge(single), layer) == as_rows(single, layer)
        assert as_rows(run_stream(acts, 4, 5).merge(empty), layer) == as_rows(single, layer)


def test_merge_rejects_mismatch():
    with pytest.raises(ValueError):
        TopK(["a"], 3).merge(TopK(["a"], 4))
    with pytest.raises(ValueError):
        TopK(["a"], 3).merge(TopK(["b"], 3))


def test_load_state_dict_refuses_another_k_or_other_layers_and_names_both():
    acts = tie_heavy_acts(0)
    mine_ = run_stream(acts, 3, 4)
    for other in (TopK(list(acts), 4), TopK(list(acts)[:1], 3)):  # only k differs; only the layers differ
        with pytest.raises(ValueError, match=r"state for k=3, layers=.* does not fit k=%d" % other.k):
            other.load_state_dict(mine_.state_dict())
    with pytest.raises(KeyError, match="'nope' has not been mined"):
        TopK(["nope"], 2).winners("nope")


def test_winners_hold_int64_indices_and_float64_values_and_a_missing_layer_is_named():
    acts = tie_heavy_acts(1)
    topk = run_stream(acts, 20, 4)  # k > images: empty slots from the initial state remain
    for layer in acts:
        for w in (topk.winners(layer), TopK.from_state_dict(topk.state_dict()).winners(layer)):
            assert {f: w[f].dtype for f in ("values", "images", "ys", "xs")} == {
                "values": torch.float64, "images": torch.int64, "ys": torch.int64, "xs": torch.int64}
    first, second = list(acts)[:2]
    with pytest.raises(KeyError, match=r"lack layer '%s' \(got \['%s'\]\)" % (second, first)):
        TopK(list(acts), 2).update({first: acts[first][:2]}, torch.arange(2))


def test_state_dict_roundtrip_and_resume_equals_single_pass():
    acts = tie_heavy_acts(4)
    ref = run_stream(acts, 3, 4)
    first = run_stream(acts, 3, 4, order=list(range(6)))
    first.seen = 6
    first.skipped = [2]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain tensors only
    resumed = TopK.from_state_dict(state)
    assert resumed.seen == 6 and resumed.skipped == [2]
    for s in range(6, 13, 4):
        sel = torch.arange(s, min(s + 4, 13))
        resumed.update({n: a[sel] for n, a in acts.items()}, sel)
    for layer in acts:
        assert as_rows(resumed, layer) == as_rows(ref, layer)


def test_mine_streams_batches_skips_unreadable_and_checkpoints():
    acts = tie_heavy_acts(6)
    n = 13
    bad = {5, 10}

    def batches(bs):
        for s in range(0, n, bs):
            ids = torch.arange(s, min(s + bs, n))
            ids = torch.where(torch.tensor([int(i) in bad for i in ids]), -1 - ids, ids)
            imgs = torch.arange(s, min(s + bs, n), dtype=torch.float64)  # "images" = their index
            yield imgs, ids

    def act_fn(x):
        sel = x.long()
        return {name: a[sel] for name, a in acts.items()}

    saved = []
    topk = mine(act_fn, batches(3), TopK(list(acts), 3), checkpoint_every=2,
                on_checkpoint=lambda t: saved.append(t.seen), total=n, progress=False)
    assert saved == [6, 12]
    assert topk.seen == n and sorted(topk.skipped) == sorted(bad)
    keep = [i for i in range(n) if i not in bad]
    want = oracle({name: a[keep].numpy() for name, a in acts.items()}, keep, 3)
    for layer in acts:
        assert as_rows(topk, layer) == want[layer]


def test_mine_channels_limit_and_dtype():
    acts = {"l": torch.randn(6, 5, 2, 2, dtype=torch.float64)}
    batches = [(torch.arange(0, 3.0), torch.arange(0, 3)), (torch.arange(3, 6.0), torch.arange(3, 6))]
    topk = mine(lambda x: {"l": acts["l"][x.long()]}, batches, TopK(["l"], 2), channels=2, progress=False)
    assert topk.winners("l")["values"].shape == (2, 2)
    assert as_rows(topk, "l") == oracle({"l": acts["l"][:, :2].numpy()}, range(6), 2)["l"]


def test_float32_activations_are_exact_in_float64_state():
    a = torch.randn(7, 3, 4, 4, dtype=torch.float32)
    topk = run_stream({"l": a}, 3, 2)
    assert topk.winners("l")["values"].dtype == torch.float64
    assert as_rows(topk, "l") == oracle({"l": a.numpy()}, range(7), 3)["l"]


def test_channel_maxima_matches_first_rowmajor_argmax():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 3, (4, 6, 5, 7), generator=g).float()
    vals, ys, xs = channel_maxima(a)
    flat = a.reshape(4, 6, -1).numpy()
    first = flat.argmax(axis=2)  # numpy: first occurrence
    assert (ys * 7 + xs).numpy().tolist() == first.tolist()
    assert vals.numpy().tolist() == flat.max(axis=2).tolist()


def test_bad_k_and_layers():
    for k in (0, -1, 2.5, True, "3"):
        with pytest.raises(DeconvisError, match=r"k must be a positive integer, got %s" % re.escape(repr(k))):
            TopK(["a"], k)  # type: ignore[arg-type]
    with pytest.raises(DeconvisError, match="at least one layer"):
        TopK([], 3)


def test_bad_activation_shapes_are_named():
    with pytest.raises(DeconvisError, match=r"\[N, C, h, w\] or \[N, C\], got shape \(2, 3, 4\)"):
        channel_maxima(torch.zeros(2, 3, 4))
    for shape in ((2, 3, 0, 4), (2, 3, 4, 0)):  # either side empty: the same one-line error
        with pytest.raises(DeconvisError, match=r"map of shape %s is empty" % re.escape(str(shape))):
            channel_maxima(torch.zeros(shape))


def test_hooked_activations_on_a_real_model_matches_oracle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Conv2d(4, 3, 3), nn.ReLU(inplace=True)).double().eval()
    x = torch.randn(9, 3, 12, 12, dtype=torch.float64)
    x[6] = x[1]
    fn = hooked_activations(model, ["0", "1", "4"])
    with torch.no_grad():
        full = fn(x)
    # the conv output is captured before the in-place ReLU overwrites it
    assert (full["0"] < 0).any()
    batches = [(x[s:s + 4], torch.arange(s, min(s + 4, 9))) for s in range(0, 9, 4)]
    topk = mine(fn, batches, TopK(["0", "1", "4"], 3), progress=False)
    want = oracle({n: a.numpy() for n, a in full.items()}, range(9), 3)
    for layer in ("0", "1", "4"):
        assert as_rows(topk, layer) == want[layer]
    with pytest.raises(DeconvisError, match="did you mean"):
        hooked_activations(model, ["44"])


def test_out_of_memory_halves_the_forward_without_double_counting():
    acts = tie_heavy_acts(8)
    calls = []

    def act_fn(x):
        calls.append(len(x))
        if len(x) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {name: a[x.long()] for name, a in acts.items()}

    batches = [(torch.arange(s, min(s + 5, 13), dtype=torch.float64), torch.arange(s, min(s + 5, 13)))
               for s in range(0, 13, 5)]
    with pytest.warns(RuntimeWarning, match="out of memory"):
        topk = mine(act_fn, batches, TopK(list(acts), 3), progress=False)
    assert calls[:4] == [5, 2, 2, 1] and max(calls[4:]) <= 2  # later batches stay small
    want = oracle({n: a.numpy() for n, a in acts.items()}, range(13), 3)
    for layer in acts:
        assert as_rows(topk, layer) == want[layer]

    def other_error(x):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        mine(other_error, batches, TopK(list(acts), 3), progress=False)


def test_mine_reports_where_the_time_goes():
    """Known costs (sleeps) in the loader, the forward and the top-k update are found again in
    MiningTimes: load, forward and top-k each at least their sleeps, the split adds up."""
    import time

    from deconvis.mining import MiningTimes

    acts = {"l": torch.randn(8, 3, 2, 2)}

    def batches():
        for s in range(0, 8, 2):
            time.sleep(0.03)
            yield torch.arange(s, s + 2.0), torch.arange(s, s + 2)

    def act_fn(x):
        time.sleep(0.02)
        return {"l": acts["l"][x.long()]}

    class SlowTopK(TopK):
        def update(self, a, ids):
            time.sleep(0.01)
            super().update(a, ids)

    polled = []
    times = MiningTimes()
    topk = mine(act_fn, batches(), SlowTopK(["l"], 2), progress=False, times=times, profile=True,
                on_batch=polled.append)
    assert polled == [1, 2, 3, 4] and times.batches == 4 and times.images == 8 and times.clock == "host"
    assert times.load >= 4 * 0.03 and times.forward >= 4 * 0.02 and times.topk >= 4 * 0.01
    assert times.forward < 4 * 0.03 + 0.5 and times.topk < 4 * 0.02 + 0.5  # not the others' sleeps
    assert times.total >= times.load + times.forward + times.topk - 1e-6
    assert len(times.per_batch) == 4 and all(b[0] >= 0.03 and b[1] >= 0.02 for b in times.per_batch)
    assert as_rows(topk, "l") == oracle({"l": acts["l"].numpy()}, range(8), 2)["l"]
    text = times.summary()
    assert text.startswith("load ") and "forward" in text and "top-k" in text and "img/s" in text
    assert set(times.to_dict()) >= {"load", "forward", "topk", "other", "total", "images", "clock"}


def test_out_of_memory_inside_the_deconvnet_forward_is_retried(monkeypatch):
    """DeconvNet wraps forward errors in a DeconvisError (``from`` the original): an out-of-memory
    error in the real ``dn.activations`` must still halve the batch, and the winners must equal
    the brute-force oracle's."""
    import deconvis.mirror.engine as dmod
    from deconvis.mirror.deconvnet import DeconvNet

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3), nn.ReLU()).double()
    x = torch.randn(7, 3, 12, 12, dtype=torch.float64)
    dn = DeconvNet(model)
    real_relu = dmod.F.relu
    sizes = []

    def relu(t, *a, **k):
        sizes.append(t.shape[0])
        if t.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_relu(t, *a, **k)

    monkeypatch.setattr(dmod.F, "relu", relu)
    batches = [(x[s:s + 4], torch.arange(s, min(s + 4, 7))) for s in range(0, 7, 4)]
    with pytest.warns(RuntimeWarning, match="out of memory while mining: forwarding 2 images"):
        topk = mine(lambda b: dn.activations(b, ["1", "4"]), batches, TopK(["1", "4"], 2), progress=False)
    monkeypatch.setattr(dmod.F, "relu", real_relu)
    assert topk.seen == 7 and max(sizes[1:]) <= 2
    with torch.no_grad():
        a1 = model[:2](x)
        a4 = model(x)
    want = oracle({"1": a1.numpy(), "4": a4.numpy()}, range(7), 2)
    assert as_rows(topk, "1") == want["1"] and as_rows(topk, "4") == want["4"]


def _roundtrip(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_overflow_never_wins_and_is_named(half):
    """fp16 turns 70000 into +inf (bf16 keeps it): an overflowed image is no candidate, is counted
    per channel, and the summary/message name layer, channel and image; NaN downstream likewise."""
    from deconvis.mining.nonfinite import nonfinite_messages, nonfinite_summary

    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 3, 4, 4, generator=g) * 10
    a[4, 1, 2, 3] = 70000.0           # above fp16's 65504
    b = a.clone()
    b[5, 2] = float("nan")            # a later layer made NaN of it
    acts = {"conv1": a.to(half), "conv2": b.to(half)}
    topk = run_stream(acts, k=3, batch=4)
    ref = oracle({n: t.float().numpy() for n, t in acts.items()}, range(6), 3)
    for layer in acts:
        assert as_rows(topk, layer) == ref[layer], layer
    summary = nonfinite_summary(topk)
    if half == torch.float16:
        assert summary["conv1"] == {"images": 1, "channels": {1: 1}, "first_image": 4}
        assert 4 not in [r[1] for r in as_rows(topk, "conv1")[1]]
    else:
        assert "conv1" not in summary and as_rows(topk, "conv1")[1][0][1] == 4
    assert summary["conv2"]["channels"][2] == 1
    msgs = nonfinite_messages(summary, {"conv1": "c1", "conv2": "c2"}, amp="fp16", image_name=lambda i: f"img{i}")
    assert len(msgs) == len(summary)                       # one line per layer
    assert "layer c2" in msgs[-1] and "channel" in msgs[-1] and "--amp bf16" in msgs[-1]


def test_half_precision_ties_break_by_image_index():
    """Many values round to the same fp16/bf16 number: the ordering stays total (value, then image)."""
    g = torch.Generator().manual_seed(1)
    a = (5 + 45 * torch.rand(40, 2, 3, 3, generator=g))
    for half in (torch.float16, torch.bfloat16):
        h = a.to(half)
        topk = run_stream({"l": h}, k=9, batch=7)
        assert as_rows(topk, "l") == oracle({"l": h.float().numpy()}, range(40), 9)["l"]


def test_timer_checkpoint_with_a_fake_clock():
    """checkpoint_seconds: a checkpoint whenever that much (fake) time passed, none otherwise."""
    now = [0.0]
    acts = torch.randn(10, 2, 2, 2)
    saved = []

    def batches():
        for i in range(10):
            now[0] += 25.0 if i < 5 else 1.0  # 5 slow batches, then 5 fast ones
            yield acts[i:i + 1], torch.tensor([i])

    mine(lambda x: {"l": x}, batches(), TopK(["l"], 2), checkpoint_seconds=60, now=lambda: now[0],
         on_checkpoint=lambda t: saved.append(t.seen), progress=False)
    assert saved == [3]  # 75 s after the start; 55 s since then by the end: no second one


def _shape_dependent(x: torch.Tensor):
    """A forward whose last bits depend on the batch shape (as cuDNN/oneDNN kernels chosen by
    shape do): every value scaled by ``1 - 1e-6 * N``."""
    return {"l": x * (1.0 - 1e-6 * x.shape[0])}


def test_ties_between_identical_images_do_not_depend_on_batch_placement_or_world_size():
    """Images 1 and 6 are identical: image 1 must win every channel they top, whether image 6
    lands in a short last batch, in another rank's shard, or behind an unreadable image."""
    from deconvis.runs.distributed import ShardSampler

    g = torch.Generator().manual_seed(5)
    n, batch = 7, 4
    imgs = torch.rand(n, 3, 2, 2, generator=g)
    imgs[1] = imgs[6] = 5.0 + torch.rand(3, 2, 2, generator=g)  # the strongest in every channel

    def mined(world: int, bad=()):
        merged = TopK(["l"], 3)
        for r in range(world):
            ids = list(ShardSampler(n, r, world))
            batches = [(imgs[ids[s:s + batch]], torch.tensor([-1 - i if i in bad else i for i in ids[s:s + batch]]))
                       for s in range(0, len(ids), batch)]
            merged.merge(mine(_shape_dependent, batches, TopK(["l"], 3), progress=False, batch_size=batch))
        return merged

    for world, bad in ((1, ()), (2, ()), (3, ()), (1, (0,))):
        got = mined(world, bad).winners("l")
        assert got["images"][:, :2].tolist() == [[1, 6]] * 3, (world, bad)
        assert torch.equal(got["values"][:, 0], got["values"][:, 1]), (world, bad)  # an exact tie


@pytest.mark.parametrize("share", [0.25, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lazy_positions_equal_the_eager_state(monkeypatch, seed, share):
    """The CPU's lazy positions (maxima by ``amax``, positions only for the maps that can enter)
    give the state of ``max`` with indices over every map: top-k and bottom-k, ties within and
    across images, NaN and +inf maps, a re-rank's eligibility mask, a channels-last batch; and
    the brute-force oracle's winners. ``share`` 1.0 takes the lazy form for every batch after the
    first, 0.25 also falls back to the eager one where most pairs compete."""
    from deconvis.mining import topk as topk_mod
    g = torch.Generator().manual_seed(seed)
    n = 40
    a = torch.randint(-3, 5, (n, 6, 3, 5), generator=g).to(torch.float32)
    a[5, 1, 0, 2] = float("nan")
    a[17, 2, 1, 1] = float("inf")
    a[23, 3] = float("-inf")
    ids = torch.randperm(n, generator=g) + 100
    eligible = torch.rand(n, 6, generator=g) > 0.3
    sizes = [7, 1, 9, 3, 12, 8]  # ragged batches
    monkeypatch.setattr(topk_mod, "LAZY_MAX_SHARE", share)

    def stream(lazy: bool) -> TopK:
        monkeypatch.setattr(topk_mod, "LAZY_POSITIONS", lazy)
        t = TopK(["l", "m"], 4, bottom_k=3, bottom_of={"l": "pre"})
        start = 0
        for i, b in enumerate(sizes):
            sl = slice(start, start + b)
            part = a[sl].contiguous(memory_format=torch.channels_last) if i == 2 else a[sl]
            acts = {"l": part.relu(), "m": part, "pre": part}
            t.update(acts, ids[sl])
            t.update_layer("m", part, ids[sl], eligible[sl])  # a re-rank's pool: only eligible pairs compete
            start += b
        return t

    lazy, eager = stream(True), stream(False)
    for t_a, t_b, layers in ((lazy, eager, ["l", "m"]), (lazy.bottom, eager.bottom, ["pre"])):
        for layer in layers:
            for f in ("values", "images", "ys", "xs"):
                assert torch.equal(t_a.state[layer][f], t_b.state[layer][f]), (layer, f)
            assert torch.equal(t_a.nonfinite[layer], t_b.nonfinite[layer])
            assert torch.equal(t_a.nonfinite_first[layer], t_b.nonfinite_first[layer])
    monkeypatch.setattr(topk_mod, "LAZY_POSITIONS", True)
    assert as_rows(run_stream({"l": a.relu()}, 4, 6, ids=ids), "l") == \
        oracle({"l": a.relu().numpy()}, ids.tolist(), 4)["l"]


def test_positions_where_finds_first_extremum_only_where_asked():
    from deconvis.mining.topk import channel_values, positions_where
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 3, (5, 4, 3, 6), generator=g).to(torch.float64)
    need = torch.rand(5, 4, generator=g) > 0.5
    for negate in (False, True):
        vals, ys, xs = channel_maxima(a, negate)
        assert torch.equal(channel_values(a, negate), vals)
        py, px = positions_where(a, need, negate)
        assert torch.equal(py[need], ys[need]) and torch.equal(px[need], xs[need])
        assert not py[~need].any() and not px[~need].any()
