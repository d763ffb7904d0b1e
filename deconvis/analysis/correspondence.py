"""Correspondence between object parts across images (Zeiler & Fergus 2014, Sec. 4.2, Table 1).

For images i = 1..n of one kind (faces), the same part (left eye, nose, ...) is masked in each,
and at layer l ``eps_i = f_l(x_i) - f_l(x~_i)`` is the change of the flattened feature vector.
The consistency of that change across images is

    Delta_l = mean over pairs i < j of H(sign(eps_i), sign(eps_j)),

where ``H`` is the Hamming distance divided by the vector length D (the fraction of the D
coordinates whose signs differ; ``sign`` takes the values -1, 0, +1 and a 0 counts as a sign of
its own). This equals ZF's sum over ordered pairs i != j divided by n (n - 1) D, which is how
their Table 1 values (0.067 ... 0.107) must be normalised. Lower = the net changes the same way
for the same part. As a control, each part is compared with randomly placed boxes of the same
size that do not overlap it (a new position per image and trial, uniform over every position of
the box inside the image that shares no pixel with the part; the boxes used are in the result).
The spread is given over pairs (std of H over the
pairs) and over images (std over i of the mean H between image i and the others).

Boxes are ``(y0, y1, x0, x1)``, half-open, in pixels of the photo as annotated; each image may be
a ``crop`` of its photo (same convention). Masked pixels take the ``fill`` (``mean``: the
normalisation mean colour, 0 in network input space; or ``black``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from deconvis.analysis.common import check_fill, fill_value, flat, markdown_table, pyplot, resolve_layers, save_figure
from deconvis.errors import DeconvisError
from deconvis.io.images import crop_offset, resized_size
from deconvis.io.models import Preprocess
from deconvis.mirror.deconvnet import DeconvNet

Box = Tuple[int, int, int, int]


@dataclass(frozen=True)
class PartBox:
    """One annotation: ``part`` of ``image`` (file or skimage:NAME) lies in ``box`` (photo pixels,
    half-open y0, y1, x0, x1); ``crop`` (same convention) is the photo region used as the image."""

    image: str
    part: str
    box: Box
    crop: Optional[Box] = None

    @property
    def key(self) -> str:
        """Name of the image this box belongs to (photo plus crop)."""
        if self.crop is None:
            return self.image
        y0, y1, x0, x1 = self.crop
        return f"{self.image}[{y0}:{y1},{x0}:{x1}]"


def _box(value: object, where: str) -> Box:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise DeconvisError(f"{where} must be [y0, y1, x0, x1] (half-open pixels), got {value!r}")
    try:
        y0, y1, x0, x1 = (int(v) for v in value)
    except (TypeError, ValueError):
        raise DeconvisError(f"{where} must hold 4 integers [y0, y1, x0, x1], got {value!r}") from None
    if not (y0 < y1 and x0 < x1):
        raise DeconvisError(f"{where} {value!r} is empty: need y0 < y1 and x0 < x1 ([y0, y1, x0, x1])")
    return (y0, y1, x0, x1)


def parse_part_boxes(records: object, source: str = "parts") -> List[PartBox]:
    """A list of mappings with keys ``image``, ``part``, ``box`` and optional ``crop`` -> PartBoxes."""
    if isinstance(records, dict) and "parts" in records:
        records = records["parts"]
    if not isinstance(records, list) or not records:
        raise DeconvisError(f"{source}: expected a non-empty list of {{image, part, box}} records")
    out = []
    for i, r in enumerate(records):
        where = f"{source}: record {i}"
        if not isinstance(r, dict) or not {"image", "part", "box"} <= set(r):
            raise DeconvisError(f"{where} needs keys image, part, box (and optionally crop), got {r!r}")
        extra = set(r) - {"image", "part", "box", "crop"}
        if extra:
            raise DeconvisError(f"{where} has unknown keys {sorted(extra)}; allowed: image, part, box, crop")
        crop = _box(r["crop"], f"{where} crop") if r.get("crop") is not None else None
        out.append(PartBox(str(r["image"]), str(r["part"]), _box(r["box"], f"{where} box"), crop))
    return out


def load_part_boxes(path: str) -> List[PartBox]:
    """Part boxes from a YAML or JSON file (see :func:`parse_part_boxes`)."""
    if not os.path.isfile(path):
        raise DeconvisError(f"part-box file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise DeconvisError(f"part-box file {path!r} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    return parse_part_boxes(data, source=path)


def input_box(box: Box, photo_hw: Tuple[int, int], crop: Optional[Box], pp: Preprocess, where: str = "box") -> Box:
    """Map ``box`` (photo pixels) to network-input pixels: into the ``crop``, then the short-side
    resize and centre crop of ``pp`` (outer rounding, clipped to the input). DeconvisError when the
    box leaves the photo or the crop, or falls outside the network input."""
    H, W = photo_hw
    cy0, cy1, cx0, cx1 = crop if crop is not None else (0, H, 0, W)
    if not (0 <= cy0 < cy1 <= H and 0 <= cx0 < cx1 <= W):
        raise DeconvisError(f"crop {list(crop or ())} is outside the {H}x{W} photo (y in [0, {H}], x in [0, {W}])")
    y0, y1, x0, x1 = box
    if not (cy0 <= y0 < y1 <= cy1 and cx0 <= x0 < x1 <= cx1):
        raise DeconvisError(f"{where} {list(box)} is outside the image (y in [{cy0}, {cy1}], x in [{cx0}, {cx1}] "
                            "photo pixels); fix the box or the crop")
    h, w = cy1 - cy0, cx1 - cx0
    nh, nw = resized_size(h, w, pp.resize)
    top, left = crop_offset(nh, nw, pp.crop)
    sy, sx = nh / h, nw / w
    iy0 = max(0, int(np.floor((y0 - cy0) * sy)) - top)
    iy1 = min(pp.crop[0], int(np.ceil((y1 - cy0) * sy)) - top)
    ix0 = max(0, int(np.floor((x0 - cx0) * sx)) - left)
    ix1 = min(pp.crop[1], int(np.ceil((x1 - cx0) * sx)) - left)
    if iy0 >= iy1 or ix0 >= ix1:
        raise DeconvisError(f"{where} {list(box)} falls outside the network input after resizing and centre "
                            f"cropping to {pp.crop[0]}x{pp.crop[1]}; move the box or the crop")
    return (iy0, iy1, ix0, ix1)


def sign_hamming(eps: Tensor) -> np.ndarray:
    """[n, D] feature changes -> [n, n] normalised Hamming distances between their signs
    (fraction of the D coordinates where sign(eps_i) != sign(eps_j))."""
    s = torch.sign(eps.double())
    n, d = s.shape
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        out[i] = (s[i][None] != s).double().sum(1) / d
    return out.numpy()


@dataclass
class DeltaStats:
    """Delta_l of one row (a part, or random boxes of its size) at one layer."""

    mean: float        # mean over pairs i < j (and random trials) of H
    std_pairs: float   # std of H over those pairs
    std_images: float  # std over images of each image's mean H to the others
    n_images: int


def delta_stats(tables: Sequence[np.ndarray]) -> DeltaStats:
    """Statistics of one or more [n, n] H tables (random trials pooled)."""
    n = tables[0].shape[0]
    iu = np.triu_indices(n, 1)
    pairs = np.concatenate([t[iu] for t in tables])
    per_image = np.mean([t.sum(1) / (n - 1) for t in tables], axis=0)
    return DeltaStats(float(pairs.mean()), float(pairs.std()), float(per_image.std()), n)


@dataclass
class CorrespondenceResult:
    """Table 1: ``rows`` (part names, then ``random(<part>)``) x ``layers`` -> DeltaStats."""

    images: List[str]
    layers: List[str]
    fill: str
    random_trials: int
    seed: int
    boxes: Dict[str, Dict[str, List[int]]]              # part -> image -> input box
    random_boxes: Dict[str, Dict[str, List[List[int]]]] = field(default_factory=dict)  # part -> image -> box per trial
    table: Dict[str, Dict[str, DeltaStats]] = field(default_factory=dict)
    hamming: Dict[str, Dict[str, List[List[float]]]] = field(default_factory=dict)  # part rows only

    def to_dict(self) -> Dict[str, object]:
        return {"images": self.images, "layers": self.layers, "fill": self.fill,
                "random_trials": self.random_trials, "seed": self.seed,
                "normalisation": "H = fraction of feature coordinates whose sign (-1, 0, +1) differs; "
                                 "Delta = mean of H over image pairs i < j (= ZF's sum over i != j / (n(n-1)D))",
                "boxes_input_pixels": self.boxes,
                "random_boxes_input_pixels": self.random_boxes,
                "table": {r: {l: vars(s) for l, s in cols.items()} for r, cols in self.table.items()},
                "hamming": self.hamming}

    def markdown(self) -> str:
        heads = ["mask"] + [f"Delta {l}: mean ± std over pairs [std over images]" for l in self.layers] + ["images"]
        rows = [[r] + [f"{c[l].mean:.4f} ± {c[l].std_pairs:.4f} [{c[l].std_images:.4f}]" for l in self.layers]
                + [next(iter(c.values())).n_images] for r, c in self.table.items()]
        return (markdown_table(heads, rows) + "\nH: fraction of coordinates whose sign differs; Delta: mean over "
                f"image pairs. Random rows: boxes of the part's size at random places off the part, {self.random_trials} "
                f"trials (seed {self.seed}). Masked pixels: {self.fill} fill.\n")


def random_box(rng: np.random.Generator, part: Box, size: Tuple[int, int]) -> Optional[Box]:
    """A box of ``part``'s size inside an image of ``size`` (H, W) pixels that shares no pixel
    with ``part``, uniform over all such positions; None when there is none."""
    y0, y1, x0, x1 = part
    h, w = y1 - y0, x1 - x0
    ys, xs = np.arange(size[0] - h + 1)[:, None], np.arange(size[1] - w + 1)[None, :]
    free = np.flatnonzero(~((ys < y1) & (ys + h > y0) & (xs < x1) & (xs + w > x0)))
    if len(free) == 0:
        return None
    ry, rx = divmod(int(free[rng.integers(len(free))]), xs.shape[1])
    return (ry, ry + h, rx, rx + w)


def mask(x: Tensor, box: Box, value: Tensor) -> Tensor:
    """Copy of input ``x`` [3, H, W] with ``box`` (input pixels) set to ``value`` [3]."""
    y0, y1, x0, x1 = box
    out = x.clone()
    out[:, y0:y1, x0:x1] = value.to(out)[:, None, None]
    return out


@torch.no_grad()
def correspondence(model: nn.Module, inputs: Tensor, part_boxes: Dict[str, List[Optional[Box]]],
                   layers: Sequence[str], random_trials: int = 5, seed: int = 0, fill: str = "mean",
                   pp: Optional[Preprocess] = None, names: Optional[Sequence[str]] = None,
                   batch_size: int = 64) -> CorrespondenceResult:
    """ZF Table 1 for ``inputs`` [n, 3, H, W] (network input) and ``part_boxes`` {part: box in
    input pixels per image, or None where the image lacks the part}; each part needs >= 2 images."""
    if inputs.dim() != 4:
        raise DeconvisError(f"inputs must be [n, 3, H, W], got shape {list(inputs.shape)}")
    check_fill(fill, ("mean", "black"))
    if random_trials < 0:
        raise DeconvisError(f"random_trials {random_trials} must be >= 0")
    n, _, H, W = inputs.shape
    names = list(names or [f"image{i}" for i in range(n)])
    value = fill_value(fill, pp or Preprocess())
    rng = np.random.default_rng(seed)
    jobs: List[Tuple[str, int, int, Box]] = []  # (row, trial, image, box)
    controls: Dict[str, Dict[str, List[List[int]]]] = {}
    for part, boxes in part_boxes.items():
        if len(boxes) != n:
            raise DeconvisError(f"part {part!r}: {len(boxes)} boxes for {n} images")
        have = [i for i, b in enumerate(boxes) if b is not None]
        if len(have) < 2:
            raise DeconvisError(f"part {part!r} is marked in {len(have)} image(s); Delta needs at least 2")
        for i in have:
            y0, y1, x0, x1 = boxes[i]
            if not (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W):
                raise DeconvisError(f"part {part!r} box {list(boxes[i])} is outside the {H}x{W} input of {names[i]}")
            jobs.append((part, 0, i, boxes[i]))
        for t in range(random_trials):
            for i in have:
                rb = random_box(rng, boxes[i], (H, W))
                if rb is None:
                    raise DeconvisError(f"part {part!r} box {list(boxes[i])} leaves no place in the {H}x{W} input of "
                                        f"{names[i]} for a random box of its size off the part; use a smaller box "
                                        "or random_trials 0")
                jobs.append((f"random({part})", t, i, rb))
                controls.setdefault(part, {}).setdefault(names[i], []).append(list(rb))
    dn = DeconvNet(model)
    rows = resolve_layers(dn, layers)
    clean = dn.activations(inputs, rows)
    base = {r: flat(clean[r]) for r in rows}
    feats: Dict[str, List[Tensor]] = {r: [] for r in rows}
    for s in range(0, len(jobs), batch_size):
        batch = torch.stack([mask(inputs[i], b, value) for _, _, i, b in jobs[s:s + batch_size]])
        acts = dn.activations(batch, rows)
        for r in rows:
            feats[r].append(flat(acts[r]).cpu())
    allf = {r: torch.cat(v) for r, v in feats.items()}
    res = CorrespondenceResult(names, list(layers), fill, random_trials, seed,
                               boxes={p: {names[i]: list(b) for i, b in enumerate(bs) if b is not None}
                                      for p, bs in part_boxes.items()}, random_boxes=controls)
    groups: Dict[Tuple[str, int], List[int]] = {}
    for k, (row, t, _, _) in enumerate(jobs):
        groups.setdefault((row, t), []).append(k)
    for (row, t), idx in groups.items():
        imgs = [jobs[k][2] for k in idx]
        for l, r in zip(layers, rows):
            eps = base[r].cpu()[imgs] - allf[r][idx]
            res.hamming.setdefault(row, {}).setdefault(l, []).append(sign_hamming(eps).tolist())
    for row, by_layer in res.hamming.items():
        res.table[row] = {l: delta_stats([np.asarray(t) for t in tabs]) for l, tabs in by_layer.items()}
    res.hamming = {r: {l: v[0] for l, v in d.items()} for r, d in res.hamming.items() if not r.startswith("random(")}
    order = list(part_boxes) + [f"random({p})" for p in part_boxes if random_trials > 0]
    res.table = {r: res.table[r] for r in order}
    return res


def plot_correspondence(res: CorrespondenceResult, path: str, dpi: int = 80) -> None:
    """Bar chart: Delta per mask (parts solid, random boxes hatched) for each layer, with the
    std over pairs as error bars."""
    plt = pyplot()
    rows = list(res.table)
    fig, axes = plt.subplots(1, len(res.layers), figsize=(1.1 * len(rows) + 2, 3.4), squeeze=False)
    for ax, l in zip(axes[0], res.layers):
        means = [res.table[r][l].mean for r in rows]
        errs = [res.table[r][l].std_pairs for r in rows]
        bars = ax.bar(range(len(rows)), means, yerr=errs, capsize=3,
                      color=["tab:blue" if not r.startswith("random(") else "tab:gray" for r in rows])
        for b, r in zip(bars, rows):
            if r.startswith("random("):
                b.set_hatch("//")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(rows, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("Delta (sign-Hamming / D)", fontsize=8)
        ax.set_title(f"layer {l}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Part correspondence (ZF Table 1), {len(res.images)} images; lower = more consistent",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)
