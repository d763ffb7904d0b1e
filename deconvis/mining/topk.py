"""The top-k state of mining: for every channel of every chosen layer, the k strongest images
(:class:`TopK`), updated batch by batch (the loop is :func:`deconvis.mining.mine.mine`).

One image contributes at most one entry per channel: its strongest activation over spatial
positions (ZF 2014, Fig. 2), with the position ``(y, x)`` of that maximum in the layer's map.
The state is O(layers x channels x k) whatever the size of the image set, lives on the
activations' device, and is updated with tensor ops only (no per-element Python, no host sync per
batch).

Ordering (ties break deterministically, so the same inputs and config give the same winners):

1. larger activation first;
2. on equal activations, the smaller global image index first;
3. within one image, the first position of the maximum in row-major order (smallest ``y``, then
   smallest ``x``) -- the index ``torch.max(dim)`` returns for ties.

Non-finite activations never win: an image whose map holds a NaN or ``+inf`` in a channel (an
fp16 overflow under ``--amp fp16``, NaN weights) is no candidate of that channel at all; every
such (image, channel) is counted per layer and channel (:attr:`TopK.nonfinite`, with the first
image it happened in), so the caller can name them (:mod:`deconvis.mining.nonfinite`) and no
non-finite number reaches ``results.json``. The one exception is the candidate pool of an
autocast run that is re-ranked in full precision (``inf_wins=True``, :mod:`deconvis.mining.rerank`):
there ``+inf`` (an overflow: the true value is large, not undefined) competes as the largest
value, so the re-rank can pick that image; NaN never competes. Activations are compared in float64 (float32 on
MPS), which is exact for float16/32 input.

:meth:`TopK.merge` of states built from disjoint image sets gives exactly the winners of one pass
over their union (the ordering above is a total order on (value, image)), so shards can be mined
independently (e.g. per torch.distributed rank) and merged. :meth:`TopK.state_dict` holds only
plain tensors, ints and lists: ``torch.load(..., weights_only=True)`` reads it back.

Bottom-k: with ``bottom_k`` and ``bottom_of`` (mined layer -> the row of its pre-activation,
:meth:`deconvis.graph.trace.TracedGraph.preactivation`), the same structure keeps, per channel of
each pre-activation, the ``bottom_k`` images whose minimum over positions is the most negative: a
second :class:`TopK` (:attr:`TopK.bottom`, keyed by the pre-activation's row) fed the *negated*
maps, so its order is the same total order on ``-value``: the most negative first, ties to the
smaller image index, then the first position of the minimum in row-major order. It merges,
checkpoints and resumes with its parent. With ``labels`` (:meth:`TopK.set_labels`), per layer
the class sums of :mod:`deconvis.mining.classmeans` are collected beside the unit statistics.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from deconvis.errors import DeconvisError
from deconvis.mining.classmeans import ClassMeans
from deconvis.mining.unitstats import UnitStats

#: image index of an empty slot (sorts after every real image on equal value -inf)
EMPTY = torch.iinfo(torch.int64).max

_FIELDS = ("values", "images", "ys", "xs")


def _value_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _select(values: Tensor, images: Tensor, ys: Tensor, xs: Tensor, k: int) -> Tuple[Tensor, ...]:
    """Keep, per row, the ``k`` best of the candidates ``[C, n]`` by (value desc, image asc).

    Two stable sorts implement the lexicographic order; the row-major position tie-break inside
    one image happened earlier (one candidate per image and row).
    """
    by_image = torch.argsort(images, dim=1, stable=True)
    v = values.gather(1, by_image)
    by_value = torch.argsort(v, dim=1, descending=True, stable=True)
    order = by_image.gather(1, by_value)[:, :k]
    return tuple(t.gather(1, order) for t in (values, images, ys, xs))


def _as_maps(act: Tensor) -> Tensor:
    """``act`` as maps [N, C, h, w] (``[N, C]`` read as ``h = w = 1``); a clear error otherwise."""
    if act.dim() == 2:
        act = act[:, :, None, None]
    if act.dim() != 4:
        raise DeconvisError(f"mining needs activations [N, C, h, w] or [N, C], got shape {tuple(act.shape)}")
    if act.shape[2] * act.shape[3] == 0:
        raise DeconvisError(f"activation map of shape {tuple(act.shape)} is empty")
    return act


def _row_col(idx: Tensor, w: int) -> Tuple[Tensor, Tensor]:
    """Row and column (int64) of flat row-major positions ``idx`` in maps ``w`` wide."""
    return torch.div(idx, w, rounding_mode="floor"), idx % w


def channel_maxima(act: Tensor, negate: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Per image and channel, the maximum over positions and where it is (``negate``: the
    maximum of ``-act``, i.e. minus the minimum, at the first minimum, without negating the map).

    ``act`` is ``[N, C, h, w]`` (or ``[N, C]``, read as ``h = w = 1``). Returns ``values [N, C]``
    (NaN where the map holds a NaN, ``+inf`` where it holds one: the reduction propagates them),
    ``ys [N, C]``, ``xs [N, C]`` (int64, first maximum in row-major order).
    """
    act = _as_maps(act)
    n, c, h, w = act.shape
    flat = act.reshape(n, c, h * w)
    vals, idx = flat.min(dim=2) if negate else flat.max(dim=2)  # ties: index of the first extremal value
    vals = vals.to(_value_dtype(act.device))
    if negate:
        vals = -vals
    return (vals,) + _row_col(idx, w)


#: on the CPU, find the position of a channel's maximum only where its value can enter the top-k
#: (at least the current k-th value): the maxima come from one ``amax`` pass (about 9x faster than
#: ``max`` with its indices), the positions from ``max`` over the few maps that compete. After the
#: first batches few images beat the k-th best, so most positions are never looked for.
LAZY_POSITIONS = True

#: the lazy form falls back to one ``max`` with indices over every map when more than this share
#: of the (image, channel) pairs compete (the first batches): gathering them would cost more
LAZY_MAX_SHARE = 0.25


def channel_values(act: Tensor, negate: bool = False) -> Tensor:
    """The values of :func:`channel_maxima` [N, C] (float64; float32 on MPS) alone, without
    their positions (NaN and ``+inf`` propagate the same way)."""
    act = _as_maps(act)
    vals = (act.amin(dim=(2, 3)) if negate else act.amax(dim=(2, 3))).to(_value_dtype(act.device))
    return -vals if negate else vals


def positions_where(act: Tensor, need: Tensor, negate: bool = False) -> Tuple[Tensor, Tensor]:
    """``ys, xs`` [N, C] (int64) of :func:`channel_maxima` where ``need`` (bool [N, C]) is set, 0
    elsewhere: the first maximum (``negate``: minimum) in row-major order of each needed map."""
    act = _as_maps(act)
    n, c, h, w = act.shape
    ys = torch.zeros((n, c), dtype=torch.int64, device=act.device)
    xs = torch.zeros((n, c), dtype=torch.int64, device=act.device)
    where = need.nonzero()  # [P, 2]
    if len(where):
        maps = act[where[:, 0], where[:, 1]].reshape(len(where), h * w)  # [P, h*w]
        idx = (maps.min(dim=1) if negate else maps.max(dim=1)).indices  # ties: the first extremal value
        rows, cols = _row_col(idx, w)
        ys[where[:, 0], where[:, 1]] = rows
        xs[where[:, 0], where[:, 1]] = cols
    return ys, xs


class TopK:
    """The running k strongest (one per image) activations of every channel of ``layers``.

    Per layer, four ``[C, k]`` tensors on ``device``: ``values`` (float64), ``images`` (global
    image index, int64; :data:`EMPTY` for unfilled slots), ``ys``, ``xs`` (position in the layer's
    map). Row ``c`` is sorted best first. ``C`` is fixed by the first update of the layer.
    ``nonfinite[layer]`` (int64 ``[C]``) counts the images whose map was not finite in that
    channel (never candidates), ``nonfinite_first[layer]`` the smallest such image (:data:`EMPTY`
    for none); both stay on ``device`` (no host sync per batch).
    ``seen`` counts the dataset items consumed (including unreadable ones listed in ``skipped``);
    a resumed run continues at item ``seen``.
    """

    #: whether new layers get :class:`UnitStats` (off for the re-rank pass, which sees only candidates)
    collect_stats = True

    def __init__(self, layers: Sequence[str], k: int, device: "str | torch.device" = "cpu", inf_wins: bool = False,
                 bottom_k: int = 0, bottom_of: Optional[Mapping[str, Optional[str]]] = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise DeconvisError(f"k must be a positive integer, got {k!r}")
        if not layers:
            raise DeconvisError("mining needs at least one layer")
        self.layers: List[str] = list(layers)
        self.k = k
        self.device = torch.device(device)
        self.state: Dict[str, Dict[str, Tensor]] = {}
        self.seen = 0
        self.skipped: List[int] = []
        self.nonfinite: Dict[str, Tensor] = {}
        self.nonfinite_first: Dict[str, Tensor] = {}
        self.stats: Dict[str, UnitStats] = {}  # per layer, the maxima's histogram and moments (unit pages)
        self.inf_wins = bool(inf_wins)  # +inf competes (a pool re-ranked in full precision)
        self.labels: Optional[Tensor] = None  # class index per global image id (int64, -1: none); set_labels
        self.n_classes = 0
        self.collect_classes = self.collect_stats  # off for a resumed state that has no class sums
        self.classes: Dict[str, ClassMeans] = {}  # per layer, the class sums of the maxima (unit pages)
        # bottom-k: mined layer -> pre-activation row (the first mined layer of a row keeps it)
        self.bottom_of: Dict[str, str] = {}
        self.bottom: Optional[TopK] = None
        if bottom_k and bottom_of:
            for layer in self.layers:
                node = bottom_of.get(layer)
                if node is not None and node not in self.bottom_of.values():
                    self.bottom_of[layer] = node
            if self.bottom_of:
                self.bottom = self._bottom_topk(list(self.bottom_of.values()), int(bottom_k))

    def _bottom_topk(self, nodes: Sequence[str], k: int) -> "TopK":
        """The state of the minima: a plain TopK of the negated maps (no statistics of its own)."""
        b = TopK(nodes, k, self.device)
        b.collect_stats = False
        return b

    def set_labels(self, labels: Optional[Sequence[int]], n_classes: int) -> None:
        """Collect per-class sums of the maxima (:class:`ClassMeans`) for images labelled
        ``labels[i]`` (a class index per global image id; -1: none) among ``n_classes`` classes;
        None: no labels (nothing collected)."""
        if labels is None or n_classes < 1:
            self.labels, self.n_classes = None, 0
            return
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64, device=self.device)
        self.n_classes = int(n_classes)

    # -- updates -------------------------------------------------------------------------------
    def _empty(self, channels: int, dtype: torch.dtype) -> Dict[str, Tensor]:
        dev = self.device
        return {
            "values": torch.full((channels, self.k), float("-inf"), dtype=dtype, device=dev),
            "images": torch.full((channels, self.k), EMPTY, dtype=torch.int64, device=dev),
            "ys": torch.zeros((channels, self.k), dtype=torch.int64, device=dev),
            "xs": torch.zeros((channels, self.k), dtype=torch.int64, device=dev),
        }

    @torch.inference_mode()
    def update_layer(self, layer: str, act: Tensor, image_ids: Tensor, eligible: Optional[Tensor] = None,
                     negate: bool = False) -> None:
        """Fold one batch of ``layer``'s activations ``[N, C, h, w]`` for images ``image_ids [N]``
        (global dataset indices) into the state. ``eligible`` (bool ``[N, C]``, optional) limits
        which (image, channel) pairs may compete (the candidate pool of :mod:`deconvis.mining.rerank`);
        ``negate``: fold ``-act`` (the bottom-k's minima, the map itself left as it is)."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} is not mined by this TopK ({self.layers})")
        if act.shape[0] != image_ids.shape[0]:
            raise ValueError(f"{act.shape[0]} activations for {image_ids.shape[0]} image ids")
        if act.device != self.device:
            act = act.to(self.device)
        st = self.state.get(layer)
        if LAZY_POSITIONS and act.device.type == "cpu" and st is not None and act.shape[1] == st["values"].shape[0]:
            vals = channel_values(act, negate)
            need = vals >= st["values"][:, -1]  # [N, C]: may enter (ties too); NaN never does
            if eligible is not None:
                need &= eligible.to(device=self.device, dtype=torch.bool)
            if need.sum() > LAZY_MAX_SHARE * need.numel():
                vals, ys, xs = channel_maxima(act, negate)
            else:
                ys, xs = positions_where(act, need, negate)
        else:
            vals, ys, xs = channel_maxima(act, negate)
        ids = image_ids.to(device=self.device, dtype=torch.int64, non_blocking=True)
        if st is None:
            st = self._empty(vals.shape[1], vals.dtype)
            self.nonfinite[layer] = torch.zeros(vals.shape[1], dtype=torch.int64, device=self.device)
            self.nonfinite_first[layer] = torch.full((vals.shape[1],), EMPTY, dtype=torch.int64, device=self.device)
            if self.collect_stats:
                self.stats[layer] = UnitStats(vals.shape[1], self.device)
        elif st["values"].shape[0] != vals.shape[1]:
            raise ValueError(f"layer {layer!r} had {st['values'].shape[0]} channels, now {vals.shape[1]}")
        if layer in self.stats:
            self.stats[layer].update(vals)
        if self.labels is not None and self.collect_classes:
            if layer not in self.classes:
                self.classes[layer] = ClassMeans(vals.shape[1], self.n_classes, self.device)
            self.classes[layer].update(vals, self.labels[ids])
        bad = ~torch.isfinite(vals)  # [N, C]: NaN, +inf (or a map of -inf only)
        ids_nc = ids[:, None].expand_as(vals)
        self.nonfinite[layer] = self.nonfinite[layer] + bad.sum(0)
        first = torch.where(bad, ids_nc, torch.full_like(ids_nc, EMPTY)).amin(0)
        self.nonfinite_first[layer] = torch.minimum(self.nonfinite_first[layer], first)
        if self.inf_wins:  # an overflow competes as the largest value; NaN and -inf never do
            bad = bad & (vals != float("inf"))
        if eligible is not None:
            bad = bad | ~eligible.to(device=self.device, dtype=torch.bool)
        vals = vals.masked_fill(bad, float("-inf"))
        ids_nc = ids_nc.masked_fill(bad, EMPTY)
        cand = (vals.T, ids_nc.T, ys.T, xs.T)
        merged = [torch.cat((st[f], c.to(st[f].dtype)), dim=1) for f, c in zip(_FIELDS, cand)]
        self.state[layer] = dict(zip(_FIELDS, _select(*merged, self.k)))

    def update(self, acts: Mapping[str, Tensor], image_ids: Tensor) -> None:
        """Fold one batch (``{layer: [N, C, h, w]}``) into every mined layer (the ids go to the
        device once per batch, not once per layer)."""
        ids = image_ids.to(device=self.device, dtype=torch.int64, non_blocking=True)
        for layer in self.layers:
            if layer not in acts:
                raise KeyError(f"activations lack layer {layer!r} (got {sorted(acts)})")
            self.update_layer(layer, acts[layer], ids, self.eligible(layer, ids))
        if self.bottom is not None:
            for node in self.bottom.layers:
                if node not in acts:
                    raise KeyError(f"activations lack the pre-activation {node!r} of the bottom-k (got {sorted(acts)})")
                self.bottom.update_layer(node, acts[node], ids, negate=True)

    def eligible(self, layer: str, image_ids: Tensor) -> Optional[Tensor]:
        """Which (image, channel) pairs may compete (bool ``[N, C]``); None: all (subclasses
        restrict it, see :class:`deconvis.mining.rerank.PoolTopK`)."""
        return None

    @torch.inference_mode()
    def merge(self, other: "TopK") -> "TopK":
        """Fold ``other`` (mined over a disjoint set of images) into this state, in place.

        The result equals one pass over the union of both image sets. Returns ``self``.
        """
        if other.k != self.k or other.layers != self.layers:
            raise ValueError(f"cannot merge TopK(k={other.k}, layers={other.layers}) into "
                             f"TopK(k={self.k}, layers={self.layers})")
        for layer in self.layers:
            theirs = other.state.get(layer)
            if theirs is None:
                continue
            theirs = {f: t.to(self.device) for f, t in theirs.items()}
            mine = self.state.get(layer)
            if mine is None:
                self.state[layer] = theirs
                continue
            if mine["values"].shape[0] != theirs["values"].shape[0]:
                raise ValueError(f"layer {layer!r}: {mine['values'].shape[0]} vs {theirs['values'].shape[0]} channels")
            dtype = torch.promote_types(mine["values"].dtype, theirs["values"].dtype)
            merged = [torch.cat((mine[f].to(dtype) if f == "values" else mine[f],
                                 theirs[f].to(dtype) if f == "values" else theirs[f]), dim=1) for f in _FIELDS]
            self.state[layer] = dict(zip(_FIELDS, _select(*merged, self.k)))
        for layer, count in other.nonfinite.items():
            count = count.to(self.device)
            first = other.nonfinite_first[layer].to(self.device)
            if layer in self.nonfinite:
                self.nonfinite[layer] = self.nonfinite[layer] + count
                self.nonfinite_first[layer] = torch.minimum(self.nonfinite_first[layer], first)
            else:
                self.nonfinite[layer], self.nonfinite_first[layer] = count.clone(), first.clone()
        for layer, st in other.stats.items():
            if layer in self.stats:
                self.stats[layer].merge(st)
            else:
                self.stats[layer] = UnitStats.from_state_dict(st.state_dict(), self.device)
        for layer, cm in other.classes.items():
            if layer in self.classes:
                self.classes[layer].merge(cm)
            else:
                self.classes[layer] = ClassMeans.from_state_dict(cm.state_dict(), self.device)
        if other.bottom is not None:
            if self.bottom is None:
                self.bottom_of = dict(other.bottom_of)
                self.bottom = self._bottom_topk(other.bottom.layers, other.bottom.k)
            self.bottom.merge(other.bottom)
        self.seen += other.seen
        self.skipped = sorted(set(self.skipped) | set(other.skipped))
        return self

    # -- read out ------------------------------------------------------------------------------
    def winners(self, layer: str) -> Dict[str, Tensor]:
        """``layer``'s state on the CPU: ``values, images, ys, xs`` ``[C, k]`` plus ``valid``
        (bool ``[C, k]``, False for empty slots when fewer than k images were seen)."""
        st = self.state.get(layer)
        if st is None:
            raise KeyError(f"layer {layer!r} has not been mined yet")
        out = {f: st[f].detach().cpu().clone() for f in _FIELDS}
        out["valid"] = out["images"] != EMPTY
        return out

    def bottom_winners(self, layer: str) -> Optional[Dict[str, Tensor]]:
        """The bottom-k of mined ``layer`` like :meth:`winners` (``values`` are the minima:
        negative first), or None when the layer has none (no pre-activation, or bottom-k off)."""
        node = self.bottom_of.get(layer)
        if self.bottom is None or node is None or node not in self.bottom.state:
            return None
        out = self.bottom.winners(node)
        out["values"] = -out["values"]
        return out

    # -- (de)serialisation ---------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        """Plain CPU tensors, ints and lists (loads with ``weights_only=True``)."""
        return {
            "k": self.k,
            "layers": list(self.layers),
            "seen": int(self.seen),
            "skipped": torch.tensor(self.skipped, dtype=torch.int64),
            "state": {layer: {f: t.detach().cpu().clone() for f, t in st.items()}
                      for layer, st in self.state.items()},
            "nonfinite": {layer: {"count": c.detach().cpu().clone(), "first": self.nonfinite_first[layer].detach().cpu().clone()}
                          for layer, c in self.nonfinite.items()},
            "stats": {layer: st.state_dict() for layer, st in self.stats.items()},
            "classes": {layer: cm.state_dict() for layer, cm in self.classes.items()},
            "bottom": None if self.bottom is None else self.bottom.state_dict(),
            "bottom_of": dict(self.bottom_of),
        }

    def load_state_dict(self, d: Mapping[str, object]) -> "TopK":
        """Restore a :meth:`state_dict` (same k and layers) onto this object's device."""
        if int(d["k"]) != self.k or list(d["layers"]) != self.layers:  # type: ignore[arg-type]
            raise ValueError(f"state for k={d['k']}, layers={d['layers']} does not fit "
                             f"k={self.k}, layers={self.layers}")
        self.seen = int(d["seen"])  # type: ignore[arg-type]
        self.skipped = [int(i) for i in d["skipped"].tolist()]  # type: ignore[union-attr]
        self.state = {layer: {f: st[f].to(self.device) for f in _FIELDS}
                      for layer, st in d["state"].items()}  # type: ignore[union-attr]
        nf = d.get("nonfinite") or {}  # type: ignore[union-attr]  # absent in checkpoints before it existed
        self.nonfinite = {layer: v["count"].to(self.device) for layer, v in nf.items()}
        self.nonfinite_first = {layer: v["first"].to(self.device) for layer, v in nf.items()}
        st = d.get("stats")  # type: ignore[union-attr]
        self.stats = {layer: UnitStats.from_state_dict(v, self.device) for layer, v in (st or {}).items()}
        if st is None and self.seen > 0:  # a checkpoint from before unit statistics: none, not a partial count
            self.collect_stats = False
        cl = d.get("classes")  # type: ignore[union-attr]
        self.classes = {layer: ClassMeans.from_state_dict(v, self.device) for layer, v in (cl or {}).items()}
        if cl is None and self.seen > 0:  # a checkpoint from before class sums: none, not a partial count
            self.collect_classes = False
        b = d.get("bottom")  # type: ignore[union-attr]
        if b is not None:
            self.bottom_of = dict(d.get("bottom_of") or {})  # type: ignore[union-attr,arg-type]
            self.bottom = self._bottom_topk(list(b["layers"]), int(b["k"])).load_state_dict(b)  # type: ignore[index]
        elif self.seen > 0:  # a checkpoint without the minima: none, not a partial bottom-k
            self.bottom, self.bottom_of = None, {}
        return self

    @classmethod
    def from_state_dict(cls, d: Mapping[str, object], device: "str | torch.device" = "cpu") -> "TopK":
        return cls(list(d["layers"]), int(d["k"]), device).load_state_dict(d)  # type: ignore[arg-type]
