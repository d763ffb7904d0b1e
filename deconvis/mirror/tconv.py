"""The transposed convolution of the mirror, in the formulation that runs fastest on the CPU.

PyTorch's CPU ``conv_transpose2d`` is slow for a strided conv into few channels (AlexNet's
11x11 stride-4 conv1 and ResNet's 7x7 stride-2 stem, both into the 3 image channels): about a
quarter of the forward conv's multiply-add rate. The same numbers come from one *forward*
convolution by sub-pixel (space-to-depth) decomposition: output pixel ``Y = y*s + t`` of the
transposed conv takes tap ``t = q*s + r``, so each of the ``s*s`` output phases ``(r_y, r_x)`` is
a stride-1 convolution of the signal with the taps of that phase. Stacking the phases as output
channels gives one ``conv2d`` with ``C_in*s*s`` output channels and a ``ceil(k_eff/s)`` kernel
(the taps padded with zeros to a multiple of ``s``), then one copy lays the phases back on the
grid (``pixel_shuffle``'s layout, :func:`_shuffle`) and padding crops. On the CPU the conv runs
channels-last for float32/16 (oneDNN's faster layout for it). It does the same multiply-adds plus the zero taps' (AlexNet:
``(12/11)^2``, 19 % more) and runs near the forward's rate; the result equals
``conv_transpose2d``'s up to summation order (float64 round-off).

The phases are laid back straight into the cropped output (:func:`_shuffle_crop`, one pass; the
crop is where padding cuts the transposed conv's rim). On the CPU's channels-last path the phases
are ordered ``(r_y, r_x, c)`` and the output is channels-last (:func:`_shuffle_crop_cl`: runs of
``s*C`` contiguous values, 4x faster than the contiguous layout's runs of ``s``), as PyTorch's own
ops keep a channels-last input's layout. A signal of one position (the seed of a
windowed projection at its own conv) is one matrix product with the filters (:func:`_one_position`).

:func:`conv_transpose` picks the formulation by shape: a matrix product for 1x1 signals (no
padding, dilation or groups), sub-pixel for strided, ungrouped convs into at most
:data:`SUBPIXEL_MAX_CHANNELS` phase channels (``C_in*s_y*s_x``), where it measured
2-4x faster (BENCHMARKS.md); ``conv_transpose2d`` everywhere else, where the two ran even or
``conv_transpose2d`` won (3x3 stride-2 convs of 128+ channels, depthwise convs).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Pair = Tuple[int, int]

#: the sub-pixel form is used up to this many phase channels (transposed conv's output channels
#: times the stride's area): AlexNet conv1 has 3*16 = 48, ResNet's stem 3*4 = 12
SUBPIXEL_MAX_CHANNELS = 64

#: on the CPU the sub-pixel conv runs channels-last for these dtypes (oneDNN: 1.4x its
#: contiguous-layout rate on AlexNet conv1's shapes); float64 keeps the contiguous layout
CHANNELS_LAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpu_channels_last(t: Tensor) -> bool:
    """Whether ``t`` is a CPU tensor of a dtype that runs faster channels-last (:data:`CHANNELS_LAST_DTYPES`)."""
    return t.device.type == "cpu" and t.dtype in CHANNELS_LAST_DTYPES


def use_subpixel(weight: Tensor, stride: Pair, groups: int) -> bool:
    """Whether :func:`conv_transpose` takes the sub-pixel form for filters ``weight``
    [C_out, C_in/groups, kh, kw] at ``stride``."""
    sy, sx = stride
    return groups == 1 and sy == sx and sy > 1 and weight.shape[1] * sy * sx <= SUBPIXEL_MAX_CHANNELS


#: lay the phases back straight into the cropped output (:func:`_shuffle_crop`, one pass) rather
#: than onto the whole phase grid and then copying the crop out (two passes over the output)
SHUFFLE_CROP = True

#: on the CPU's channels-last path (float32/16, one group) the phases are ordered ``(r_y, r_x, c)``
#: and laid into a channels-last output: each copied run is then ``s*C`` contiguous values instead
#: of ``s`` (4x faster on AlexNet conv1's shapes); the result is a channels-last [M, C, H, W]
CHANNELS_LAST_OUT = True

#: a signal of one position (a 1x1 map: the seed of a windowed projection at its own conv) goes
#: through the transposed conv as one matrix product ``g [M, C_out] @ weight [C_out, C_in*kh*kw]``:
#: the convolution kernels run such a map at a fraction of their rate
GEMM_ONE_POSITION = True


def _segments(lo: int, n: int, s: int) -> List[Tuple[int, int, int, int, int]]:
    """The rows ``[lo, lo + n)`` of a grid of blocks of ``s`` rows (row ``q*s + r`` is phase ``r`` of
    block ``q``) as runs (out_row, q0, nq, r0, nr): a partial first block, whole blocks, a partial
    last block, each covering blocks ``q0 .. q0+nq-1`` and their phases ``r0 .. r0+nr-1``."""
    out = []
    pos, end = lo, lo + n
    if pos % s and pos < end:
        nr = min(s - pos % s, end - pos)
        out.append((pos - lo, pos // s, 1, pos % s, nr))
        pos += nr
    nq = (end - pos) // s
    if nq:
        out.append((pos - lo, pos // s, nq, 0, s))
        pos += nq * s
    if pos < end:
        out.append((pos - lo, pos // s, 1, 0, end - pos))
    return out


def _shuffle_crop(y: Tensor, s: int, top: int, left: int, H: int, W: int) -> Tensor:
    """``F.pixel_shuffle(y, s)[:, :, top:top+H, left:left+W]`` [M, C, H, W] (contiguous) of ``y``
    [M, C*s*s, h, w] in any memory layout, written straight into the crop: one strided copy per
    pair of row and column runs (:func:`_segments`, at most nine). The crop must lie inside the
    grid (``top + H <= h*s``, ``left + W <= w*s``)."""
    M, Cs, h, w = y.shape
    C = Cs // (s * s)
    src = y.view(M, C, s, s, h, w).permute(0, 1, 4, 2, 5, 3)  # [M, C, h, s, w, s]
    out = y.new_empty((M, C, H, W))
    base = out.storage_offset()
    for oy, qy, nqy, ry, nry in _segments(top, H, s):
        for ox, qx, nqx, rx, nrx in _segments(left, W, s):
            dst = out.as_strided((M, C, nqy, nry, nqx, nrx), (C * H * W, H * W, s * W, W, s, 1),
                                 base + oy * W + ox)
            dst.copy_(src[:, :, qy:qy + nqy, ry:ry + nry, qx:qx + nqx, rx:rx + nrx])
    return out


def _shuffle_crop_cl(y: Tensor, s: int, top: int, left: int, H: int, W: int) -> Tensor:
    """:func:`_shuffle_crop` of phase maps ``y`` [M, s*s*C, h, w] whose channels are ordered
    ``(r_y, r_x, c)`` (not ``(c, r_y, r_x)``) and lie channels-last: the crop [M, C, H, W] in the
    channels-last memory format, one strided copy per pair of row and column runs."""
    M, Cs, h, w = y.shape
    C = Cs // (s * s)
    src = y.permute(0, 2, 3, 1).view(M, h, w, s, s, C).permute(0, 1, 3, 2, 4, 5)  # [M, h, s, w, s, C]
    out = y.new_empty((M, H, W, C))
    base = out.storage_offset()
    for oy, qy, nqy, ry, nry in _segments(top, H, s):
        for ox, qx, nqx, rx, nrx in _segments(left, W, s):
            dst = out.as_strided((M, nqy, nry, nqx, nrx, C), (H * W * C, s * W * C, W * C, s * C, C, 1),
                                 base + (oy * W + ox) * C)
            dst.copy_(src[:, qy:qy + nqy, ry:ry + nry, qx:qx + nqx, rx:rx + nrx])
    return out.permute(0, 3, 1, 2)


def _one_position(g: Tensor, weight: Tensor) -> Tensor:
    """``F.conv_transpose2d(g, weight)`` [M, C_in, kh, kw] of a one-position signal ``g``
    [M, C_out, 1, 1] (no padding, dilation 1, one group; the stride does not matter) as one matrix
    product with the filters ``weight`` [C_out, C_in, kh, kw]."""
    M, C_out = g.shape[:2]
    return (g.reshape(M, C_out) @ weight.reshape(C_out, -1)).view((M,) + tuple(weight.shape[1:]))


def _shuffle(y: Tensor, s: int) -> Tensor:
    """``F.pixel_shuffle(y, s)`` [M, C, h*s, w*s] of ``y`` [M, C*s*s, h, w] in any memory layout, as
    one copy into a contiguous tensor (``pixel_shuffle`` copies slower, the more so from
    channels-last)."""
    M, Cs, h, w = y.shape
    C = Cs // (s * s)
    out = y.new_empty((M, C, h, s, w, s))
    out.copy_(y.view(M, C, s, s, h, w).permute(0, 1, 4, 2, 5, 3))
    return out.view(M, C, h * s, w * s)


def subpixel_conv_transpose(g: Tensor, weight: Tensor, stride: Pair, padding: Pair = (0, 0),
                            output_padding: Pair = (0, 0), dilation: Pair = (1, 1), groups: int = 1) -> Tensor:
    """``F.conv_transpose2d(g, weight, ...)`` for ``g`` [M, C_out, h, w] and ``weight``
    [C_out, C_in/groups, kh, kw] as one forward conv and a ``pixel_shuffle``: [M, C_in, H, W],
    channels-last on the CPU's channels-last path (float32/16, one group: :data:`CHANNELS_LAST_OUT`),
    else contiguous. The stride must be the same along both axes (``pixel_shuffle`` has one factor)."""
    s = stride[0]
    if stride[1] != s:
        raise ValueError(f"subpixel_conv_transpose needs one stride for both axes, got {tuple(stride)}")
    M, C_out, h, w = g.shape
    cig, kh, kw = weight.shape[1:]
    ke = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)  # dilated kernel extent
    Q = (-(-ke[0] // s), -(-ke[1] // s))  # taps per phase
    dense = weight.new_zeros((C_out, cig, Q[0] * s, Q[1] * s))
    dense[:, :, :ke[0]:dilation[0], :ke[1]:dilation[1]] = weight
    H = (h - 1) * s - 2 * padding[0] + ke[0] + output_padding[0]
    W = (w - 1) * s - 2 * padding[1] + ke[1] + output_padding[1]
    fits = SHUFFLE_CROP and padding[0] + H <= (h + Q[0] - 1) * s and padding[1] + W <= (w + Q[1] - 1) * s
    cl = cpu_channels_last(g)
    if cl and fits and CHANNELS_LAST_OUT and groups == 1:
        # K[r_y, r_x, ci | co, a, b] = dense[co, ci, (Q_y-1-a)*s + r_y, (Q_x-1-b)*s + r_x]
        K = dense.view(C_out, cig, Q[0], s, Q[1], s).flip(2, 4).permute(3, 5, 1, 0, 2, 4)
        K = K.reshape(s * s * cig, C_out, Q[0], Q[1]).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(g.contiguous(memory_format=torch.channels_last), K, padding=(Q[0] - 1, Q[1] - 1))
        return _shuffle_crop_cl(y, s, padding[0], padding[1], H, W)
    # K[grp, ci, r_y, r_x | co, a, b] = dense[grp co, ci, (Q_y-1-a)*s + r_y, (Q_x-1-b)*s + r_x]
    K = dense.view(groups, C_out // groups, cig, Q[0], s, Q[1], s).flip(3, 5).permute(0, 2, 4, 6, 1, 3, 5)
    K = K.reshape(groups * cig * s * s, C_out // groups, Q[0], Q[1])
    if cl:  # oneDNN's fast layout here
        g, K = g.contiguous(memory_format=torch.channels_last), K.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(g, K, padding=(Q[0] - 1, Q[1] - 1), groups=groups)
    if fits:
        return _shuffle_crop(y, s, padding[0], padding[1], H, W)
    y = _shuffle(y, s)
    short_h, short_w = max(0, padding[0] + H - y.shape[2]), max(0, padding[1] + W - y.shape[3])
    if short_h or short_w:  # output_padding reaches past the last tap: zeros there
        y = F.pad(y, (0, short_w, 0, short_h))
    return y[:, :, padding[0]:padding[0] + H, padding[1]:padding[1] + W]


def conv_transpose(g: Tensor, weight: Tensor, stride: Pair, padding: Pair = (0, 0), output_padding: Pair = (0, 0),
                   dilation: Pair = (1, 1), groups: int = 1) -> Tensor:
    """``F.conv_transpose2d`` [M, C_in, H, W] of ``g`` [M, C_out, h, w], in the faster formulation
    for the shape (see the module docstring); the same numbers to round-off."""
    stride, padding = tuple(stride), tuple(padding)
    output_padding, dilation = tuple(output_padding), tuple(dilation)
    if GEMM_ONE_POSITION and g.shape[-2:] == (1, 1) and groups == 1 and padding == (0, 0) \
            and output_padding == (0, 0) and dilation == (1, 1):
        return _one_position(g, weight)
    if use_subpixel(weight, stride, groups):
        return subpixel_conv_transpose(g, weight, stride, padding, output_padding, dilation, groups)
    return F.conv_transpose2d(g, weight, stride=stride, padding=padding, output_padding=output_padding,
                              groups=groups, dilation=dilation)


__all__ = ["conv_transpose", "subpixel_conv_transpose", "use_subpixel", "SUBPIXEL_MAX_CHANNELS"]
