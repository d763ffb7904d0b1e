"""User-facing errors: a clear one-line message naming the problem and the fix.

The CLI prints ``deconvis: error: <message>`` and exits with status 2 for these; any other
exception is a bug in deconvis and keeps its traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class DeconvisError(Exception):
    """A problem with the user's input (model, layer, config, files), not a bug."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """A ``did you mean: a, b?`` suffix for an unknown ``name`` (empty when nothing is close)."""
    cands = list(candidates)
    hits = difflib.get_close_matches(name, cands, n=n, cutoff=0.5)
    if not hits:
        hits = [c for c in cands if name.lower() in c.lower()][:n]
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""
