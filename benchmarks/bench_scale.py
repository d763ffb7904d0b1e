"""Scale of ``deconvis visualize``: one device fast, and many processes (AlexNet, random weights,
224 px, float32).

1. **Mining vs plain forward** at the same batch size on the CPU: ``model(x)`` (the whole network)
   on preloaded tensors against the pipeline's mining (``pipeline.mine_phase``: forward up to
   conv5 + top-k update) on the same preloaded tensors, and through the real folder loader
   (JPEG decode + resize/crop + normalise) with its time split (load, forward, top-k).
2. **End to end**, ``python -m deconvis visualize --model alexnet --weights random`` over a
   generated set of ``--images`` random smooth JPEGs (256 x 256; the default 10k may take long on
   a small machine: pass e.g. ``--images 2000`` and the table says what ran): the phase times and
   the projection phase's projections/s (all 1152 channels x k=9 winners).
3. **1 process vs 2 gloo processes** via ``torchrun --nproc_per_node=2`` on the same set and
   config: wall time per phase, and whether the winners agree with the 1-process run. On a
   2-core machine expect no speedup (1 process already uses both cores through its 2 threads;
   torchrun gives each process 1 thread): the row shows correctness and overhead.
4. **GPU** (only when CUDA is available): images/s of the whole-net forward (classifier included),
   of the forward cut at the deepest mined layer (conv5: what mining runs, without the top-k), and
   of mining, per precision: fp32 with TF32 off (deconvis's default), fp32 with TF32 convs
   (``--tf32``), bf16 and fp16 autocast, each with and without ``--channels-last``; at least 64
   batches per timing (CUDA launches and clocks settle); projections/s of the projection phase;
   the GPU model and date are recorded.

    python benchmarks/bench_scale.py [--images 10000] [--batch-size 32] [--workers 2] [--record]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, machine, publish, table  # noqa: E402

from deconvis import mining  # noqa: E402
from deconvis.mining import rerank  # noqa: E402
from deconvis.runs import precision  # noqa: E402
from deconvis.runs import pipeline
from deconvis.runs.config import load_config  # noqa: E402
from deconvis.io.images import ImageDataset  # noqa: E402

SECTION = "Scale: mining, end to end, 1 vs 2 processes, GPU (benchmarks/bench_scale.py)"
PY = os.path.join(ROOT, ".venv", "bin", "python")
PY = PY if os.path.exists(PY) else sys.executable


def write_images(folder: str, n: int, size: int = 256, seed: int = 0) -> None:
    """``n`` random smooth RGB JPEGs (colour blobs + finer texture), ``size`` x ``size`` pixels;
    files already there are kept (the set is reused between runs)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = os.path.join(folder, f"img_{i:05d}.jpg")
        coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
        fine = rng.normal(0, 25, (size // 8, size // 8, 3)).astype(np.float32)
        if os.path.exists(path):
            continue
        img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) + \
            cv2.resize(fine, (size, size), interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(path, np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# 1. mining vs plain forward (in this process)

def _precision(amp: str, tf32: bool, device: str) -> str:
    """The label of a variant's arithmetic."""
    if amp != "none":
        return f"{amp} autocast"
    if device == "cpu":
        return "fp32"
    return "fp32, TF32 convs" if tf32 else "fp32, TF32 off"


def mining_vs_forward(data: str, out: str, n: int, bs: int, workers: int, device: str = "cpu",
                      variants: Tuple[Tuple, ...] = (("none", False),), rounds: int = 2,
                      cut_forward: bool = False) -> List[list]:
    """Rows: plain forward (the whole net), optionally the forward cut at the deepest mined layer
    (``cut_forward``), mining on preloaded tensors (per variant ``(amp, channels_last[, tf32])``),
    and mining through the loader, in images/s, with the time split of the mining runs."""
    from deconvis.utils.device import tf32 as tf32_policy

    rows: List[list] = []
    load0 = os.getloadavg()[0]
    base = dict(model="alexnet", weights="random", images=data, max_images=n, batch_size=bs, workers=workers,
                device=device, out=out, progress=False, checkpoint_every=0, layers=[], k=9)
    cfg = load_config(None, dict(base, run="mine"))
    ctx = pipeline.prepare(cfg, os.path.join(out, "mine"))
    ds = ImageDataset(ctx.source, ctx.preprocess)
    pre = [(torch.stack([ds[i][0] for i in range(s, min(s + bs, n))]).to(ctx.device),
            torch.arange(s, min(s + bs, n))) for s in range(0, n, bs)]
    model = ctx.loaded.model

    def sync() -> None:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()

    def forward(amp: str, cl: bool, allow_tf32: bool = False, cut: bool = False) -> float:
        m = model.to(memory_format=torch.channels_last) if cl else model
        dt = torch.bfloat16 if amp == "bf16" else torch.float16 if amp == "fp16" else None
        run = (lambda x: ctx.dn.activations(x, ctx.layers)) if cut else m
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode(), tf32_policy(allow_tf32), \
                (torch.autocast(ctx.device.type, dtype=dt) if dt else _null()):
            for x, _ in pre:
                run(x.contiguous(memory_format=torch.channels_last) if cl else x)
        sync()
        dt_s = time.perf_counter() - t0
        model.to(memory_format=torch.contiguous_format)
        return dt_s

    flat = torch.cat([x for x, _ in pre])  # image i of the preloaded set: flat[i]

    def mine_pre(amp: str, cl: bool, allow_tf32: bool = False) -> Tuple[float, mining.MiningTimes]:
        """Mining as ``visualize --amp`` runs it: under amp a pool of ``k x amp_pool`` candidates per
        channel, then the fp32 re-rank of the candidate images (TF32 off); the time covers both."""
        c = load_config(None, dict(base, run="mine", amp=amp, channels_last=cl, tf32=allow_tf32))
        vctx = pipeline.Context(**{**ctx.__dict__, "cfg": c, "amp": pipeline.amp_dtype(amp, ctx.device)})
        if cl:
            model.to(memory_format=torch.channels_last)
        times = mining.MiningTimes()
        sync()
        t0 = time.perf_counter()
        pool = mining.TopK(ctx.layers, precision.mining_k(c), ctx.device)
        mining.mine(pipeline.mining_forward(vctx), pre, pool, dtype=ctx.dtype, progress=False, times=times)
        if precision.reranks(c):
            if cl:
                model.to(memory_format=torch.contiguous_format)
            cands = rerank.candidate_images(pool)
            part = rerank.PoolTopK(pool, c.k)
            batches = [(flat[cands[s:s + bs]], torch.tensor(cands[s:s + bs])) for s in range(0, len(cands), bs)]

            def fp32(x: torch.Tensor) -> Dict[str, torch.Tensor]:
                with tf32_policy(False):
                    return ctx.dn.activations(x, ctx.layers)

            rerank.finish(mining.mine(fp32, batches, part, dtype=ctx.dtype, progress=False), pool)
        sync()
        dt_s = time.perf_counter() - t0
        model.to(memory_format=torch.contiguous_format)
        return dt_s, times

    for variant in variants:
        amp, cl = variant[0], variant[1]
        allow = bool(variant[2]) if len(variant) > 2 else False
        name = _precision(amp, allow, device) + (", channels_last" if cl else "")
        best_f, best_c, best_m, split = float("inf"), float("inf"), float("inf"), None
        forward(amp, cl, allow)  # warm-up
        mine_pre(amp, cl, allow)
        for _ in range(rounds):  # interleaved: the machine is shared and noisy
            best_f = min(best_f, forward(amp, cl, allow))
            if cut_forward:
                best_c = min(best_c, forward(amp, cl, allow, cut=True))
            t, times = mine_pre(amp, cl, allow)
            if t < best_m:
                best_m, split = t, times
        rows.append([f"plain forward `model(x)`, whole net incl. classifier ({name})", f"{n / best_f:.1f}",
                     "1.00x", "-"])
        if cut_forward:
            rows.append([f"forward cut at the deepest mined layer, no top-k ({name})", f"{n / best_c:.1f}",
                         f"{best_f / best_c:.2f}x", "-"])
        pool = load_config(None, dict(base, amp=amp))
        rerank_note = (f", {precision.mining_k(pool)} candidates per channel + fp32 re-rank"
                       if precision.reranks(pool) else "")
        rows.append([f"mining, preloaded tensors ({name}{rerank_note})", f"{n / best_m:.1f}", f"{best_f / best_m:.2f}x",
                     _split(split)])
        print(f"  {name}: forward {n / best_f:.1f} img/s, mining {n / best_m:.1f} img/s", flush=True)
    # the real thing: pipeline.mine_phase over the JPEG folder through the DataLoader
    shutil.rmtree(os.path.join(out, "mine"), ignore_errors=True)
    os.makedirs(os.path.join(out, "mine"))
    t0 = time.perf_counter()
    _, times = pipeline.mine_phase(pipeline.prepare(cfg, os.path.join(out, "mine")))
    sync()
    dt = time.perf_counter() - t0
    rows.append([f"mining, JPEG folder via DataLoader ({workers} workers)", f"{n / dt:.1f}",
                 f"{best_f / dt:.2f}x" if variants == (("none", False),) else "-", _split(times)])
    rows.append(["(machine load average before -> after)", f"{load0:.1f} -> {os.getloadavg()[0]:.1f}", "", ""])
    return rows


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _split(t: Optional[mining.MiningTimes]) -> str:
    if t is None or t.total <= 0:
        return "-"
    pct = lambda v: f"{100 * v / t.total:.0f}%"  # noqa: E731
    return (f"load {pct(t.load)}, forward {pct(t.forward)}, top-k {pct(t.topk)}, other {pct(max(t.other, 0))}"
            + ("" if t.clock == "host" else f" ({t.clock})"))


# ---------------------------------------------------------------------------------------------
# 2 + 3. end to end, 1 process and 2 processes

def visualize(data: str, out: str, run: str, bs: int, workers: int, nproc: int, timeout: int,
              extra: Tuple[str, ...] = ()) -> Dict[str, object]:
    """One ``deconvis visualize`` (``nproc`` > 1: under torchrun) as a subprocess; wall time,
    the phase seconds of its summary, its results.json."""
    args = ["visualize", "--model", "alexnet", "--weights", "random", "--images", data, "--out", out, "-n", run,
            "--no-progress", "--device", "cpu", "--batch-size", str(bs), "--workers", str(workers),
            "--checkpoint-every", "0", *extra]
    if nproc == 1:
        cmd = [PY, "-m", "deconvis", *args]
    else:
        cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
               "-m", "deconvis", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    load = f"{load0:.1f} -> {os.getloadavg()[0]:.1f}"
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    phases = {m.group(1): float(m.group(2))
              for m in re.finditer(r"^  (prepare|mine|project|render)\s+([\d.]+) s$", proc.stdout, re.M)}
    res = json.load(open(os.path.join(out, run, "results.json")))
    split = next((ln.split(":", 1)[1].strip() for ln in proc.stdout.splitlines()
                  if ln.strip().startswith("mining time")), "")
    return {"wall": wall, "phases": phases, "results": res, "split": split, "stdout": proc.stdout, "load": load}


#: the arithmetic of a visualize run: convolutions (forward, transposed, and the input gradient the
#: mirror takes of a convolution) and pooling (forward, and the switches' unpooling), as ATen ops
ARITHMETIC_OPS = {"aten::conv2d", "aten::convolution", "aten::_convolution", "aten::conv_transpose2d",
                  "aten::convolution_backward", "aten::max_pool2d", "aten::max_pool2d_with_indices",
                  "aten::max_pool2d_with_indices_backward", "aten::max_unpool2d", "aten::avg_pool2d",
                  "aten::adaptive_avg_pool2d", "aten::avg_pool2d_backward"}
#: in the project phase also the windowed mirror's own forms of the same arithmetic: the transposed
#: conv of a one-position signal as a matrix product (``aten::mm``, deconvis.mirror.tconv) and the
#: unpooling through the switches as a ``scatter_add_`` (deconvis.mirror.window), which the full
#: path runs as ``conv_transpose2d`` and ``max_unpool2d``
PROJECTION_ARITHMETIC_OPS = {"aten::mm", "aten::scatter_add_"}
PHASES = ("prepare", "mine", "project", "unit_extras", "render")


def profiled_run(cfg) -> Tuple[object, Dict[str, float], Dict[str, float], float, float]:
    """``pipeline.run(cfg)`` in this process under the PyTorch profiler: (outcome, wall seconds
    per phase, seconds of arithmetic per phase (:data:`ARITHMETIC_OPS`, and in the project phase
    :data:`PROJECTION_ARITHMETIC_OPS`; outermost op only, on the tensors the run itself computes),
    whole wall seconds, the seconds of :data:`PROJECTION_ARITHMETIC_OPS` among them). The
    profiler's own overhead (a few us per op) is inside the wall times; its start and its stop
    (collecting the events) are not."""
    from torch.profiler import ProfilerActivity, profile, record_function

    wrapped = {"prepare": "_setup", "mine": "_mine", "project": "_project", "unit_extras": "extras_phase",
               "render": "render_phase"}
    saved = {name: getattr(pipeline, name) for name in wrapped.values()}

    def wrap(phase: str, fn):
        def inner(*a, **k):
            with record_function(f"phase::{phase}"):
                return fn(*a, **k)
        return inner

    try:
        for phase, name in wrapped.items():
            setattr(pipeline, name, wrap(phase, saved[name]))
        t_on = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()  # the run's wall: not the profiler's start-up or its teardown
            out = pipeline.run(cfg)
            wall = time.perf_counter() - t0
        print(f"(the profiler's start and stop around the run: {time.perf_counter() - t_on - wall:.1f} s, not counted)")
    finally:
        for name, fn in saved.items():
            setattr(pipeline, name, fn)
    arith = {p: 0.0 for p in PHASES}
    ops = ARITHMETIC_OPS | PROJECTION_ARITHMETIC_OPS
    forms = 0.0
    for ev in prof.events():
        if ev.name not in ops:
            continue
        parent, phase = ev.cpu_parent, None
        while parent is not None:
            if parent.name in ops:
                break
            if parent.name.startswith("phase::"):
                phase = parent.name.split("::", 1)[1]
                break
            parent = parent.cpu_parent
        if ev.name in PROJECTION_ARITHMETIC_OPS and phase != "project":
            continue
        if phase is not None and (parent is None or parent.name.startswith("phase::")):
            arith[phase] += ev.cpu_time_total / 1e6
            if ev.name in PROJECTION_ARITHMETIC_OPS:
                forms += ev.cpu_time_total / 1e6
    secs = dict(out.seconds)
    secs["render"] = secs.get("render", 0.0)
    return out, secs, arith, wall, forms


def cprofiled_run(cfg, path: str) -> Tuple[object, Dict[str, float], Dict[str, float], float, float]:
    """``pipeline.run(cfg)`` under cProfile (stats written to ``path``, read them with ``pstats``):
    as :func:`profiled_run`, with no arithmetic (zeros)."""
    import cProfile

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        out = pipeline.run(cfg)
    finally:
        prof.disable()
        prof.dump_stats(path)
    wall = time.perf_counter() - t0
    return out, dict(out.seconds), {p: 0.0 for p in PHASES}, wall, 0.0


def arithmetic_rows(secs: Dict[str, float], arith: Dict[str, float], wall: float) -> List[list]:
    """Rows phase | wall s | arithmetic s | wall / arithmetic."""
    rows = []
    for p in PHASES:
        w, a = secs.get(p, 0.0), arith.get(p, 0.0)
        rows.append([p, f"{w:.1f}", f"{a:.1f}", f"{w / a:.2f}x" if a > 0 else "-"])
    total_a = sum(arith.values())
    rows.append(["**end to end** (process wall, start-up excluded)", f"{wall:.1f}", f"{total_a:.1f}",
                 f"**{wall / total_a:.2f}x**" if total_a > 0 else "-"])
    return rows


def run_size(run_dir: str) -> Tuple[int, int]:
    """(bytes, files) under ``run_dir``."""
    total = files = 0
    for root, _, names in os.walk(run_dir):
        for n in names:
            total += os.path.getsize(os.path.join(root, n))
            files += 1
    return total, files


def size_by_part(run_dir: str) -> str:
    """MB and files per part of a run folder: tiles of each layer, the unit pages' folders, the
    sheets of each layer, results.json, the rest."""
    parts: Dict[str, List[int]] = {}
    for root, _, names in os.walk(run_dir):
        rel = os.path.relpath(root, run_dir).split(os.sep)
        part = "/".join(rel[:2]) if rel[0] in ("tiles", "units") and len(rel) > 1 else rel[0]
        for n in names:
            sheet = re.match(r"layer_(.+)_p\d+\.\w+$", n)
            key = part if part != "." else (f"sheets/{sheet.group(1)}" if sheet else
                                            n if n == "results.json" else "other")
            row = parts.setdefault(key, [0, 0])
            row[0] += os.path.getsize(os.path.join(root, n))
            row[1] += 1
    return ", ".join(f"{k} {b / 1e6:.1f} MB/{f}" for k, (b, f) in sorted(parts.items()))


def _winners(res: dict) -> Dict[Tuple[str, int], List[Tuple[int, float]]]:
    """(layer, channel) -> [(image, activation)] of a results.json (version 2: columns; 1: objects)."""
    if res.get("version", 1) >= 2:
        return {(lr["name"], c): list(zip(imgs, acts)) for lr in res["layers"]
                for c, imgs, acts in zip(lr["units"]["channel"], lr["units"]["image"], lr["units"]["activation"])}
    return {(lr["name"], u["channel"]): [(w["image"], w["activation"]) for w in u["winners"]]
            for lr in res["layers"] for u in lr["units"]}


def compare(a: dict, b: dict) -> str:
    """How far the winners of two runs agree: identical image lists, max relative activation gap."""
    wa, wb = _winners(a), _winners(b)
    same = sum(1 for key in wa if [i for i, _ in wa[key]] == [i for i, _ in wb[key]])
    gap = max((abs(x - y) / max(abs(x), 1e-12) for key in wa for (_, x), (_, y) in zip(wa[key], wb[key])),
              default=0.0)
    return f"{same}/{len(wa)} channels with identical top-k image lists, max relative activation difference {gap:.1e}"


# ---------------------------------------------------------------------------------------------

#: the GPU timings cover at least this many batches (a handful is mostly launch and clock ramp-up)
GPU_MIN_BATCHES = 64


def gpu_section(data: str, out: str, n: int, bs: int, workers: int) -> str:
    name = torch.cuda.get_device_name(0)
    variants = [("none", False, False), ("none", False, True), ("none", True, True), ("bf16", False), ("bf16", True),
                ("fp16", False), ("fp16", True)]
    n_mine = max(n, GPU_MIN_BATCHES * bs)
    write_images(data, n_mine)  # keeps the images already there
    rows = mining_vs_forward(data, out, n_mine, bs, workers, device="cuda", variants=tuple(variants), rounds=3,
                             cut_forward=True)
    cfg = load_config(None, dict(model="alexnet", weights="random", images=data, max_images=n, batch_size=bs,
                                 workers=workers, device="cuda", out=out, run="gpu-e2e", progress=False, fresh=True))
    t0 = time.perf_counter()
    o = pipeline.run(cfg)
    wall = time.perf_counter() - t0
    units = sum(len(u.winners) for lr in o.results.layers for u in lr.units)
    body = (f"GPU: {name}, recorded {time.strftime('%Y-%m-%d')}; {n_mine} preloaded images = {n_mine // bs} batches "
            f"of {bs} per timing, {workers} workers. The plain forward runs the whole AlexNet (classifier included); "
            "mining and the cut forward stop at conv5, so compare mining with the cut forward for the top-k's "
            "cost.\n\n"
            + table(["variant", "images/s", "vs plain forward", "mining time split"], rows)
            + f"\n\nGPU pipeline in this process (fp32, TF32 off, amp none): {wall:.1f} s for {n} images; projection phase "
              f"{o.seconds.get('project', 0):.1f} s for {units} units = {units / max(o.seconds.get('project', 1e-9), 1e-9):.0f} "
              f"projections/s (auto-sized batches); mining split {o.mining.summary() if o.mining else '-'}.")
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10000, help="size of the generated image set (end to end)")
    ap.add_argument("--mine-images", type=int, default=128, help="images for the mining vs forward comparison")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (1-process run; torchrun: per rank)")
    ap.add_argument("--data-dir", default="", help="keep the generated images here (default: a temp dir)")
    ap.add_argument("--channels", type=int, default=0, help="end to end: only the first N channels per layer "
                                                             "(0 = all; for a quick smoke run)")
    ap.add_argument("--skip-torchrun", action="store_true")
    ap.add_argument("--e2e-only", action="store_true", help="only section 2a (the profiled 1-process run): wall "
                                                             "time against arithmetic per phase")
    ap.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per end-to-end run")
    ap.add_argument("--record", action="store_true", help="write the tables into BENCHMARKS.md")
    ap.add_argument("--bottom-k", type=int, default=None, help="end to end: the run's bottom_k (unset: k; 0: off)")
    ap.add_argument("--no-unit-erf", action="store_true", help="end to end: skip the unit pages' RF + ERF images")
    ap.add_argument("--cprofile", default="", help="with --e2e-only: run under cProfile instead of the PyTorch "
                                                   "profiler and write its stats to this file (no arithmetic column)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="deconvis_bench_scale_")
    data = args.data_dir or os.path.join(tmp, "images")
    try:
        t0 = time.perf_counter()
        write_images(data, args.images)
        print(f"{args.images} JPEGs in {data} ({time.perf_counter() - t0:.1f} s)", flush=True)
        bs, w = args.batch_size, args.workers

        if args.e2e_only:
            cfg = load_config(None, dict(model="alexnet", weights="random", images=data, out=os.path.join(tmp, "e2e"),
                                         run="one", progress=False, device="cpu", batch_size=bs, workers=w,
                                         checkpoint_every=0, channels=args.channels or None, bottom_k=args.bottom_k,
                                         unit_erf=not args.no_unit_erf))
            load0 = os.getloadavg()[0]
            cpu0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            o, ph, arith, wall, forms = cprofiled_run(cfg, args.cprofile) if args.cprofile else profiled_run(cfg)
            cpu = sum(r.ru_utime + r.ru_stime - (r0.ru_utime + r0.ru_stime) for r, r0 in
                      zip((resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)), cpu0))
            size, n_files = run_size(os.path.join(tmp, "e2e", "one"))
            print(machine())
            print(f"{args.images} images, 1 process, {torch.get_num_threads()} threads, load {load0:.1f} -> "
                  f"{os.getloadavg()[0]:.1f}; run folder {size / 1e6:.1f} MB in {n_files} files")
            print("by part (MB/files):", size_by_part(os.path.join(tmp, "e2e", "one")))
            print(f"CPU seconds (user + system, this process and its finished loader workers): {cpu:.1f}; "
                  "less sensitive to other load than the wall times")
            print(table(["phase", "wall s", "arithmetic s", "wall / arithmetic"], arithmetic_rows(ph, arith, wall)))
            print(f"of the project phase's arithmetic, the windowed mirror's matrix products and unpool scatters "
                  f"(aten::mm, aten::scatter_add_): {forms:.1f} s")
            return
        print("1. mining vs plain forward (CPU)", flush=True)
        rows = mining_vs_forward(data, os.path.join(tmp, "m"), min(args.mine_images, args.images), bs, w, rounds=3)
        body = (f"### 1. Mining vs plain forward (CPU, batch {bs}, {min(args.mine_images, args.images)} images)\n\n"
                + table(["what", "images/s", "vs plain forward", "mining time split"], rows)
                + "\n\nPlain forward runs the whole AlexNet (classifier included); mining runs up to conv5 and "
                  "folds every batch into the top-9 of all 1152 channels. Load = waiting for the DataLoader "
                  "(JPEG decode + resize/crop + normalise, partly hidden by its workers); on a CPU-only machine "
                  "the workers' decoding also takes cores from the forward, which the split shows as a slower "
                  "forward rather than as load.")

        print(f"2. end to end, 1 process, {args.images} images (profiled)", flush=True)
        extra = ("--channels", str(args.channels)) if args.channels else ()
        e2e = os.path.join(tmp, "e2e")
        cfg = load_config(None, dict(model="alexnet", weights="random", images=data, out=e2e, run="one",
                                     progress=False, device="cpu", batch_size=bs, workers=w, checkpoint_every=0,
                                     channels=args.channels or None))
        load0 = os.getloadavg()[0]
        o, ph, arith, wall, _ = profiled_run(cfg)
        load = f"{load0:.1f} -> {os.getloadavg()[0]:.1f}"
        size, n_files = run_size(os.path.join(e2e, "one"))
        with open(os.path.join(e2e, "one", "results.json"), encoding="utf-8") as f:
            res = json.load(f)
        units = sum(len(u.winners) for lr in o.results.layers for u in lr.units)
        proj_rate = units / max(ph.get("project", 1e-9), 1e-9)
        threads = torch.get_num_threads()
        one = {"wall": wall, "results": res, "split": o.mining.summary() if o.mining else "", "load": load}
        rows2 = [[f"1 process ({threads} thread{'s' if threads > 1 else ''}, {os.cpu_count()} cores)", f"{wall:.1f}",
                  f"{ph.get('prepare', 0):.1f}", f"{ph.get('mine', 0):.1f}",
                  f"{ph.get('project', 0):.1f}", f"{ph.get('render', 0):.1f}",
                  f"{args.images / max(ph.get('mine', 1e-9), 1e-9):.1f}", f"{proj_rate:.1f}", load, "(reference)"]]
        arith_body = (f"\n\n### 2a. Wall time against arithmetic, per phase (1 process, {threads} threads, "
                      f"{args.images} images, one profiled run)\n\n"
                      + table(["phase", "wall s", "arithmetic s", "wall / arithmetic"], arithmetic_rows(ph, arith, wall))
                      + "\n\nArithmetic: the time inside the convolutions (forward, transposed, input gradients) "
                        "and poolings (and unpoolings) the run computes, from the PyTorch profiler (outermost such "
                        "op, main thread) during the same run; wall: the phase's own clock. Everything else "
                        "(decoding, top-k, cutting and stretching tiles, encoding and writing files, results.json, "
                        f"the report) is the difference. The run folder: {size / 1e6:.1f} MB in {n_files} files.")
        if not args.skip_torchrun:
            print("3. end to end, 2 gloo processes (torchrun)", flush=True)
            two = visualize(data, os.path.join(tmp, "e2e"), "two", bs, w, 2, args.timeout, extra)
            ph2 = two["phases"]
            rows2.append(["2 processes, torchrun + gloo (1 thread each: torchrun's OMP_NUM_THREADS=1)", f"{two['wall']:.1f}",
                          f"{ph2.get('prepare', 0):.1f}", f"{ph2.get('mine', 0):.1f}", f"{ph2.get('project', 0):.1f}",
                          f"{ph2.get('render', 0):.1f}", f"{args.images / max(ph2.get('mine', 1e-9), 1e-9):.1f}",
                          f"{units / max(ph2.get('project', 1e-9), 1e-9):.1f}", two["load"],
                          compare(two["results"], res)])
        body += (f"\n\n### 2-3. End to end: `deconvis visualize --model alexnet --weights random`, {args.images} "
                 f"generated 256 px JPEGs, all 5 conv layers ("
                 + (f"first {args.channels} channels each" if args.channels else "1152 channels")
                 + f"), k=9, batch {bs}, {w} loader worker(s)\n\n"
                 + table(["run", "wall s", "prepare s", "mine s", "project s", "render s", "mining img/s",
                          "projections/s", "load avg", "winners vs 1 process"], rows2)
                 + f"\n\nProjection phase: {units} units (each channel's 9 winners, windowed deconvnet, auto-sized "
                   f"batches, re-forwarding the winners' images) at {proj_rate:.1f} projections/s in 1 process. "
                   f"Mining time split (1 process): {one['split']}. The 1-process run is in this process (wall "
                   "time without interpreter start-up, with the profiler's overhead); the torchrun row includes "
                   "start-up. Load avg: the machine's 1-minute load average before -> after "
                   "the run (it is shared with other jobs: compare rows only at similar load).")
        if not args.skip_torchrun:
            ratio = one["wall"] / max(two["wall"], 1e-9)
            cores = os.cpu_count() or 1
            body += (f" 2 processes took {1 / ratio:.2f}x the 1-process wall time ({ratio:.2f}x speed). "
                     + (f"This machine has {cores} cores, so this is not a scale-out measurement: 1 process "
                        "already uses them all (its threads), torchrun gives each process 1 thread; the difference "
                        "is 2 single-threaded processes against 1 two-threaded one, plus the launch, rendezvous and "
                        "top-k merge. The row shows that the sharded run merges to the same winners. "
                        if cores <= 2 else "")
                     + "Activations could differ in the last float32 bits between the two (a CPU convolution's "
                       "summation order can depend on the thread count), which could swap near-exact ties; with the "
                       "same arithmetic the top-k merge is exact (tests/test_pipeline_distributed.py).")
        body += arith_body
        if args.images < 10000:
            body += (f"\n\n**Ran {args.images} images, not the 10k the issue names.** Mining time scales linearly "
                     "with the image count; projection time does not (always 1152 x 9 units).")
        if torch.cuda.is_available():
            print("4. GPU", flush=True)
            body += "\n\n### 4. GPU\n\n" + gpu_section(data, os.path.join(tmp, "g"), min(args.images, 2048), 128, 4)
        else:
            body += ("\n\n### 4. GPU\n\nNo CUDA device on this machine: section not run (the script adds it, with the "
                     "GPU model and date, when run where CUDA is available).")
        print()
        publish(SECTION, body, args.record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
