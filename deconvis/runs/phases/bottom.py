"""Projection of the bottom-k: each mined layer's most negative pre-activation responses
(:attr:`deconvis.runs.results.LayerResult.bottom`), projected exactly as the top-k.

The bottom-k of a layer is a :class:`~deconvis.runs.results.LayerResult` of its pre-activation
row (label ``<label>-bottom``), so the top-k's projection phase runs on it unchanged: a
*shadow* :class:`~deconvis.runs.results.Results` whose layers are the bottom-k layers (the same
objects, so what the phase fills lands in the real results), with its own progress files
(``projection-bottom.rank<r>.json``) and its own sprites (``tiles/<label>-bottom/``). Every unit
is projected from the pre-activation row at its position, seeded with its own (negative) value,
through the run's rule (docs/method.md, "The bottom-k").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional

from deconvis.render import sheets as render
from deconvis.runs.phases.prepare import Context
from deconvis.runs.phases.project import plan_projection, project_phase
from deconvis.runs.results import Results, bottom_k

#: the prefix of the bottom-k's progress files (``projection-bottom.rank<r>.json``)
PREFIX = "projection-bottom"


def shadow(res: Results) -> Optional[Results]:
    """The bottom-k layers of ``res`` as a Results of their own (sharing the layer objects), or
    None when no layer has a bottom-k."""
    layers = [lr.bottom for lr in res.layers if lr.bottom is not None]
    if not layers or bottom_k(res) < 1:
        return None
    return dataclasses.replace(res, layers=layers, k=bottom_k(res), analyses={})


def plan(ctx: Context, res: Optional[Results], progress: Optional[List[Any]] = None) -> List[render.TileJob]:
    """The bottom units still to project (see :func:`deconvis.runs.phases.project.plan_projection`)."""
    if res is None:
        return []
    return plan_projection(ctx, res, progress)


def project(ctx: Context, res: Optional[Results], jobs: List[render.TileJob],
            poll: Optional[Callable[[], None]] = None, replay: Optional[Any] = None) -> int:
    """Project this rank's share of the bottom units of the shadow ``res``; returns how many."""
    if res is None or not jobs:
        return 0
    return project_phase(ctx, res, jobs, poll=poll, replay=replay, prefix=PREFIX)
