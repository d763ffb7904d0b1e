"""Feature visualisation: deconvis.featvis against torch-lucent, side by side in one run.

Same model (the demo net, its shipped weights), same layer and channel, same number of Adam steps
at the same learning rate, same image size, same objective (the mean of the rectified channel:
``preactivation=False`` here, as Lucent's ``objectives.channel``), both with the decorrelated
Fourier parametrisation and their own transformation robustness. Lucent runs as documented
(``render.render_vis``, its standard transforms) with ``fixed_image_size`` = the image size, so
the network sees the same size in both (by default Lucent upsamples anything under 224 px).

Timed: seconds per channel, one channel per run and ``--batch`` channels per run (Lucent's
batch: one ``param.image(batch=N)`` with the sum of ``channel(layer, c, batch=i)``). Quality:
the objective of each final image seen untransformed, against a uniform-noise image. Writes the
two images of ``--channel`` next to each other to ``docs/images/featvis_vs_lucent.png``.

    flock /tmp/deconvis-bench.lock .venv/bin/python benchmarks/bench_featvis.py --record
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import ROOT, record, table  # noqa: E402


def lucent_run(model, layer_key: str, channels, steps: int, size: int, lr: float) -> np.ndarray:
    """Lucent's images [N, size, size, 3] in [0, 1] for ``channels`` (image i for channel i)."""
    from lucent.optvis import objectives, param, render

    obj = objectives.channel(layer_key, channels[0], batch=0)
    for i, c in enumerate(channels[1:], 1):
        obj = obj + objectives.channel(layer_key, c, batch=i)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = render.render_vis(model, obj, param_f=lambda: param.image(size, batch=len(channels)),
                                   optimizer=lambda p: torch.optim.Adam(p, lr=lr), thresholds=(steps,),
                                   fixed_image_size=size, show_image=False, progress=False)
    return np.asarray(images[-1])


def labelled(img: np.ndarray, text: str) -> np.ndarray:
    """uint8 [H, W, 3] with a white strip on top carrying ``text``."""
    import cv2

    strip = np.full((18, img.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, img])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="conv5")
    ap.add_argument("--channel", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4, help="channels in the batched comparison")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from deconvis.featvis import LayerObjective, visualize_channels
    from deconvis.featvis.run import noise_objective, to_uint8
    from deconvis.io.atomic import write_png
    from deconvis.io.models import load_model

    lm = load_model("zfnet_demo", os.path.join(ROOT, "deconvis", "assets", "zfnet_demo.pt"))
    model, pp = lm.model.eval(), lm.preprocess
    obj = LayerObjective(model, args.layer, mean=pp.mean, std=pp.std)
    key = obj.layer.replace(".", "_")  # Lucent's name of the same module (features.11 -> features_11)
    size = (args.size, args.size)
    kw = dict(steps=args.steps, size=args.size, lr=args.lr, preactivation=False, mean=pp.mean, std=pp.std)
    batch = [args.channel] + [c for c in range(64) if c != args.channel][:args.batch - 1]

    # warm-up both (allocator, oneDNN kernels, lazy imports)
    visualize_channels(model, args.layer, [args.channel], **{**kw, "steps": 2}, objective=obj)
    lucent_run(copy.deepcopy(model), key, [args.channel], 2, args.size, args.lr)

    rows, images = [], {}
    for n_ch, chans in ((1, [args.channel]), (len(batch), batch)):
        t0 = time.perf_counter()
        ours = visualize_channels(model, args.layer, chans, batch=n_ch, objective=obj, **kw)
        t_ours = time.perf_counter() - t0
        # Lucent adds a forward hook to every module at each call and never removes them (and
        # writes parameter gradients): give it its own copy each time, so neither side pays for them
        theirs = copy.deepcopy(model)
        t0 = time.perf_counter()
        luc = lucent_run(theirs, key, chans, args.steps, args.size, args.lr)
        t_luc = time.perf_counter() - t0
        luc_t = torch.from_numpy(luc).permute(0, 3, 1, 2).to(torch.float64)
        with torch.no_grad():
            f_ours = obj.score(ours.images, chans).double()
            f_luc = obj.score(luc_t, chans).double()
        noise = noise_objective(obj, chans, size, None)
        if n_ch == 1:
            images = {"deconvis": to_uint8(ours.images)[0], "lucent": to_uint8(luc_t)[0]}
        rows.append([f"{n_ch}", f"{t_ours / n_ch:.3f}", f"{t_luc / n_ch:.3f}", f"{t_luc / t_ours:.2f}",
                     f"{float(f_ours.mean()):.3g}", f"{float(f_luc.mean()):.3g}", f"{float(noise.mean()):.3g}"])
        print(f"{n_ch} channel(s): deconvis {t_ours:.2f} s, lucent {t_luc:.2f} s; objective deconvis "
              f"{f_ours.numpy().round(3)}, lucent {f_luc.numpy().round(3)}, noise {noise.numpy().round(3)}", flush=True)

    gap = np.full((images["deconvis"].shape[0], 4, 3), 255, np.uint8)
    pair = np.concatenate([images["deconvis"], gap, images["lucent"]], axis=1)
    pair = labelled(pair, f"deconvis | lucent   {args.layer} ch {args.channel}, {args.steps} steps")
    out_png = os.path.join(ROOT, "docs", "images", "featvis_vs_lucent.png")
    write_png(out_png, pair)
    head = ["channels per run", "deconvis s/channel", "lucent s/channel", "lucent / deconvis",
            "objective deconvis", "objective lucent", "objective noise"]
    text = table(head, rows)
    print(text)
    print(f"wrote {out_png}")
    if args.record:
        import lucent

        body = (f"`flock /tmp/deconvis-bench.lock python benchmarks/bench_featvis.py --record`: demo net "
                f"(shipped weights) {args.layer} channel {args.channel} (and {len(batch)} channels "
                f"{batch} batched), {args.steps} Adam steps at lr {args.lr}, {args.size} px, the same "
                f"objective (mean of the rectified channel), against torch-lucent "
                f"{getattr(lucent, '__version__', '0.1.8')} (`render_vis`, standard transforms, "
                f"`fixed_image_size={args.size}`), both timed in one run after a warm-up. Objective: the "
                "channel mean of the final image seen untransformed (uniform noise for reference). Lucent "
                "gets a fresh copy of the model per call: it leaves a forward hook on every module per "
                "call and writes the parameters' gradients. "
                "Other helpers' work shared the 2 cores, so the absolute seconds are loose; the ratio is "
                "the number to read.\n\n" + text +
                "\n\nThe two images of the single-channel run, deconvis left, Lucent right: "
                "`docs/images/featvis_vs_lucent.png`.")
        record("Feature visualisation vs torch-lucent (benchmarks/bench_featvis.py)", body)


if __name__ == "__main__":
    main()
