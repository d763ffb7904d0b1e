"""Incremental occlusion's windows and bookkeeping, float64, against a plain forward of every
occluded copy (or a brute-force count): kernels, strides, padding and dilation that differ between
height and width, a dilated ceil-mode max pool, an average pool with padding and
``divisor_override``, adaptive pools (the identity after a pad, and an evenly dividing one), a map
one row (or column) high, a product with a shape-derived constant, rows no unit reads, a net
without a receptive-field table, the multiply-add bound and the refusals. Small and quick: it is
also the per-mutant selection of the occlusion target of ``scripts/mutate.py``."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deconvis.analysis.occlusion_engine import IncrementalOcclusion
from deconvis.errors import DeconvisError

LAYERS = ("c1", "p1", "a1", "same", "c3")


class PerAxis(nn.Module):
    """[1, 3, 25, 26] -> c1 [13, 22] -> p1 [5, 22] -> c2 [5, 22] -> a1 [6, 10] -> pad [7, 11] ->
    same [7, 11] -> c3 [1, 11] -> logits [1, 4]; ``transposed``: every per-axis setting swapped,
    for a [1, 3, 26, 25] image (the maps transposed too, c3 one column wide)."""

    def __init__(self, transposed: bool = False):
        super().__init__()

        def ax(a, b):  # (height, width) of a setting
            return (b, a) if transposed else (a, b)

        self.c1 = nn.Conv2d(3, 4, ax(3, 5), stride=ax(2, 1), padding=ax(1, 2), dilation=ax(1, 2))
        # ceil mode adds a last row of windows that starts 2 rows before the end of its 13-row
        # input: its window at the far edge reads 2 rows past the map, more than stride 1 along
        # the other axis would pad
        self.p1 = nn.MaxPool2d(ax(3, 2), stride=ax(3, 1), padding=ax(0, 1), dilation=ax(1, 2), ceil_mode=True)
        # padding 2 on one axis only, stride 1: its windows at the far edge read 2 rows of padding
        self.c2 = nn.Conv2d(4, 6, ax(5, 1), padding=ax(2, 0), groups=2)
        self.a1 = nn.AvgPool2d(ax(2, 3), stride=ax(1, 2), padding=ax(1, 0), divisor_override=5)
        self.pad = (0, 1, 1, 0) if transposed else (1, 0, 0, 1)  # left, right, top, bottom
        self.same = nn.AdaptiveAvgPool2d(ax(7, 11))  # its input is 7 x 11: the identity, after a pad
        self.c3 = nn.Conv2d(6, 5, ax(4, 1), stride=ax(3, 1), dilation=ax(2, 1))  # one row high
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = self.p1(self.c1(x))  # no ReLU before the pool: negatives meet its -inf padding
        x = self.a1(F.relu(self.c2(x)))
        x = self.c3(self.same(F.pad(x, self.pad)))  # the pad runs in full, the pool reads its window
        x = x * x.shape[1] ** -0.5  # a product with a constant read off the traced shape
        return self.fc(x.mean((2, 3)))


def _naive(model: nn.Module, x: torch.Tensor, tops: Sequence[Tuple[int, int]], size, fill: torch.Tensor,
           layers: Sequence[str] = LAYERS):
    """Each occluded copy through the plain forward: (logits [P, K], {layer: channel sums [P, C]})."""
    store = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, o)) for n in layers]
    xo = x.repeat(len(tops), 1, 1, 1)
    for b, (y, x0) in enumerate(tops):
        xo[b, :, y:y + size[0], x0:x0 + size[1]] = fill[:, None, None]
    try:
        with torch.no_grad():
            logits = model(xo)
    finally:
        for h in hooks:
            h.remove()
    return logits, {n: store[n].sum((2, 3)) for n in layers}


def _tops(H: int, W: int, size, stride) -> List[Tuple[int, int]]:
    """Top-left corners every ``stride`` pixels, plus the last row and column (the far edges)."""
    ys = sorted(set(range(0, H - size[0] + 1, stride[0])) | {H - size[0]})
    xs = sorted(set(range(0, W - size[1] + 1, stride[1])) | {W - size[1]})
    return [(y, x0) for y in ys for x0 in xs]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("size,stride,batch", [
    ((3, 4), (2, 3), 7),     # small squares: every conv and pool layer windowed, windows clamped at the edges
    ((2, 1), (5, 4), 5),     # a 2 x 1 occluder
    ((15, 19), (4, 7), 3),   # large squares: the deep windows cover their whole maps
])
def test_per_axis_windows_equal_naive(size, stride, batch, transposed):
    torch.manual_seed(3)
    model = PerAxis(transposed).double().eval()
    H, W = (26, 25) if transposed else (25, 26)
    if transposed:
        size, stride = size[::-1], stride[::-1]
    x = torch.randn(1, 3, H, W, dtype=torch.float64)
    fill = torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64)
    eng = IncrementalOcclusion(model, x, size, LAYERS)
    names = {eng.tg.row_names[n] for n in eng.windowed}
    assert set(LAYERS) <= names and "mul" in names and eng.fallback == ["pad"]
    assert {eng.tg.row_names[n] for n in eng.identity} == {"same"}
    tops = _tops(H, W, size, stride)
    t = torch.tensor(tops, dtype=torch.long)
    outs = [eng.run(c, fill) for c in t.split(batch)]
    logits = torch.cat([o.logits for o in outs])
    want_logits, want_sums = _naive(model, x, tops, size, fill)
    assert float((want_logits - want_logits[:1]).abs().max()) > 1e-6  # the occluder changes the output
    torch.testing.assert_close(logits, want_logits, rtol=1e-10, atol=1e-12)
    for n in LAYERS:
        got = torch.cat([o.sums[eng.tg.resolve(n)] for o in outs])
        torch.testing.assert_close(got, want_sums[n], rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"layer {n}: {m}")


def test_macs_bound_counts_the_windows_and_is_one_for_a_full_image_square():
    """``bound`` (naive multiply-adds over those done, reported as ``macs_bound``): exactly 1 when
    the square is the whole image (every node runs in full); otherwise the windows must still
    compute at least every conv unit that changes, counted here by brute force."""
    torch.manual_seed(4)
    model = PerAxis().double().eval()
    x = torch.randn(1, 3, 25, 26, dtype=torch.float64)
    fill = torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64)
    convs = [model.c1, model.c2, model.c3]
    per_unit = [c.out_channels * c.in_channels // c.groups * c.kernel_size[0] * c.kernel_size[1] for c in convs]
    store = {}
    hooks = [c.register_forward_hook(lambda m, i, o, j=j: store.__setitem__(j, o)) for j, c in enumerate(convs)]
    try:
        with torch.no_grad():
            model(x)
            clean = dict(store)
            naive = sum(int(clean[j][0, 0].numel()) * per_unit[j] for j in range(3)) + 5 * 4  # + the Linear
            eng = IncrementalOcclusion(model, x, (25, 26), [])
            eng.run(torch.zeros(1, 2, dtype=torch.long), fill)
            assert eng.macs_naive_per_image == naive and eng.macs_done == naive and eng.bound == 1.0
            size = (3, 4)
            tops = _tops(25, 26, size, (4, 5))
            eng = IncrementalOcclusion(model, x, size, [])
            eng.run(torch.tensor(tops, dtype=torch.long), fill)
            xo = x.repeat(len(tops), 1, 1, 1)
            for b, (y, x0) in enumerate(tops):
                xo[b, :, y:y + size[0], x0:x0 + size[1]] = fill[:, None, None]
            model(xo)
    finally:
        for h in hooks:
            h.remove()
    changed = sum(int((store[j] != clean[j]).any(1).sum()) * per_unit[j] for j in range(3)) + len(tops) * 5 * 4
    assert changed <= eng.macs_done < naive * len(tops)
    assert eng.bound == naive * len(tops) / eng.macs_done


class Skipping(nn.Module):
    """A conv whose stride (4) exceeds its kernel (2) along the height: rows 4u + 2 and 4u + 3 of
    its input are read by no unit, so an occluder there changes nothing below it."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, (2, 3), stride=(4, 1))
        self.c2 = nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.c2(F.relu(self.c1(x))).amax((2, 3)))


def test_an_occluder_on_rows_no_unit_reads_equals_naive():
    """The window of the input then lies wholly above the rows its consumer reads (and overlaps
    them along the width): nothing of it may be pasted."""
    torch.manual_seed(5)
    model = Skipping().double().eval()
    x = torch.randn(1, 3, 18, 11, dtype=torch.float64)
    fill = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    size = (1, 3)
    tops = _tops(18, 11, size, (1, 2))
    eng = IncrementalOcclusion(model, x, size, ["c2"])
    out = eng.run(torch.tensor(tops, dtype=torch.long), fill)
    logits, sums = _naive(model, x, tops, size, fill, ["c2"])
    with torch.no_grad():
        clean = model(x)
    skipped = [b for b, (y, _) in enumerate(tops) if y % 4 >= 2]  # these squares change nothing
    assert skipped and bool((logits[skipped] == clean).all()) and not bool((logits == clean).all())
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.sums[eng.layers[0]], sums["c2"], rtol=1e-10, atol=1e-12)


def _equals_naive(model: nn.Module, x: torch.Tensor, size, layer: str) -> IncrementalOcclusion:
    """Every square position, stride 1, in batches of 6: logits and ``layer``'s sums against the
    plain forward of each occluded copy; returns the engine."""
    fill = torch.linspace(-1.0, 1.0, x.shape[1], dtype=x.dtype)
    tops = _tops(x.shape[-2], x.shape[-1], size, (1, 1))
    eng = IncrementalOcclusion(model, x, size, [layer])
    outs = [eng.run(c, fill) for c in torch.tensor(tops, dtype=torch.long).split(6)]
    logits, sums = _naive(model, x, tops, size, fill, [layer])
    assert float((logits - logits[:1]).abs().max()) > 1e-6
    torch.testing.assert_close(torch.cat([o.logits for o in outs]), logits, rtol=1e-10, atol=1e-12)
    got = torch.cat([o.sums[eng.layers[0]] for o in outs])
    torch.testing.assert_close(got, sums[layer], rtol=1e-10, atol=1e-12)
    return eng


def test_an_adaptive_pool_that_is_not_the_identity_is_not_taken_for_one():
    """An adaptive pool of an evenly divided map (8 x 9 -> 4 x 3: windows 2 x 3) has a local field
    but is not the identity: its window is pooled, not copied."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AdaptiveAvgPool2d((4, 3)), nn.ReLU(),
                          nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(24, 3)).double().eval()
    eng = _equals_naive(model, torch.randn(1, 2, 8, 9, dtype=torch.float64), (2, 2), "1")
    assert not eng.identity and eng.whole == ["4", "5"]


class Misaligned(nn.Module):
    """Two branches whose grids do not line up (stride 2 against a 5 x 5 kernel): no receptive
    field table, so every node runs in full for the batch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 2, stride=2)
        self.b = nn.Conv2d(2, 3, 5, padding=0)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc((self.a(x)[:, :, :3, :3] + self.b(x)).mean((2, 3)))


def test_a_net_without_a_receptive_field_table_runs_in_full_and_equals_naive():
    torch.manual_seed(7)
    eng = _equals_naive(Misaligned().double().eval(), torch.randn(1, 2, 7, 7, dtype=torch.float64), (2, 3), "b")
    assert eng.table is None and not eng.windowed and "b" in eng.fallback


def test_an_image_batch_or_a_model_without_one_logits_tensor_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).double().eval()
    with pytest.raises(DeconvisError, match=r"\[1, C, H, W\], got \[2, 3, 6, 6\]"):
        IncrementalOcclusion(model, torch.zeros(2, 3, 6, 6, dtype=torch.float64), (2, 2))

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return {"logits": self.net(x)}

    class Constant(nn.Module):  # scores that do not depend on the image
        def __init__(self):
            super().__init__()
            self.net = model
            self.register_buffer("scores", torch.zeros(1, 2, dtype=torch.float64))

        def forward(self, x):
            self.net(x)
            return self.scores

    for wrong in (Named(), Constant()):
        with pytest.raises(DeconvisError, match="one tensor of class scores"):
            IncrementalOcclusion(wrong, torch.zeros(1, 3, 6, 6, dtype=torch.float64), (2, 2))
