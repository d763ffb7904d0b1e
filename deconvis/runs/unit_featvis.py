"""Each channel's feature visualisation on its unit page (``featvis_steps`` > 0):
``units/featvis/<layer>/<channel>.jpg``, the image that maximises the channel's mean activation,
optimised by :func:`deconvis.featvis.optimize.visualize_channels` (batched over channels; the
settings of ``deconvis featvis`` but ``featvis_steps`` steps and the run's ``seed``) at the run's
input size."""
from __future__ import annotations

import os
from typing import Any, Dict

from deconvis.featvis.optimize import LayerObjective, visualize_channels
from deconvis.featvis.run import FeatvisOptions, to_uint8
from deconvis.io.atomic import write_image
from deconvis.render.sheets import safe_name
from deconvis.runs.results import Results

#: the images: ``units/featvis/<layer>/<channel>.jpg``, relative to the run folder
FEATVIS_DIR = "units/featvis"


def featvis_path(label: str, channel: int) -> str:
    """The image of ``channel`` of the layer labelled ``label``, relative to the run folder."""
    return f"{FEATVIS_DIR}/{safe_name(label)}/{int(channel):04d}.jpg"


def featvis_phase(ctx: Any, res: Results, run_dir: str) -> Dict[str, Any]:
    """Optimise every mined channel's image (``ctx.cfg.featvis_steps`` steps) and record per layer
    ``unit_extras["featvis"]`` (paths) and ``["featvis_objective"]`` (the channel mean on the final
    image). Returns the record for ``res.unit_extras["featvis"]``."""
    opts = FeatvisOptions(steps=int(ctx.cfg.featvis_steps), seed=int(ctx.cfg.seed))
    opts.validate()
    kwargs = opts.kwargs(tuple(ctx.preprocess.crop))
    model = ctx.loaded.model
    pp = ctx.preprocess
    seconds = 0.0
    for lr in res.layers:
        chans = [u.channel for u in lr.units]
        obj = LayerObjective(model, lr.name, mean=pp.mean, std=pp.std)
        fv = visualize_channels(model, lr.name, chans, objective=obj, **kwargs)
        seconds += fv.seconds
        ex = lr.unit_extras = dict(lr.unit_extras or {})
        ex["featvis"], ex["featvis_objective"] = [], []
        for ch, img, score in zip(fv.channels, to_uint8(fv.images), fv.objective.tolist()):
            rel = featvis_path(lr.label, ch)
            write_image(os.path.join(run_dir, rel), img, durable=False)
            ex["featvis"].append(rel)
            ex["featvis_objective"].append(float(score))
    return {"steps": opts.steps, "size": list(kwargs["size"]), "seed": opts.seed, "objective": "channel mean",
            "optimise_seconds": round(seconds, 3)}
