"""deconvis: see what each unit of a CNN responds to (Zeiler & Fergus, ECCV 2014).

Main entry points (imported lazily so ``import deconvis`` stays cheap)::

    from deconvis import DeconvNet, receptive_fields, load_model
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DeconvNet": "deconvis.mirror.deconvnet",
    "DeconvisError": "deconvis.errors",
    "load_model": "deconvis.io.models",
    "receptive_fields": "deconvis.graph.rf",
    "RFTable": "deconvis.graph.rf",
    "effective_receptive_field": "deconvis.graph.erf",
    "to_uint8": "deconvis.render.display",
    "SnapshotCallback": "deconvis.training.snapshots",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deconvis' has no attribute {name!r}")
