"""The features a :class:`~deconvis.training.snapshots.SnapshotCallback` follows: its
``features_per_layer`` spec (an int, a list of channel ids or a dict layer -> ids) checked against
the layers' channel counts and turned into channel ids per layer.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from deconvis.errors import DeconvisError, close_matches

FEATURE_SELECTIONS = ("top", "first", "spread")

FeaturesSpec = Union[int, Sequence[int], Mapping[str, Sequence[int]]]


def spec_repr(spec: FeaturesSpec) -> Any:
    """JSON-able form of a features spec (kept in the state to check a resume against)."""
    if isinstance(spec, Mapping):
        return {str(k): [int(c) for c in v] for k, v in spec.items()}
    if isinstance(spec, (int, np.integer)):
        return int(spec)
    return [int(c) for c in spec]


def check_channels(label: str, chans: Any, c: int) -> List[int]:
    """``chans`` checked as distinct channel ids of a layer shown as ``label`` with ``c`` channels."""
    try:
        ids = list(chans)
    except TypeError:
        raise DeconvisError(f"features for {label!r} must be a list of channel ids, got {chans!r}") from None
    if not ids:
        raise DeconvisError(f"features for {label!r} is empty; give at least one channel id")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise DeconvisError(f"channel ids must be integers, got {i!r} for {label!r}")
        if not 0 <= i < c:
            raise DeconvisError(f"feature {i} is out of range for {label!r}, which has "
                                f"{c} channels (ids 0..{c - 1})")
    if len(set(ids)) != len(ids):
        raise DeconvisError(f"features for {label!r} repeat a channel: {ids}")
    return [int(i) for i in ids]


def resolve_features(spec: FeaturesSpec, layers: Sequence[str], display: Mapping[str, str],
                     channels: Mapping[str, int], select: str,
                     resolve: Callable[[str], str]) -> Dict[str, Optional[List[int]]]:
    """Per layer, the channel ids of ``spec`` (see :class:`~deconvis.training.snapshots.SnapshotCallback`);
    None where ``select`` is ``top`` and they are chosen at the first snapshot. ``resolve``: layer
    name or alias -> row name; ``display``: row -> shown name; ``channels``: row -> channel count."""
    out: Dict[str, Optional[List[int]]] = {}
    if isinstance(spec, Mapping):
        given = {}
        for k, v in spec.items():
            try:
                name = resolve(str(k))
            except DeconvisError:
                name = None
            if name not in layers:
                raise DeconvisError(f"features_per_layer names layer {k!r}, which is not in layers "
                                    f"{[display[l] for l in layers]}"
                                    + close_matches(str(k), list(display.values())))
            given[name] = v
        missing = [display[l] for l in layers if l not in given]
        if missing:
            raise DeconvisError(f"features_per_layer gives no channels for {missing}; add them or use an int")
        return {l: check_channels(display[l], given[l], channels[l]) for l in layers}
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        n = int(spec)
        if n < 1:
            raise DeconvisError(f"features_per_layer must be at least 1, got {n}")
        for l in layers:
            if n > channels[l]:
                raise DeconvisError(f"features_per_layer={n} but {display[l]!r} has only "
                                    f"{channels[l]} channels")
            if select == "first":
                out[l] = list(range(n))
            elif select == "spread":
                out[l] = [int(round(i)) for i in np.linspace(0, channels[l] - 1, n)]
            else:
                out[l] = None  # chosen at the first snapshot
        return out
    if isinstance(spec, (str, bytes)) or isinstance(spec, bool):
        raise DeconvisError(f"features_per_layer must be an int, a list of channel ids or a dict, got {spec!r}")
    return {l: check_channels(display[l], spec, channels[l]) for l in layers}  # type: ignore[arg-type]
