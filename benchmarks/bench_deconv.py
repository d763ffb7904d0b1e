"""Projections per second for the ZF Fig. 2 workload on CPU, float32, 224 px: the top unit of every
channel of every AlexNet conv layer, and of the first 64 channels of each ResNet-50 stage
(``layer1`` .. ``layer4``, the output of the stage), of four MobileNetV2 stages and (32 channels)
of VGG16's conv2_2, conv3_3, conv4_3 and conv5_3, by

(a) Captum's ``NeuronDeconvolution`` called the way its users call it: on the unit's own image,
    one unit per call (a full forward + backward each);
(b) deconvis's full-image mirror, batched;
(c) deconvis's windowed mirror (each unit's receptive-field cone only), batched;

(b) and (c) inside ``DeconvNet.fixed_weights()``, as a run's projection phase calls them;

with the plain forward pass's images/s as the yardstick; each projection path's multiply-add rate
over the forward's (the forward up to the layer on the same machine, threads and a batch of
``BATCH`` images, in the faster of the contiguous and channels-last layouts: the bound for a projection, which does the same multiply-adds transposed); and
the agreement of (c) with (b) and
(AlexNet) of Captum with deconvis in float64 (Captum seeds 1, deconvis seeds the activation:
compared after rescaling).

Captum is timed on a sample of units per layer (``--captum-units``); its per-layer rate times
the layer's unit count gives its time for the whole workload.

    python benchmarks/bench_deconv.py [--images 8] [--captum-units 12] [--models alexnet,resnet50,vgg16,mobilenet_v2] [--record]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import cv2
import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_time, publish, table  # noqa: E402

from deconvis.mirror.deconvnet import WINDOW_WORK_LIMIT, DeconvNet  # noqa: E402

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
    base = len(out)  # the photos this scikit-image has (some need a download): mirrored copies fill up to n
    while len(out) < n:
        out.append(out[len(out) % base].flip(-1))
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
            ours = dn.project(layer, [u])[0] / dn._acts[dn.resolve(layer)][u[0], u[1], u[2], u[3]]
            attr = NeuronDeconvolution(m, m.get_submodule(dn.resolve(layer))).attribute(
                x[u[0]:u[0] + 1], neuron_selector=tuple(u[1:]))[0]
            worst = max(worst, float((attr - ours).norm() / ours.norm()))
    return worst


WORKLOADS = {
    # model name -> (layers (None: conv_layers()), channels per layer (None: all), time Captum)
    "alexnet": (None, None, True),
    "resnet50": (["layer1", "layer2", "layer3", "layer4"], 64, True),
    "vgg16": (["features.8", "features.15", "features.22", "features.29"], 32, False),
    "mobilenet_v2": (["features.3", "features.6", "features.13", "features.18"], 64, False),
}

#: units per full-path chunk, and the batch of the forward that sets the bound
BATCH = 32


def _num(v: float, unit: str = "") -> str:
    """``v`` with one decimal (and ``unit``), or n/a when not measured (NaN)."""
    return "n/a" if v != v else f"{v:.1f}{unit}"


def cpu_time(fn, repeat: int = 2) -> float:
    """Best CPU time of the process over ``repeat`` calls, seconds (after one warm-up call): on a
    shared machine far steadier than wall time, and the same clock for every variant."""
    return best_time(fn, repeat, clock=time.process_time)


def node_macs(dn: DeconvNet, target, window=None) -> tuple:
    """Multiply-adds per image of the convs, Linears and pools on ``target``'s path: (forward,
    projection). The forward counts every output of a conv (C_out*h*w*C_in/groups*kh*kw), Linear
    (in*out) and pool (C*h*w*kh*kw); the projection counts what its backward does: the transposed
    conv and Linear likewise, an unpool one add per pooled value (an avg-pool's transposed conv
    kh*kw), on the full maps, or with ``window`` (a WindowPlan) on each node's cone window only."""
    fwd = proj = 0
    env, mirror = dn._env, dn.mirror
    for n in mirror.ancestors(target):
        op = mirror.ops[n]
        val = env.get(n)
        if op.kind not in ("conv", "linear", "maxpool", "avgpool", "generic") or not isinstance(val, torch.Tensor):
            continue
        if op.kind == "linear":
            m = op.module
            fwd += m.in_features * m.out_features
            proj += m.in_features * m.out_features
            continue
        if val.dim() != 4:
            continue
        C, H, W = val.shape[1:]
        if op.kind == "generic":
            m = op.module
            if isinstance(m, torch.nn.Conv2d):  # convs the mirror differentiates by autograd
                per = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                fwd += C * H * W * per
                proj += C * H * W * per
            continue
        k = op.win["k"]
        per = (op.module.in_channels // op.module.groups) * k[0] * k[1] if op.kind == "conv" else k[0] * k[1]
        fwd += C * H * W * per
        h, w = H, W
        if window is not None:
            ay, ax = window.axes[n]
            h, w = min(ay.size, H), min(ax.size, W)
        proj += C * h * w * (1 if op.kind == "maxpool" else per)
    return fwd, proj


def bench_model(name: str, x: torch.Tensor, captum_units: int, only_layers=None, max_units=None) -> tuple:
    """Rows of the table for one model, its totals, and the worst (c) vs (b) difference;
    ``only_layers`` (names or 1-based positions in the workload) and ``max_units`` (channels per
    layer) shorten the run."""
    from captum.attr import NeuronDeconvolution

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    layers, channels, use_captum = WORKLOADS[name]
    if max_units is not None:
        channels = min(channels or max_units, max_units)
    dn = DeconvNet(model)
    # the bound's forward also runs channels-last (the windowed projection does on the CPU): the
    # faster of the two layouts is the forward's rate
    dn_cl = DeconvNet(copy.deepcopy(model).to(memory_format=torch.channels_last))
    with torch.inference_mode():
        t_fwd = cpu_time(lambda: model(x), repeat=2)
    xb = x.repeat((BATCH + len(x) - 1) // len(x), 1, 1, 1)[:BATCH]  # the bound's batch: BATCH images
    xb_cl = xb.contiguous(memory_format=torch.channels_last)
    dn.forward(x)
    rows, tot, worst_cb = [], {"a": 0.0, "b": 0.0, "c": 0.0, "units": 0}, 0.0
    H, W = x.shape[-2:]
    todo = layers or dn.conv_layers()
    if only_layers:
        todo = [l for i, l in enumerate(todo, 1) if l in only_layers or str(i) in only_layers
                or dn.display_name(l) in only_layers]
    for layer in todo:
        units = dn.strongest(layer, k=1)  # the top unit of every channel over the image set
        if channels is not None:
            units = units[:channels]
        n = len(units)
        target = dn.graph.node(dn.resolve(layer))
        t_f = min(cpu_time(lambda: dn.activations(xb, [layer]), repeat=2),  # forward up to the layer, batch BATCH,
                  cpu_time(lambda: dn_cl.activations(xb_cl, [layer]), repeat=2))  # the faster layout
        with dn.fixed_weights():  # as the projection phase of a run: the filters prepared once
            t_b = cpu_time(lambda: dn.project(layer, units, batch_size=BATCH), repeat=1)
            full = dn.project(layer, units, batch_size=BATCH)
            t_c = cpu_time(lambda: dn.project_window(layer, units), repeat=2)
            rec, boxes = dn.project_window(layer, units)
        pasted = torch.zeros_like(full)
        for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
            cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
            pasted[i, :, cy0:cy1, cx0:cx1] = rec[i, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        worst_cb = max(worst_cb, float((pasted - full).norm() / full.norm()))

        t_a = float("nan")
        if use_captum and captum_units > 0:
            nd = NeuronDeconvolution(model, model.get_submodule(layer if layers else dn.resolve(layer)))
            sample = units[torch.linspace(0, n - 1, min(n, captum_units)).long()]
            t0 = time.process_time()
            for u in sample.tolist():
                nd.attribute(x[u[0]:u[0] + 1], neuron_selector=(u[1], u[2], u[3]))
            t_a = (time.process_time() - t0) / len(sample) * n

        # multiply-add rates: the forward to the layer (BATCH images) against each projection path
        plan = dn.window_plan(layer)
        f_img, p_full = node_macs(dn, target)
        windowed = plan is not None and plan.work <= WINDOW_WORK_LIMIT
        p_win = node_macs(dn, target, plan)[1] if windowed else p_full
        rate_f = f_img * BATCH / t_f
        eff_b = p_full * n / t_b / rate_f
        eff_c = p_win * n / t_c / rate_f

        for key, t in (("a", t_a), ("b", t_b), ("c", t_c)):
            tot[key] += t
        tot["units"] += n
        work = f"{plan.work:.3f}" if plan is not None else "1 (full)"
        if plan is not None and not windowed:
            work += " (cut)"
        rows.append([f"{name} {dn.display_name(layer)}", n, _num(n / t_a), f"{n / t_b:.1f}", f"{n / t_c:.1f}",
                     _num(t_a / t_c, "x"), f"{t_b / t_c:.1f}x", work, f"{rate_f / 1e9:.1f}",
                     f"{eff_b:.2f}", f"{eff_c:.2f}"])
        print(f"{name} {layer}: {n} units  captum {n / t_a:.1f}/s  full {n / t_b:.1f}/s  window {n / t_c:.1f}/s  "
              f"fwd {rate_f / 1e9:.1f} GMAC/s  full {eff_b:.2f}  window {eff_c:.2f} of it", flush=True)
    rows.append([f"**{name} workload**", tot["units"], _num(tot['units'] / tot['a']),
                 f"{tot['units'] / tot['b']:.1f}", f"{tot['units'] / tot['c']:.1f}",
                 f"**{_num(tot['a'] / tot['c'], 'x')}**", f"{tot['b'] / tot['c']:.1f}x", "", "", "", ""])
    return rows, tot, worst_cb, len(x) / t_fwd, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--captum-units", type=int, default=12, help="units per layer timed with Captum")
    ap.add_argument("--models", default="alexnet,resnet50,vgg16,mobilenet_v2",
                    help="comma separated: " + ", ".join(WORKLOADS))
    ap.add_argument("--layers", default="", help="comma separated layers to run (names, aliases or 1-based "
                    "positions in each model's workload); default: all")
    ap.add_argument("--units", type=int, default=None, help="at most this many channels (units) per layer")
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    only = {v.strip() for v in args.layers.split(",") if v.strip()}
    x = photos(args.images)
    rows, notes, alexnet = [], [], None
    load0 = os.getloadavg()[0]
    for name in args.models.split(","):
        r, tot, worst_cb, fwd_ips, model = bench_model(name.strip(), x, args.captum_units, only, args.units)
        rows += r
        notes.append(f"{name}: workload time (a) {_num(tot['a'], ' s')}, (b) {tot['b']:.1f} s, (c) {tot['c']:.2f} s; "
                     f"plain forward {fwd_ips:.1f} images/s (batch {args.images}); max relative difference "
                     f"(c) vs (b) {worst_cb:.1e}.")
        if name == "alexnet":
            alexnet = model
    body = table(["layer", "units", "(a) Captum proj/s", "(b) full proj/s", "(c) windowed proj/s", "(c)/(a)",
                  "(c)/(b)", "cone work", "fwd GMAC/s", "(b) MAC/s / fwd", "(c) MAC/s / fwd"], rows)
    body += "\n\n" + "\n".join(f"- {n}" for n in notes)
    body += (f"\n- Random weights, {args.images} scikit-image photos at 224 px, float32, CPU; Captum called on the "
             f"unit's own image, one unit per call, timed on {args.captum_units} units per layer (VGG16 and "
             f"MobileNetV2: not timed, n/a). Times are CPU seconds of the benchmark process (best of 2-3 "
             f"calls after a warm-up): the machine was shared with other work (load average {load0:.1f} "
             f"before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores), which swings wall times; "
             "CPU time is far steadier.")
    body += (f"\n- MAC/s over forward: multiply-adds counted from the shapes (convs C_out*h*w*C_in/groups*kh*kw, "
             f"Linears in*out, pools kh*kw per output; an unpool one add per value) on the layer's path; the "
             f"forward is the mirror's own forward up to the layer on {BATCH} images (the full path's chunk), in the "
             "faster of the contiguous and channels-last layouts, "
             "the projections count their real work: every map for (b), each unit's cone windows for (c) "
             "(rows marked cut take the full path and cut it to the box, so they count full maps). 1.0 means "
             "the projection runs at the forward's multiply-add rate on this machine, batch and threads.")
    body += ("\n- Cone work: the share of the full backward's multiply-adds the windowed path does (channel-weighted "
             "window area over map area, summed over the unit's path; above 0.6 project_window runs the full path "
             "and cuts it to the box). Captum does a forward and a backward per unit, so (c)/(a) cannot much exceed "
             "about 2 / cone work: deep ResNet-50 stages at 224 px (RF 267 and 427 px) see the whole image and their "
             "cones cover the whole maps, which caps those rows near 2x whatever the implementation.")
    if alexnet is not None:
        worst_ab = captum_agreement_float64(alexnet)
        body += (f"\n- Captum vs deconvis in float64 (AlexNet, 2 units per layer, 2 images of 96 px): max relative "
                 f"difference {worst_ab:.1e} (in float32, single-image vs batched forward round-off can flip "
                 "near-tied max-pool switches, so float32 results differ by a few per cent on some units).")
    print()
    publish("Deconvnet projections (benchmarks/bench_deconv.py)", body, args.record)


if __name__ == "__main__":
    main()
