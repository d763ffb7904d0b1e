"""``deconvis visualize``: ZF Fig. 2 -- the top-k images of every channel, projected and cropped.

Settings come from ``--config FILE.yaml`` overridden by flags; every config key is a flag
(generated from :class:`deconvis.runs.config.VisualizeConfig`), e.g.::

    deconvis visualize --config configs/demo.yaml
    deconvis visualize --model alexnet --weights DEFAULT --layers conv1,conv5 --images ~/photos --k 9
    deconvis visualize --config configs/demo.yaml --render-only --per-sheet 8
    torchrun --nproc_per_node=4 -m deconvis visualize --config configs/alexnet.yaml --images /data/val

Under torchrun only rank 0 prints progress and the summary; the other ranks print warnings and
errors only.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from deconvis import config as configbase
from deconvis.runs import ranks
from deconvis.runs import pipeline
from deconvis.runs.config import VisualizeConfig

HELP = "top-k images per channel, projected to pixel space (ZF Fig. 2)"
DESCRIPTION = ("Mine the k strongest images of every channel over an image set, project each with the deconvnet, "
               "crop its receptive field, and write grid sheets plus an HTML report into <out>/<run>/. Flags "
               "override the --config file; every config key is a flag.")


def _console_log(rank: int = 0) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("deconvis: %(message)s" if rank == 0 else f"deconvis[rank {rank}]: %(message)s"))
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger = logging.getLogger("deconvis")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def run(args: argparse.Namespace) -> int:
    cfg = configbase.parse(VisualizeConfig, args)
    config_dir = os.path.dirname(os.path.abspath(args.config)) if args.config else None
    handler = _console_log(ranks.env_rank())
    t0 = time.perf_counter()
    try:
        out = pipeline.run(cfg, config_dir=config_dir)
    finally:
        logging.getLogger("deconvis").removeHandler(handler)
    if out.rank != 0:
        return 0
    res = out.results
    n_units = sum(len(u.winners) for lr in res.layers for u in lr.units)
    n_bottom = sum(len(u.winners) for lr in res.layers if lr.bottom is not None for u in lr.bottom.units)
    print(f"run {cfg.run}: {len(res.layers)} layers, {n_units} units, top-{res.k} over "
          f"{res.images.get('readable', out.n_images)} images"
          + (f" ({len(res.images.get('skipped', []))} unreadable skipped)" if res.images.get("skipped") else "")
          + (f", and {n_bottom} bottom units" if n_bottom else "")
          + f", {time.perf_counter() - t0:.1f} s")
    width = max((len(p) for p in out.seconds), default=8)
    for phase, secs in out.seconds.items():
        print(f"  {phase:{width}s} {secs:7.1f} s")
    if out.mining is not None:
        where = f" (rank 0 of {out.world})" if out.world > 1 else ""
        print(f"  mining time{where}: {out.mining.summary()}")
        for st in res.stats.get("ranks", [])[1:]:
            sp = st["split"]
            print(f"  mining time (rank {st['rank']} of {out.world}): load {sp['load']:.2f} s, forward "
                  f"{sp['forward']:.2f} s, top-k {sp['topk']:.2f} s, other {sp['other']:.2f} s; {st['images']} images")
    print(f"  sheets   {len(out.sheets)} images in {out.run_dir}")
    print(f"  report   {out.report}")
    return 0


add_parser = configbase.command("visualize", VisualizeConfig, run, HELP, DESCRIPTION)
