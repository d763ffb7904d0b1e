"""Occlusion sensitivity (ZF Fig. 7) on one 224 px image, CPU, float32: deconvis's exact incremental
pass vs Captum's ``Occlusion`` and vs the naive forward of every occluded copy.

For VGG16, AlexNet and ResNet-50 (torchvision, random weights, seeded), a 32 px square, stride 8
(25 x 25 = 625 positions), the image's mean colour as the fill/baseline:

* deconvis: :class:`IncrementalOcclusion` (trace, clean forward and RF table included), producing
  (b) the total activation of the strongest last-conv map, (d) the target-class probability and
  (e) the most probable class for every position;
* Captum: ``Occlusion.attribute`` with the same square, stride and baseline on the softmax output
  for the target class; ``perturbations_per_eval`` 1, 16 and 64 are each timed on a trial grid
  (stride 24: 81 positions), the fastest then runs the full 625 positions;
* naive: the plain forward of the occluded copies at its faster batch size (64 or 1; timed on 64
  and on 8 copies, scaled to 625 positions): what the incremental pass saves time against;
* bound: the multiply-adds (convs and Linears) of the naive forwards over those the incremental
  pass performed; "% of bound" = (naive time / deconvis time) / bound.

Times are the process's CPU time (``time.process_time``, one torch thread by default): on a
shared, oversubscribed machine wall time swings with the other users' load (2x between two
batches is common), CPU time much less; every number of a row comes from the same process.

    python benchmarks/bench_occlusion.py [--models vgg16,alexnet,resnet50] [--record]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import cv2
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import record, table  # noqa: E402

from deconvis.analysis.occlusion import grid  # noqa: E402
from deconvis.analysis.occlusion_engine import IncrementalOcclusion  # noqa: E402
from deconvis.mirror.deconvnet import DeconvNet  # noqa: E402

SIZE, STRIDE, BATCH = 32, 8, 64


def image() -> torch.Tensor:
    import skimage.data as d

    img = cv2.resize(d.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x - mean) / std)[None]


def ours(model: torch.nn.Module, x: torch.Tensor, fill: torch.Tensor, layer: str, tops: torch.Tensor):
    """(seconds, engine, maps) for the whole incremental run, trace and clean pass included."""
    t0 = time.process_time()
    eng = IncrementalOcclusion(model, x, (SIZE, SIZE), [layer])
    chan = int(eng.clean[eng.tg.node(eng.layers[0])][0].flatten(1).amax(1).argmax())
    target = int(eng.clean[eng.output].argmax())
    act, prob, cls, logits = [], [], [], []
    for chunk in tops.split(BATCH):
        out = eng.run(chunk, fill)
        p = torch.softmax(out.logits, -1)
        act.append(out.sums[eng.layers[0]][:, chan])
        prob.append(p[:, target])
        cls.append(p.argmax(-1))
        logits.append(out.logits[:2])
    return time.process_time() - t0, eng, (torch.cat(act), torch.cat(prob), torch.cat(cls), target)


def naive_logits(model, x, fill, tops):
    xs = x.repeat(len(tops), 1, 1, 1)
    for i, (y, x0) in enumerate(tops.tolist()):
        xs[i, :, y:y + SIZE, x0:x0 + SIZE] = fill[:, None, None]
    with torch.no_grad():
        return model(xs)


def naive_seconds(model, x, fill, tops) -> float:
    """Plain forward of the occluded copies at its faster batch size (one batch of 64, or eight
    single copies, timed), scaled to all positions."""
    t0 = time.process_time()
    naive_logits(model, x, fill, tops[:BATCH])
    per_batch = (time.process_time() - t0) / BATCH
    t0 = time.process_time()
    for k in range(8):
        naive_logits(model, x, fill, tops[BATCH + k:BATCH + k + 1])
    per_single = (time.process_time() - t0) / 8
    return min(per_batch, per_single) * len(tops)


def captum_seconds(model, x, fill, target, stride, ppe) -> float:
    from captum.attr import Occlusion

    def fwd(inp):
        return torch.softmax(model(inp), -1)

    occ = Occlusion(fwd)
    base = fill[None, :, None, None].expand_as(x).contiguous()
    t0 = time.process_time()
    with torch.no_grad():
        occ.attribute(x, sliding_window_shapes=(3, SIZE, SIZE), strides=(3, stride, stride), baselines=base,
                      target=target, perturbations_per_eval=ppe)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16,alexnet,resnet50")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, oversubscribed machine OpenMP's spinning "
                         "threads make small copies erratic; every variant gets the same)")
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = image()
    fill = x[0].mean((1, 2))
    H, W = x.shape[-2:]
    tops = torch.tensor([(y, x0) for y in grid(H, SIZE, STRIDE) for x0 in grid(W, SIZE, STRIDE)])
    trial_positions = len(grid(H, SIZE, 24)) ** 2
    load0 = os.getloadavg()
    rows, notes = [], []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        layer = DeconvNet(model).conv_layers()[-1]
        t_ours, eng, (act, prob, cls, target) = ours(model, x, fill, layer, tops)
        # exactness check against the naive forward on 8 positions spread over the grid
        pick = tops[torch.linspace(0, len(tops) - 1, 8).long()]
        ref = naive_logits(model, x, fill, pick)
        e2 = IncrementalOcclusion(model, x, (SIZE, SIZE), [layer], graph=eng.tg, mirror=eng.mirror)
        got = e2.run(pick, fill).logits
        err = float((got - ref).abs().max() / ref.abs().max())
        t_naive = naive_seconds(model, x, fill, tops)
        trials = {ppe: captum_seconds(model, x, fill, target, 24, ppe) / trial_positions for ppe in (1, 16, 64)}
        best_ppe = min(trials, key=trials.get)
        t_captum = captum_seconds(model, x, fill, target, STRIDE, best_ppe)
        bound = eng.bound
        rows.append([name, layer, len(tops), f"{t_ours:.1f}", f"{t_captum:.1f} (ppe {best_ppe})",
                     f"**{t_captum / t_ours:.2f}x**", f"{t_naive:.1f}", f"{t_naive / t_ours:.2f}x", f"{bound:.2f}x",
                     f"{100 * t_naive / t_ours / bound:.0f}%", f"{err:.1e}"])
        notes.append(f"{name}: Captum trial s/position " + ", ".join(f"ppe {k}: {v:.3f}" for k, v in trials.items())
                     + (f"; computed in full (not windowable): {', '.join(eng.fallback)}" if eng.fallback else ""))
        print(table(["model", "layer (b)", "positions", "deconvis CPU s", "Captum CPU s", "Captum / deconvis",
                     "naive CPU s",
                     "naive / deconvis", "bound", "% of bound", "max rel. diff"], rows[-1:]), flush=True)
    load1 = os.getloadavg()
    header = ["model", "layer (b)", "positions", "deconvis CPU s", "Captum CPU s", "Captum / deconvis", "naive CPU s",
              "naive / deconvis", "arithmetic bound", "% of bound", "max rel. diff (8 positions)"]
    body = table(header, rows)
    body += (f"\n\n{SIZE} px square, stride {STRIDE}, fill = the image's mean colour (Captum: the same baseline), "
             "one 224 px scikit-image photo (chelsea), random weights, float32, CPU, "
             f"{torch.get_num_threads()} torch thread(s) for every variant. deconvis time includes the "
             "trace, the clean forward and the RF table, and produces (b), (d) and (e) for every position; Captum "
             f"produces the attribution of one target. Captum's perturbations_per_eval picked by a {trial_positions}-"
             "position trial (stride 24) of 1, 16 and 64; naive = the plain forward of occluded copies at its faster batch size (64 or 1; timed on 64 and 8 copies, scaled). "
             "Bound = naive multiply-adds / incremental multiply-adds (convs and Linears). "
             "Times are CPU seconds of the benchmark process (time.process_time): the machine was shared "
             f"(load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end on 2 cores), which makes wall "
             "times swing by up to 2x between batches; CPU time is far steadier.\n\n"
             + "\n".join(f"- {n}" for n in notes))
    print()
    print(body)
    if args.record:
        record("Occlusion", "Written by benchmarks/bench_occlusion.py.\n\n" + body)


if __name__ == "__main__":
    main()
