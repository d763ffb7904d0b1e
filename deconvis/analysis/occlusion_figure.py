"""ZF Fig. 7 for one image: the five panels of an :class:`~deconvis.analysis.occlusion.OcclusionResult`.

(a) the image with the square positions (a dot at each square's centre, one square drawn in
full); (b) total activation of the strongest map of the layer per position, with a colour bar;
(c) that map's deconvnet projection (zero = mid-grey); (d) probability of the target class per
position, with a colour bar; (e) the most probable class per position, with a legend of class
names. Maps are drawn in image coordinates: each cell sits at the centre of its square.
matplotlib with the Agg backend; written atomically.
"""
from __future__ import annotations

import io
import os
from typing import Tuple

import numpy as np
import torch

from deconvis.analysis.occlusion import OcclusionResult
from deconvis.io.atomic import write_bytes
from deconvis.render.display import to_uint8

MAX_LEGEND = 10  # classes named in panel (e); the rest are grouped as "other"


def _extent(res: OcclusionResult) -> Tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) in pixels that puts cell (i, j) at its square's centre."""
    (sh, sw), (th, tw) = res.size, res.stride
    cy = [y + sh / 2 for y in res.tops_y]
    cx = [x + sw / 2 for x in res.tops_x]
    return (cx[0] - tw / 2, cx[-1] + tw / 2, cy[-1] + th / 2, cy[0] - th / 2)


def class_map(res: OcclusionResult) -> Tuple[np.ndarray, list]:
    """(index map [rows, cols] into the legend, legend labels): the ``MAX_LEGEND - 1`` most
    frequent classes by name, then "other" when more classes appear."""
    classes, counts = np.unique(res.top_class, return_counts=True)
    order = [int(c) for c, _ in sorted(zip(classes, counts), key=lambda t: (-t[1], t[0]))]
    keep = order if len(order) <= MAX_LEGEND else order[:MAX_LEGEND - 1]
    idx = np.full(res.top_class.shape, len(keep), dtype=np.int64)
    for i, c in enumerate(keep):
        idx[res.top_class == c] = i
    labels = [f"{res.name(c)}" for c in keep] + (["other"] if len(keep) < len(order) else [])
    return idx, labels


def render_occlusion(res: OcclusionResult, image_rgb: np.ndarray, path: "str | os.PathLike[str]",
                     title: str = "", dpi: int = 80) -> None:
    """Write the figure for ``res`` over ``image_rgb`` (uint8 [H, W, 3], the displayed input) to ``path`` (PNG)."""
    import matplotlib  # start-up time: matplotlib loads only when a figure is drawn

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # start-up time: matplotlib loads only when a figure is drawn
    from matplotlib.colors import ListedColormap  # start-up time: matplotlib loads only when a figure is drawn
    from matplotlib.patches import Patch, Rectangle  # start-up time: matplotlib loads only when a figure is drawn

    H, W = res.image_size
    ext = _extent(res)
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.6))
    for ax in axes:
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xticks([])
        ax.set_yticks([])

    ax = axes[0]
    ax.imshow(image_rgb, extent=(0, W, H, 0))
    cy = [y + res.size[0] / 2 for y in res.tops_y]
    cx = [x + res.size[1] / 2 for x in res.tops_x]
    gx, gy = np.meshgrid(cx, cy)
    ax.scatter(gx.ravel(), gy.ravel(), s=2, c="white", alpha=0.6, linewidths=0)
    i, j = np.unravel_index(int(np.argmin(res.probability)), res.probability.shape)
    ax.add_patch(Rectangle((res.tops_x[j], res.tops_y[i]), res.size[1], res.size[0], facecolor="grey",
                           edgecolor="black", alpha=0.85))
    ax.set_title(f"(a) {res.size[0]}x{res.size[1]} px square at the lowest (d),\n"
                 f"stride {res.stride[0]}x{res.stride[1]} (dots: centres), fill {res.fill}", fontsize=10)

    ax = axes[1]
    im = ax.imshow(res.activation, extent=ext, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="total activation")
    ax.set_title(f"(b) {res.layer_label} map {res.channel}, total activation\n(unoccluded "
                 f"{res.clean_activation:.3g})", fontsize=10)

    ax = axes[2]
    proj = to_uint8(torch.from_numpy(np.ascontiguousarray(res.projection)))[0]
    ax.imshow(proj if proj.shape[-1] == 3 else proj[..., 0], cmap=None if proj.shape[-1] == 3 else "gray",
              extent=(0, W, H, 0))
    ax.set_title(f"(c) projection of {res.layer_label} map {res.channel}\n(deconvnet)", fontsize=10)

    ax = axes[3]
    im = ax.imshow(res.probability, extent=ext, cmap="magma", vmin=0.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="probability")
    ax.set_title(f"(d) p({res.name(res.target)})\n(unoccluded {res.clean_probability:.3f})", fontsize=10)

    ax = axes[4]
    idx, labels = class_map(res)
    base = plt.get_cmap("tab10")
    cmap = ListedColormap([base(k % 10) for k in range(len(labels))])
    ax.imshow(idx, extent=ext, cmap=cmap, vmin=-0.5, vmax=len(labels) - 0.5, interpolation="nearest")
    handles = [Patch(color=cmap(k), label=lab[:28]) for k, lab in enumerate(labels)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    ax.set_title("(e) most probable class", fontsize=10)

    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    write_bytes(path, buf.getvalue())


__all__ = ["render_occlusion", "class_map"]
