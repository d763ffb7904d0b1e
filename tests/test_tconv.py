"""The mirror's transposed conv (deconvis/mirror/tconv.py): the sub-pixel form equals
F.conv_transpose2d to float64 round-off on random shapes (strides 2-4, dilation, groups, padding,
output padding, non-square kernels and maps), and conv_transpose picks it only where it is meant
to (strided, ungrouped, few phase channels) while giving the same numbers either way."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from deconvis.mirror import tconv
from deconvis.mirror.tconv import conv_transpose, subpixel_conv_transpose, use_subpixel


def _case(rng: random.Random):
    """A random valid conv_transpose2d configuration, float64."""
    while True:
        s = rng.randint(2, 4)
        kh, kw = rng.randint(1, 7), rng.randint(1, 7)
        d = (rng.randint(1, 3), rng.randint(1, 3))
        groups = rng.choice([1, 2, 3])
        op = (rng.randint(0, s - 1), rng.randint(0, s - 1))
        p = (rng.randint(0, 3), rng.randint(0, 3))
        h, w = rng.randint(1, 7), rng.randint(1, 7)
        gen = torch.Generator().manual_seed(rng.randint(0, 2 ** 31))
        g = torch.randn(2, 2 * groups, h, w, dtype=torch.float64, generator=gen)
        weight = torch.randn(2 * groups, rng.randint(1, 3), kh, kw, dtype=torch.float64, generator=gen)
        kw_args = dict(stride=(s, s), padding=p, output_padding=op, dilation=d, groups=groups)
        try:
            ref = F.conv_transpose2d(g, weight, **kw_args)
        except RuntimeError:  # output_padding >= stride and dilation, or an empty output
            continue
        return g, weight, kw_args, ref


@pytest.mark.parametrize("crop", [True, False])
def test_subpixel_equals_conv_transpose2d_on_random_shapes(crop, monkeypatch):
    """(SHUFFLE_CROP: phases laid straight into the crop, or onto the whole grid and then cut.)"""
    monkeypatch.setattr(tconv, "SHUFFLE_CROP", crop)
    rng = random.Random(0)
    for _ in range(150):
        g, weight, kw, ref = _case(rng)
        got = subpixel_conv_transpose(g, weight, **kw)
        assert got.shape == ref.shape, kw
        assert torch.allclose(got, ref, rtol=0, atol=1e-12), kw


def test_subpixel_on_alexnet_conv1_shape():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(2, 64, 55, 55, dtype=torch.float64, generator=gen)
    weight = torch.randn(64, 3, 11, 11, dtype=torch.float64, generator=gen)
    ref = F.conv_transpose2d(g, weight, stride=4, padding=2, output_padding=1)  # 224 px
    got = subpixel_conv_transpose(g, weight, (4, 4), (2, 2), (1, 1))
    assert got.shape == ref.shape == (2, 3, 224, 224)
    assert torch.allclose(got, ref, rtol=0, atol=1e-10)


def test_subpixel_refuses_unequal_strides():
    with pytest.raises(ValueError, match="one stride"):
        subpixel_conv_transpose(torch.zeros(1, 2, 3, 3), torch.zeros(2, 1, 3, 3), (1, 2))


@pytest.mark.parametrize("shape, stride, groups, sub", [
    ((64, 3, 11, 11), (4, 4), 1, True),      # AlexNet conv1: 48 phase channels
    ((64, 3, 7, 7), (2, 2), 1, True),        # ResNet stem
    ((64, 3, 11, 11), (1, 1), 1, False),     # stride 1: conv_transpose2d
    ((128, 128, 3, 3), (2, 2), 1, False),    # many phase channels
    ((96, 1, 3, 3), (2, 2), 96, False),      # depthwise
    ((64, 3, 3, 3), (2, 1), 1, False),       # unequal strides
])
def test_conv_transpose_dispatch(shape, stride, groups, sub, monkeypatch):
    calls = []
    real = tconv.subpixel_conv_transpose
    monkeypatch.setattr(tconv, "subpixel_conv_transpose", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(*shape, dtype=torch.float64, generator=gen)
    g = torch.randn(2, shape[0], 5, 6, dtype=torch.float64, generator=gen)
    assert use_subpixel(weight, stride, groups) is sub
    got = conv_transpose(g, weight, stride, (1, 1), (0, 0), (1, 1), groups)
    ref = F.conv_transpose2d(g, weight, stride=stride, padding=1, groups=groups)
    assert bool(calls) is sub
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)


def test_mirror_with_a_stride4_stem_matches_oracle_in_one_chunk():
    """AlexNet's conv1 geometry (11x11, stride 4, padding 2, into 3 channels: the sub-pixel form,
    cropped) in the full and windowed mirror: equal to the autograd oracle, and the one-chunk result
    (returned without a concatenation) is a contiguous tensor like the multi-chunk one."""
    from torch import nn

    from autograd_oracle import oracle_project
    from deconvis.mirror.deconvnet import DeconvNet

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(8, 6, 5, padding=2),
                          nn.ReLU()).double().eval()
    x = torch.randn(3, 3, 67, 67, dtype=torch.float64)
    dn = DeconvNet(model)
    dn.forward(x)
    for layer in ("1", "4"):
        units = dn.strongest(layer, 2)
        one = dn.project(layer, units)
        assert one.is_contiguous()
        ref = oracle_project(model, x, layer, units, "deconvnet")
        assert torch.allclose(one, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
        assert torch.equal(dn.project(layer, units, batch_size=1), one)
        rec, boxes = dn.project_window(layer, units)
        assert rec.is_contiguous()
        for m, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
            cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, 67), max(x0, 0), min(x1, 67)
            assert torch.allclose(rec[m, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0], ref[m, :, cy0:cy1, cx0:cx1],
                                  rtol=0, atol=1e-10 * float(ref.abs().max()))


def test_subpixel_float32_channels_last_path_equals_conv_transpose2d():
    """float32 on the CPU takes the channels-last conv and the layout-agnostic shuffle: the same
    numbers as conv_transpose2d (float64 reference) to float32 round-off, contiguous output."""
    rng = random.Random(3)
    for _ in range(40):
        g, weight, kw, ref = _case(rng)
        got = subpixel_conv_transpose(g.float(), weight.float(), **kw)
        assert got.dtype == torch.float32 and got.shape == ref.shape, kw
        assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4), kw
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(3, 64, 9, 9, generator=gen)
    weight = torch.randn(64, 3, 11, 11, generator=gen)
    got = subpixel_conv_transpose(g, weight, (4, 4))
    ref = F.conv_transpose2d(g.double(), weight.double(), stride=4)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shuffle_crop_equals_pixel_shuffle_cut(dtype):
    """_shuffle_crop is pixel_shuffle followed by a crop, exactly, for crops that start and end
    inside a block or on its edge, from contiguous and channels-last phase maps."""
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    for _ in range(60):
        s, C = rng.randint(2, 4), rng.randint(1, 3)
        h, w = rng.randint(1, 6), rng.randint(1, 6)
        y = torch.randn(rng.randint(1, 3), C * s * s, h, w, generator=gen).to(dtype)
        if rng.random() < 0.5:
            y = y.contiguous(memory_format=torch.channels_last)
        top, left = rng.randint(0, h * s - 1), rng.randint(0, w * s - 1)
        H, W = rng.randint(1, h * s - top), rng.randint(1, w * s - left)
        got = tconv._shuffle_crop(y, s, top, left, H, W)
        assert got.is_contiguous()
        assert torch.equal(got, F.pixel_shuffle(y, s)[:, :, top:top + H, left:left + W]), (s, h, w, top, left, H, W)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_one_position_signal_is_one_matrix_product(dtype, tol, monkeypatch):
    """A 1x1 signal (a windowed projection's seed at its own conv) goes through conv_transpose as
    one matrix product: F.conv_transpose2d's numbers (float64 reference), any stride, non-square
    kernels, channels-last filters; maps of more positions, padding, dilation and groups keep the
    convolution."""
    calls = []
    real = tconv._one_position
    monkeypatch.setattr(tconv, "_one_position", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(6)
    for stride, (kh, kw), cl in (((1, 1), (3, 3), False), ((4, 4), (11, 11), True), ((2, 3), (5, 2), False)):
        g = torch.randn(5, 7, 1, 1, generator=gen, dtype=torch.float64)
        weight = torch.randn(7, 4, kh, kw, generator=gen, dtype=torch.float64)
        ref = F.conv_transpose2d(g, weight, stride=stride)
        wt = weight.to(dtype)
        got = conv_transpose(g.to(dtype), wt.contiguous(memory_format=torch.channels_last) if cl else wt, stride)
        assert got.shape == ref.shape and got.dtype == dtype
        assert torch.allclose(got.double(), ref, rtol=0, atol=tol * float(ref.abs().max()))
    assert len(calls) == 3
    g = torch.randn(2, 6, 1, 1, generator=gen, dtype=dtype)
    weight = torch.randn(6, 3, 3, 3, generator=gen, dtype=dtype)
    for kw_args in (dict(padding=(1, 1)), dict(dilation=(2, 2)), dict(groups=2, weight=weight[:, :1])):
        w = kw_args.pop("weight", weight)
        conv_transpose(g, w, (1, 1), **kw_args)
    conv_transpose(torch.randn(2, 6, 2, 1, generator=gen, dtype=dtype), weight, (1, 1))
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shuffle_crop_cl_equals_pixel_shuffle_cut_of_the_reordered_phases(dtype):
    """_shuffle_crop_cl takes phases ordered (r_y, r_x, c), lying channels-last, and writes
    exactly pixel_shuffle's crop of the same phases in pixel_shuffle's (c, r_y, r_x) order, in the
    channels-last memory format."""
    rng = random.Random(6)
    gen = torch.Generator().manual_seed(6)
    for _ in range(60):
        s, C = rng.randint(2, 4), rng.randint(1, 3)
        h, w, M = rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 3)
        y = torch.randn(M, C * s * s, h, w, generator=gen).to(dtype)  # (c, r_y, r_x) order
        y_cl = y.view(M, C, s, s, h, w).permute(0, 2, 3, 1, 4, 5).reshape(M, s * s * C, h, w)
        y_cl = y_cl.contiguous(memory_format=torch.channels_last)
        top, left = rng.randint(0, h * s - 1), rng.randint(0, w * s - 1)
        H, W = rng.randint(1, h * s - top), rng.randint(1, w * s - left)
        got = tconv._shuffle_crop_cl(y_cl, s, top, left, H, W)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, F.pixel_shuffle(y, s)[:, :, top:top + H, left:left + W]), (s, h, w, top, left, H, W)


def test_subpixel_channels_last_output_equals_conv_transpose2d(monkeypatch):
    """float32 on the CPU, one group: the phases reordered for a channels-last output
    (CHANNELS_LAST_OUT) give conv_transpose2d's numbers (float64 reference) and the same float32
    bits as the contiguous-output path; grouped convs keep the contiguous layout. (Without output
    padding the crop always lies inside the phase grid, so the channels-last output is taken.)"""
    outs = {}
    for flag in (True, False):
        monkeypatch.setattr(tconv, "CHANNELS_LAST_OUT", flag)
        r = random.Random(7)
        outs[flag] = []
        cases = [_case(r) for _ in range(40)]
        gen = torch.Generator().manual_seed(8)
        for _ in range(20):  # one group, no output padding, several image channels: the reordered path
            s, kh, kw_ = r.randint(2, 4), r.randint(1, 11), r.randint(1, 11)
            g = torch.randn(2, r.randint(1, 9), r.randint(1, 9), r.randint(1, 9), dtype=torch.float64, generator=gen)
            weight = torch.randn(g.shape[1], r.randint(2, 3), kh, kw_, dtype=torch.float64, generator=gen)
            args = dict(stride=(s, s), padding=(r.randint(0, 3), r.randint(0, 3)), output_padding=(0, 0),
                        dilation=(r.randint(1, 2), r.randint(1, 2)), groups=1)
            try:
                cases.append((g, weight, args, F.conv_transpose2d(g, weight, **args)))
            except RuntimeError:  # an empty output
                continue
        for g, weight, kw, ref in cases:
            got = subpixel_conv_transpose(g.float(), weight.float(), **kw)
            assert got.shape == ref.shape, kw
            assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4), kw
            laid_cl = got.stride(1) == 1 and got.shape[1] > 1  # channels innermost in memory
            if flag and kw["groups"] == 1 and kw["output_padding"] == (0, 0) and got.shape[1] > 1:
                assert laid_cl, kw
            if kw["groups"] > 1 or not flag:
                assert not laid_cl, kw
            outs[flag].append(got)
    for a, b in zip(outs[True], outs[False]):
        assert torch.equal(a, b)
