"""Say which layers and channels produced non-finite activations while mining.

:class:`deconvis.mining.TopK` never lets a NaN or ``+inf`` channel maximum compete (see its module
doc) and counts them per layer and channel on the device. This module turns those counts into
one warning per layer and a JSON-able summary for ``results.json`` (only finite numbers, ints).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from deconvis.mining.mine import EMPTY, TopK

#: channels named in one warning line (the rest are counted)
SHOWN = 5


def nonfinite_summary(topk: TopK) -> Dict[str, Dict[str, object]]:
    """``{layer: {"images": total (image, channel) pairs, "channels": {channel: count},
    "first_image": smallest image id}}`` for the layers that had any (one host sync per layer)."""
    out: Dict[str, Dict[str, object]] = {}
    for layer in topk.layers:
        count = topk.nonfinite.get(layer)
        if count is None:
            continue
        count = count.cpu()
        if int(count.sum()) == 0:
            continue
        first = topk.nonfinite_first[layer].cpu()
        chans = {int(c): int(count[c]) for c in count.nonzero().flatten().tolist()}
        firsts = [int(v) for v in first.tolist() if int(v) != EMPTY]
        out[layer] = {"images": int(count.sum()), "channels": chans, "first_image": min(firsts) if firsts else None}
    return out


def nonfinite_messages(summary: Dict[str, Dict[str, object]], labels: Optional[Dict[str, str]] = None,
                       amp: str = "none", image_name: Optional[Callable[[int], str]] = None,
                       reranked: bool = False) -> List[str]:
    """One warning line per layer of ``summary`` (see :func:`nonfinite_summary`): the layer, its
    channels, the first image, and what avoids it (``--amp bf16`` or ``none`` after an fp16 run).
    ``reranked``: the autocast candidates were re-ranked in full precision, where an overflow
    (``+inf``) competed by its true value and only NaN was left out."""
    msgs = []
    for layer, info in summary.items():
        chans: Dict[int, int] = info["channels"]  # type: ignore[assignment]
        shown = ", ".join(f"{c} ({n} image{'s' if n > 1 else ''})" for c, n in list(chans.items())[:SHOWN])
        more = f" and {len(chans) - SHOWN} more" if len(chans) > SHOWN else ""
        first = info.get("first_image")
        where = ""
        if first is not None:
            where = f"; first in image {first}" + (f" ({image_name(int(first))})" if image_name else "")
        hint = ("fp16 overflows above 65504: --amp bf16 or --amp none avoids it" if amp == "fp16"
                else "check the weights and the images for NaN or infinite values")
        label = (labels or {}).get(layer, layer)
        fate = ("overflows (+inf) were re-ranked by their full-precision value, NaN images left out of those "
                "channels" if reranked else "those images are left out of those channels")
        msgs.append(f"layer {label}: non-finite activations (NaN or inf) in channel{'s' if len(chans) > 1 else ''} "
                    f"{shown}{more}{where}; {fate} ({hint})")
    return msgs
