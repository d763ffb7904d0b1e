"""The transposed convolutions of AlexNet's mirror against the forward convolutions, per
formulation PyTorch offers on this CPU: the rate that caps issue 18's projection column.

For each AlexNet conv (random weights, float32, a batch of ``--batch`` 224 px images, the maps the
forward gives) the multiply-adds of the conv (C_out*h*w*C_in*kh*kw, the same count both ways) over
the best of ``--repeat`` wall times of

- the forward ``conv2d`` in the faster of the contiguous and channels-last layouts (the bound);
- ``conv_transpose2d`` of a signal of the conv's output shape, contiguous and channels-last;
- for stride-1 convs, ``conv2d`` of the signal with the flipped, transposed filters (the same
  numbers); for strided ones deconvis's sub-pixel form (``deconvis.mirror.tconv``, channels-last
  signal given, as the windowed path gives it, and contiguous, as the full path's unpool gives it);
- a matrix product with the filters and ``F.fold`` (col2im);

then the same for conv1 on the windowed path's small windows (the signal of ``--units`` units'
conv1 output windows of conv2's and conv5's cones, 11x11 and 39x39 positions), where the counted
multiply-adds are the window's: the sub-pixel conv's extra zero taps (12x12 for 11x11) and the rim
of its phase grid show as a rate below the forward's.

    python benchmarks/bench_tconv.py [--batch 32] [--units 192] [--repeat 5] [--record]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_time, publish, table  # noqa: E402

from deconvis.mirror.tconv import subpixel_conv_transpose  # noqa: E402

CL = torch.channels_last


def rate(macs: float, fn, repeat: int) -> float:
    """GMAC/s of ``fn`` (best wall time of ``repeat`` calls after a warm-up)."""
    return macs / best_time(fn, repeat) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--units", type=int, default=192, help="units of the small-window rows")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    rows, bound = [], {}
    names = {0: "conv1", 3: "conv2", 6: "conv3", 8: "conv4", 10: "conv5"}
    with torch.inference_mode():
        h = x
        for i, layer in enumerate(model.features):
            if isinstance(layer, torch.nn.Conv2d):
                w, s, p = layer.weight, layer.stride, layer.padding
                y = layer(h)
                C, H, W = y.shape[1:]
                macs = args.batch * C * H * W * layer.in_channels * w.shape[2] * w.shape[3]
                hc, wc = h.contiguous(memory_format=CL), w.contiguous(memory_format=CL)
                fwd = max(rate(macs, lambda: F.conv2d(h, w, None, s, p), args.repeat),
                          rate(macs, lambda: F.conv2d(hc, wc, None, s, p), args.repeat))
                bound[names.get(i, str(i))] = fwd
                g = torch.randn_like(y)
                gc = g.contiguous(memory_format=CL)
                r = {"convT": rate(macs, lambda: F.conv_transpose2d(g, w, None, s, p), args.repeat),
                     "convT cl": rate(macs, lambda: F.conv_transpose2d(gc, wc, None, s, p), args.repeat)}
                if s == (1, 1):
                    wf = w.transpose(0, 1).flip(2, 3).contiguous(memory_format=CL)
                    pf = (w.shape[2] - 1 - p[0], w.shape[3] - 1 - p[1])
                    r["flipped conv2d"] = rate(macs, lambda: F.conv2d(gc, wf, None, 1, pf), args.repeat)
                    r["sub-pixel (cl in)"] = r["sub-pixel (contig. in)"] = float("nan")
                else:
                    r["flipped conv2d"] = float("nan")
                    r["sub-pixel (cl in)"] = rate(macs, lambda: subpixel_conv_transpose(gc, w, s, p), args.repeat)
                    r["sub-pixel (contig. in)"] = rate(macs, lambda: subpixel_conv_transpose(g, w, s, p), args.repeat)
                wt = w.reshape(C, -1).t().contiguous()

                def gemm_fold():
                    col = wt @ g.reshape(args.batch, C, H * W)
                    return F.fold(col, h.shape[-2:], w.shape[-2:], padding=p, stride=s)

                r["matmul + fold"] = rate(macs, gemm_fold, args.repeat)
                best = max(v for v in r.values() if v == v)
                rows.append([names.get(i, str(i)), f"{macs / args.batch / 1e6:.0f}", f"{fwd:.0f}"]
                            + [("n/a" if v != v else f"{v:.0f}") for v in r.values()] + [f"{best / fwd:.2f}"])
            h = layer(h)
        # conv1 on the windowed path's small windows: the counted multiply-adds are the window's
        conv1 = model.features[0]
        w = conv1.weight
        for cone, side in (("conv2", 11), ("conv5", 39)):
            g = torch.randn(args.units, 64, side, side).contiguous(memory_format=CL)
            macs = args.units * 64 * side * side * 3 * 121
            sub = rate(macs, lambda: subpixel_conv_transpose(g, w, (4, 4)), args.repeat)
            ct = rate(macs, lambda: F.conv_transpose2d(g, w.contiguous(memory_format=CL), None, 4), args.repeat)
            rows.append([f"conv1 in {cone}'s cone ({args.units} windows of {side}x{side})",
                         f"{macs / args.units / 1e6:.1f} per unit", f"{bound['conv1']:.0f}",
                         "n/a", f"{ct:.0f}", "n/a", f"{sub:.0f}", "n/a", "n/a", f"{max(sub, ct) / bound['conv1']:.2f}"])
    body = table(["conv", "MMAC per image", "forward GMAC/s (bound)", "conv_transpose2d", "conv_transpose2d cl",
                  "flipped conv2d", "sub-pixel, cl signal", "sub-pixel, contiguous signal", "matmul + F.fold",
                  "best / forward"], rows)
    body += (f"\n\n- AlexNet, random weights, float32, batch {args.batch} at 224 px, {torch.get_num_threads()} threads; "
             f"GMAC/s of the conv's own multiply-add count, best wall time of {args.repeat} calls. The sub-pixel "
             "form does (12/11)^2 more multiply-adds for conv1 (zero taps) plus the rim of its phase grid; its "
             "contiguous-signal column includes the copy to channels-last that the full path's unpooled signal "
             "needs. The small-window rows count the windows' multiply-adds (64 x side^2 x 363 per unit).")
    publish("Transposed convolutions against the forward (benchmarks/bench_tconv.py)", body, args.record)


if __name__ == "__main__":
    main()
