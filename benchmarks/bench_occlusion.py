"""Occlusion sensitivity (ZF Fig. 7) on one 224 px image, CPU, float32: deconvis's exact incremental
pass vs Captum's ``Occlusion`` and vs the naive forward of every occluded copy, at several grids.

For VGG16, AlexNet and ResNet-50 (torchvision, random weights, seeded), a 32 px square at strides
8, 16 and 32 (625, 169 and 49 positions), the image's mean colour as the fill/baseline:

* deconvis: :class:`IncrementalOcclusion` (trace, RF table and clean forward included), producing
  (b) the total activation of the strongest last-conv map, (d) the target-class probability and
  (e) the most probable class for every position; the fixed costs (trace, RF table, clean pass)
  and the batches are timed apart;
* Captum: ``Occlusion.attribute`` with the same square, stride and baseline on the softmax output
  for the target class, at its best ``perturbations_per_eval`` of 1, 16 and 64: on grids of at
  most 64 positions each is timed on the grid itself, on larger ones the fastest on a trial grid
  (stride 24: 81 positions) runs the full grid;
* naive: the plain forward of the occluded copies at its faster batch size (64 or 1; timed on 64
  and on 8 copies, scaled to the grid): what the incremental pass saves time against;
* bound: the multiply-adds (convs and Linears) of the naive forwards over those the incremental
  pass performed; "% of bound" = (Captum time / deconvis time) / bound, and the same with the
  naive time.

Times are the process's CPU time (``time.process_time``, one torch thread by default): on a
shared, oversubscribed machine wall time swings with the other users' load (2x between two
batches is common), CPU time much less; every number of a row comes from the same process.

    python benchmarks/bench_occlusion.py [--models vgg16,alexnet,resnet50] [--strides 8,16,32] [--record]
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
from deconvis.graph.rf import table_from_traced  # noqa: E402
from deconvis.graph.trace import trace_graph  # noqa: E402
from deconvis.mirror.deconvnet import DeconvNet  # noqa: E402

SIZE, BATCH = 32, 64


def image() -> torch.Tensor:
    import skimage.data as d

    img = cv2.resize(d.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x - mean) / std)[None]


def ours(model: torch.nn.Module, x: torch.Tensor, fill: torch.Tensor, layer: str, tops: torch.Tensor):
    """(seconds, engine, maps, parts) for the whole incremental run, trace, RF table and clean pass
    included; ``parts`` splits the seconds into those and the batches."""
    parts = {}
    t0 = time.process_time()
    tg = trace_graph(model)
    t1 = time.process_time()
    table = table_from_traced(tg, tuple(x.shape[-2:]), int(x.shape[1]))
    t2 = time.process_time()
    eng = IncrementalOcclusion(model, x, (SIZE, SIZE), [layer], graph=tg, table=table)
    chan = int(eng.clean[eng.tg.node(eng.layers[0])][0].flatten(1).amax(1).argmax())
    target = int(eng.clean[eng.output].argmax())
    t3 = time.process_time()
    parts.update(trace=t1 - t0, rf_table=t2 - t1, clean_pass=t3 - t2)
    act, prob, cls = [], [], []
    for chunk in tops.split(BATCH):
        out = eng.run(chunk, fill)
        p = torch.softmax(out.logits, -1)
        act.append(out.sums[eng.layers[0]][:, chan])
        prob.append(p[:, target])
        cls.append(p.argmax(-1))
    t4 = time.process_time()
    parts["batches"] = t4 - t3
    return t4 - t0, eng, (torch.cat(act), torch.cat(prob), torch.cat(cls), target), parts


def naive_logits(model, x, fill, tops):
    xs = x.repeat(len(tops), 1, 1, 1)
    for i, (y, x0) in enumerate(tops.tolist()):
        xs[i, :, y:y + SIZE, x0:x0 + SIZE] = fill[:, None, None]
    with torch.no_grad():
        return model(xs)


def naive_per_position(model, x, fill, tops) -> float:
    """Seconds per occluded copy of the plain forward at its faster batch size (one batch of 64,
    or eight single copies, timed)."""
    t0 = time.process_time()
    naive_logits(model, x, fill, tops[:BATCH])
    per_batch = (time.process_time() - t0) / min(BATCH, len(tops))
    t0 = time.process_time()
    for k in range(8):
        naive_logits(model, x, fill, tops[k:k + 1])
    per_single = (time.process_time() - t0) / 8
    return min(per_batch, per_single)


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
    ap.add_argument("--strides", default="8,16,32", help="grids to time, pixels between square positions")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, oversubscribed machine OpenMP's spinning "
                         "threads make small copies erratic; every variant gets the same)")
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = image()
    fill = x[0].mean((1, 2))
    H, W = x.shape[-2:]
    strides = [int(v) for v in args.strides.split(",")]
    trial_positions = len(grid(H, SIZE, 24)) ** 2
    load0 = os.getloadavg()
    header = ["model", "layer (b)", "stride", "positions", "deconvis CPU s", "fixed s", "Captum CPU s",
              "Captum / deconvis", "naive CPU s", "naive / deconvis", "arithmetic bound", "% of bound (Captum)",
              "% of bound (naive)", "max rel. diff"]
    rows, notes = [], []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        layer = DeconvNet(model).conv_layers()[-1]
        trials = None
        for stride in strides:
            tops = torch.tensor([(y, x0) for y in grid(H, SIZE, stride) for x0 in grid(W, SIZE, stride)])
            t_ours, eng, (act, prob, cls, target), parts = ours(model, x, fill, layer, tops)
            # exactness against the naive forward on 8 positions spread over the grid
            pick = tops[torch.linspace(0, len(tops) - 1, 8).long()]
            ref = naive_logits(model, x, fill, pick)
            e2 = IncrementalOcclusion(model, x, (SIZE, SIZE), [layer], graph=eng.tg, table=eng.table, mirror=eng.mirror)
            err = float((e2.run(pick, fill).logits - ref).abs().max() / ref.abs().max())
            t_naive = naive_per_position(model, x, fill, tops) * len(tops)
            if len(tops) <= 64:
                times = {ppe: captum_seconds(model, x, fill, target, stride, ppe) for ppe in (1, 16, 64)}
                best_ppe = min(times, key=times.get)
                t_captum = times[best_ppe]
                how = "each ppe on the grid: " + ", ".join(f"{k}: {v:.1f} s" for k, v in times.items())
            else:
                if trials is None:
                    trials = {ppe: captum_seconds(model, x, fill, target, 24, ppe) / trial_positions
                              for ppe in (1, 16, 64)}
                best_ppe = min(trials, key=trials.get)
                t_captum = captum_seconds(model, x, fill, target, stride, best_ppe)
                how = "trial s/position " + ", ".join(f"ppe {k}: {v:.3f}" for k, v in trials.items())
            bound = eng.bound
            fixed = parts["trace"] + parts["rf_table"] + parts["clean_pass"]
            rows.append([name, layer, stride, len(tops), f"{t_ours:.1f}", f"{fixed:.2f}", f"{t_captum:.1f} (ppe {best_ppe})",
                         f"**{t_captum / t_ours:.2f}x**", f"{t_naive:.1f}", f"{t_naive / t_ours:.2f}x", f"{bound:.2f}x",
                         f"**{100 * t_captum / t_ours / bound:.0f}%**", f"{100 * t_naive / t_ours / bound:.0f}%",
                         f"{err:.1e}"])
            notes.append(f"{name}, stride {stride}: fixed costs trace {parts['trace']:.2f} s, RF table "
                         f"{parts['rf_table']:.2f} s, clean pass {parts['clean_pass']:.2f} s; batches "
                         f"{parts['batches']:.2f} s; Captum {how}"
                         + (f"; computed in full (not windowable): {', '.join(eng.fallback)}" if eng.fallback else ""))
            print(table(header, rows[-1:]), flush=True)
            print("  " + notes[-1], flush=True)
    load1 = os.getloadavg()
    body = table(header, rows)
    body += (f"\n\n{SIZE} px square, fill = the image's mean colour (Captum: the same baseline), "
             "one 224 px scikit-image photo (chelsea), random weights, float32, CPU, "
             f"{torch.get_num_threads()} torch thread(s) for every variant. deconvis time includes the "
             "trace, the RF table and the clean forward (\"fixed s\") and produces (b), (d) and (e) for every "
             f"position, {BATCH} squares per batch; Captum produces the attribution of one target, at its best "
             "perturbations_per_eval of 1, 16 and 64 (each timed on grids of at most 64 positions; above, picked by "
             f"a {trial_positions}-position trial at stride 24); naive = the plain forward of occluded copies at its "
             "faster batch size (64 or 1; timed on 64 and 8 copies, scaled). Bound = naive multiply-adds / "
             "incremental multiply-adds (convs and Linears); % of bound = speed-up / bound. "
             "Times are CPU seconds of the benchmark process (time.process_time): the machine was shared "
             f"(load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end on {os.cpu_count()} cores), which "
             "makes wall times swing by up to 2x between batches; CPU time is far steadier.\n\n"
             + "\n".join(f"- {n}" for n in notes))
    print()
    print(body)
    if args.record:
        record("Occlusion", "Written by benchmarks/bench_occlusion.py.\n\n" + body)


if __name__ == "__main__":
    main()
