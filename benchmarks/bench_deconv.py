"""Projections per second for the ZF Fig. 2 workload: the top unit of every channel of every
AlexNet conv layer (224 px, CPU, float32), by

(a) Captum's ``NeuronDeconvolution``, one unit per call (a full forward + backward each);
(b) deconvis's full-image mirror, batched;
(c) deconvis's windowed mirror (each unit's receptive-field cone only), batched;

with the plain forward pass's images/s as the yardstick, and the agreement of (c) with (b) and
of Captum with deconvis in float64 (Captum seeds 1, deconvis seeds the activation: compared
after rescaling).

Captum is timed on a sample of units per layer (``--captum-units``); its per-layer rate times
the layer's channel count gives its time for the whole workload.

    python benchmarks/bench_deconv.py [--images 8] [--captum-units 12] [--record]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import cv2
import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_time, machine, record, table  # noqa: E402

from deconvis.mirror.deconvnet import DeconvNet  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right", "immunohistochemistry",
          "hubble_deep_field", "retina", "colorwheel"]


def photos(n: int) -> torch.Tensor:
    import skimage.data as d

    out = []
    for name in PHOTOS:
        if len(out) == n:
            break
        try:
            img = getattr(d, name)()
        except Exception:
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = cv2.resize(np.ascontiguousarray(img[..., :3]), (224, 224), interpolation=cv2.INTER_AREA)
        out.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255.0)
    while len(out) < n:
        out.append(out[len(out) % len(PHOTOS)].flip(-1))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (torch.stack(out) - mean) / std


def captum_agreement_float64(model: torch.nn.Module) -> float:
    """Max relative difference between Captum's NeuronDeconvolution and deconvis, float64."""
    import copy

    from captum.attr import NeuronDeconvolution

    m = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dn = DeconvNet(m)
    dn.forward(x)
    worst = 0.0
    for layer in dn.conv_layers():
        for u in dn.strongest(layer, 1)[:2].tolist():
            ours = dn.project(layer, [u])[0] / dn._acts[layer][u[0], u[1], u[2], u[3]]
            attr = NeuronDeconvolution(m, m.get_submodule(layer)).attribute(
                x[u[0]:u[0] + 1], neuron_selector=tuple(u[1:]))[0]
            worst = max(worst, float((attr - ours).norm() / ours.norm()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--captum-units", type=int, default=12, help="units per layer timed with Captum")
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval()
    x = photos(args.images)
    dn = DeconvNet(model)

    with torch.inference_mode():
        t_fwd = best_time(lambda: model(x))
    fwd_ips = args.images / t_fwd

    dn.forward(x)
    rows, tot = [], {"a": 0.0, "b": 0.0, "c": 0.0, "units": 0}
    worst_cb, worst_ab = 0.0, 0.0
    from captum.attr import NeuronDeconvolution

    for layer in dn.conv_layers():
        units = dn.strongest(layer, k=1)  # the top unit of every channel over the image set
        n = len(units)
        t_b = best_time(lambda: dn.project(layer, units, batch_size=64), repeat=1)
        full = dn.project(layer, units, batch_size=64)
        t_c = best_time(lambda: dn.project_window(layer, units), repeat=2)
        rec, boxes = dn.project_window(layer, units)
        pasted = torch.zeros_like(full)
        for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
            cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, 224), max(x0, 0), min(x1, 224)
            pasted[i, :, cy0:cy1, cx0:cx1] = rec[i, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        worst_cb = max(worst_cb, float((pasted - full).norm() / full.norm()))

        module = model.get_submodule(layer)
        nd = NeuronDeconvolution(model, module)
        sample = units[torch.linspace(0, n - 1, min(n, args.captum_units)).long()]
        acts = dn._acts[layer]
        t0 = time.perf_counter()
        for u in sample.tolist():
            nd.attribute(x[u[0]:u[0] + 1], neuron_selector=(u[1], u[2], u[3]))
        t_a = (time.perf_counter() - t0) / len(sample) * n

        tot["a"] += t_a
        tot["b"] += t_b
        tot["c"] += t_c
        tot["units"] += n
        rows.append([f"{dn.display_name(layer)} ({layer})", n, f"{n / t_a:.1f}", f"{n / t_b:.1f}", f"{n / t_c:.1f}",
                     f"{t_a / t_c:.1f}x"])
        print(f"{layer}: {n} units  captum {n / t_a:.1f}/s  full {n / t_b:.1f}/s  window {n / t_c:.1f}/s", flush=True)
    rows.append(["**whole workload**", tot["units"], f"{tot['units'] / tot['a']:.1f}", f"{tot['units'] / tot['b']:.1f}",
                 f"{tot['units'] / tot['c']:.1f}", f"**{tot['a'] / tot['c']:.1f}x**"])
    worst_ab = 0.0
    body = table(["layer", "units", "(a) Captum proj/s", "(b) full proj/s", "(c) windowed proj/s", "(c)/(a)"], rows)
    body += (f"\n\nWorkload time: (a) {tot['a']:.1f} s, (b) {tot['b']:.1f} s, (c) {tot['c']:.2f} s. "
             f"Plain forward pass: {fwd_ips:.1f} images/s (batch {args.images}). "
             f"Max relative difference (c) vs (b): {worst_cb:.1e}. AlexNet random weights, {args.images} scikit-image photos, "
             f"float32; Captum timed on {args.captum_units} units per layer.")
    worst_ab = captum_agreement_float64(model)
    body += (f" Captum vs deconvis in float64 (2 units per layer, 2 images of 96 px): max relative "
             f"difference {worst_ab:.1e} (in float32, single-image vs batched forward round-off can flip "
             "near-tied max-pool switches, so float32 results differ by a few per cent on some units).")
    print()
    print(machine())
    print(body)
    if args.record:
        record("Deconvnet projections (benchmarks/bench_deconv.py)", body)


if __name__ == "__main__":
    main()
