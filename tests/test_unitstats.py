"""Unit statistics collected while mining: histogram, firing share and channel correlation of
the per-image maxima, against brute force over all maxima at once (numpy)."""
from __future__ import annotations

import numpy as np
import torch

from deconvis import mining
from deconvis.mining.unitstats import BINS, EDGES, UnitStats


def _maps(n=37, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, c, 4, 3, generator=g, dtype=torch.float64) * torch.tensor([0.01, 1, 30, 1, 1e5]).view(1, c, 1, 1).double()
    acts[:, 3] = acts[:, 1] * 2 + 0.5  # channel 3 a copy of channel 1: correlation 1 in maxima
    return acts


def test_stats_streamed_in_batches_equal_brute_force_and_merge_equals_one_pass():
    acts = _maps()
    vals = acts.flatten(2).amax(2).numpy()  # [N, C] the brute-force maxima
    whole = mining.TopK(["L"], 2)
    for s in range(0, 37, 6):
        whole.update({"L": acts[s:s + 6]}, torch.arange(s, min(37, s + 6)))
    st = whole.stats["L"]
    bins = np.searchsorted(np.array(EDGES), vals, side="right")
    for ch in range(5):
        assert st.hist[ch].tolist() == np.bincount(bins[:, ch], minlength=BINS).tolist()
    assert st.fired.tolist() == (vals > 0).sum(0).tolist()
    r = st.correlation().numpy()
    np.testing.assert_allclose(r[~np.eye(5, dtype=bool)], np.corrcoef(vals.T)[~np.eye(5, dtype=bool)], atol=1e-9)
    summ = st.summary(top=2)
    assert summ["correlated"][1][0][0] == 3 and summ["correlated"][1][0][1] == 1.0
    assert summ["images"] == 37 and summ["fired"][2] == (vals[:, 2] > 0).mean()
    first, counts = summ["hist"][4]
    assert sum(counts) == 37 and counts[0] > 0 and first == bins[:, 4].min()
    # two disjoint halves merged (and through a checkpoint) = one pass
    a, b = mining.TopK(["L"], 2), mining.TopK(["L"], 2)
    a.update({"L": acts[:20]}, torch.arange(20))
    b.update({"L": acts[20:]}, torch.arange(20, 37))
    a = mining.TopK.from_state_dict(a.state_dict())
    a.merge(b)
    for f in UnitStats.FIELDS:
        assert torch.allclose(getattr(a.stats["L"], f).double(), getattr(st, f).double(), rtol=1e-12), f


def test_nonfinite_maxima_are_left_out_and_old_checkpoints_collect_none():
    acts = _maps(n=8)
    acts[2, 1, 0, 0] = float("nan")
    t = mining.TopK(["L"], 2)
    t.update({"L": acts}, torch.arange(8))
    st = t.stats["L"]
    assert st.count.tolist() == [8, 7, 8, 8, 8] and int(st.hist[1].sum()) == 7 and int(st.rows) == 7
    old = t.state_dict()
    del old["stats"]
    resumed = mining.TopK.from_state_dict(old)
    resumed.update({"L": acts}, torch.arange(8, 16))
    assert resumed.stats == {}  # a partial histogram would misstate the image set


def test_a_checkpoint_before_any_counted_image_still_collects_statistics():
    acts = _maps(n=8)
    # taken after 3 unreadable items and no forward: the resumed run counts every image it folds
    t = mining.TopK(["L"], 2)
    t.seen, t.skipped = 3, [0, 1, 2]
    resumed = mining.TopK.from_state_dict(t.state_dict())
    resumed.update({"L": acts}, torch.arange(3, 11))
    assert int(resumed.stats["L"].rows) == 8
    # a checkpoint from before unit statistics with nothing seen: nothing to be partial about
    old = mining.TopK(["L"], 2).state_dict()
    del old["stats"]
    fresh = mining.TopK.from_state_dict(old)
    fresh.update({"L": acts}, torch.arange(8))
    assert int(fresh.stats["L"].rows) == 8
