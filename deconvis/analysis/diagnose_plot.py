"""The ``deconvis diagnose`` figure (ZF 2014 Fig. 6 style): first-layer filters, their radially
averaged spectra with the band edges, the second layer's projection spectrum with the stride
lattice, dead channels per layer and filter RMS per conv module."""
from __future__ import annotations

import numpy as np
from torch import Tensor

from deconvis.analysis.common import pyplot, save_figure
from deconvis.analysis.diagnose import DiagnoseResult


def filter_grid(weight: Tensor, pad: int = 1) -> np.ndarray:
    """First-layer weights [C_out, C_in, k, k] -> an RGB (C_in == 3) or grey mosaic in [0, 1],
    each filter scaled by its own max |w| around 0.5."""
    w = weight.detach().double().cpu().numpy()
    if w.shape[1] != 3:
        w = w.mean(1, keepdims=True)
    n, c, kh, kw = w.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.ones((rows * (kh + pad) + pad, cols * (kw + pad) + pad, c))
    for i in range(n):
        f = w[i].transpose(1, 2, 0)
        f = 0.5 + 0.5 * f / max(np.abs(f).max(), 1e-12)
        r, q = divmod(i, cols)
        grid[pad + r * (kh + pad):pad + r * (kh + pad) + kh, pad + q * (kw + pad):pad + q * (kw + pad) + kw] = f
    return grid if c == 3 else grid[:, :, 0]


def plot_diagnose(res: DiagnoseResult, first_weight: Tensor, path: str, title: str = "", dpi: int = 70) -> None:
    """Six panels; see the module doc."""
    plt = pyplot()
    fig, ax = plt.subplots(2, 3, figsize=(14, 8.4))
    g = filter_grid(first_weight)
    ax[0, 0].imshow(g, cmap="gray" if g.ndim == 2 else None, interpolation="nearest")
    ax[0, 0].set_title(f"{res.first_conv} filters ({first_weight.shape[-1]}x{first_weight.shape[-2]}, "
                       f"stride {res.stride})", fontsize=9)
    ax[0, 0].axis("off")

    a = ax[0, 1]
    lo, hi = res.band_edges
    med = np.median(res.radial_power, 0)
    q1, q3 = np.percentile(res.radial_power, [25, 75], axis=0)
    a.fill_between(res.radial_freq, np.maximum(q1, 1e-12), np.maximum(q3, 1e-12), alpha=0.3, label="quartiles")
    a.plot(res.radial_freq, np.maximum(med, 1e-12), lw=2, label="median filter")
    a.set_yscale("log")
    for e in res.band_edges:
        a.axvline(e, color="k", ls="--", lw=0.8)
    b = res.band_fractions.mean(0)
    a.set_title(f"radial power spectrum: low {b[0]:.2f} | mid {b[1]:.2f} | high {b[2]:.2f}", fontsize=9)
    a.set_xlabel("radial frequency (cycles/pixel)", fontsize=8)
    a.set_ylabel("power / filter energy", fontsize=8)
    a.legend(fontsize=7)

    a = ax[0, 2]
    if res.alias_spectrum is not None and res.aliasing is not None:
        n = res.alias_spectrum.shape[0]
        ext = [-0.5, 0.5 - 1.0 / n, 0.5 - 1.0 / n, -0.5]
        im = a.imshow(np.log10(res.alias_spectrum + 1e-12 * res.alias_spectrum.max()), extent=ext, cmap="magma")
        fig.colorbar(im, ax=a, fraction=0.046, label="log10 power")
        s = res.aliasing.stride
        ticks = [k / s for k in range(-(s // 2), s // 2 + 1) if -0.5 <= k / s < 0.5]
        for fy in ticks:
            for fx in ticks:
                if fy or fx:
                    a.plot(fx, fy, "o", mfc="none", mec="cyan", ms=10)
        a.set_title(f"{res.alias_layer} projections: stride-{s} lattice peak {res.aliasing.peak_ratio:.2f}x ring", fontsize=9)
        a.set_xlabel("fx (cycles/pixel)", fontsize=8)
        a.set_ylabel("fy (cycles/pixel)", fontsize=8)
    else:
        a.text(0.5, 0.5, "no aliasing check\n(first stride 1 or no second layer)", ha="center", va="center")
        a.axis("off")

    a = ax[1, 0]
    names = list(res.dead)
    frac = [100.0 * len(res.dead[l]) / max(res.widths[l], 1) for l in names]
    a.bar(range(len(names)), frac, color="tab:red")
    for i, l in enumerate(names):
        a.text(i, frac[i], f"{len(res.dead[l])}/{res.widths[l]}", ha="center", va="bottom", fontsize=7)
    a.set_xticks(range(len(names)))
    a.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    a.set_ylabel("dead channels (%)", fontsize=8)
    a.set_title(f"never active over {res.images} images", fontsize=9)

    a = ax[1, 1]
    for i, f in enumerate(res.filters):
        a.plot([i, i], [0, f.rms_max / max(f.rms_median, 1e-300)], color="tab:gray", lw=1)
        a.plot(i, f.rms_max / max(f.rms_median, 1e-300), "o", color="tab:red" if f.dominating else "tab:blue")
    a.axhline(res.dominating_factor, color="k", ls="--", lw=0.8, label=f"{res.dominating_factor:g} x median")
    a.set_xticks(range(len(res.filters)))
    a.set_xticklabels([f.module for f in res.filters], rotation=45, ha="right", fontsize=7)
    a.set_ylabel("max filter RMS / median", fontsize=8)
    a.set_title("dominating filters (red: some above the line)", fontsize=9)
    a.legend(fontsize=7)

    a = ax[1, 2]
    order = np.argsort(res.band_fractions[:, 0])
    bf = res.band_fractions[order]
    x = np.arange(len(bf))
    a.bar(x, bf[:, 0], label=f"low < {lo:g}", color="tab:blue")
    a.bar(x, bf[:, 1], bottom=bf[:, 0], label="mid", color="tab:green")
    a.bar(x, bf[:, 2], bottom=bf[:, 0] + bf[:, 1], label=f"high >= {hi:g}", color="tab:orange")
    a.set_xlabel(f"{res.first_conv} filter (sorted by low share)", fontsize=8)
    a.set_ylabel("energy share", fontsize=8)
    a.set_title("band shares per first-layer filter", fontsize=9)
    a.legend(fontsize=7, loc="lower right")
    for aa in ax.flat:
        aa.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)
