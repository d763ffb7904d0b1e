"""Architecture diagnosis (ZF 2014 Sec. 4.1, Fig. 6): dead and dominating filters, the
frequency content of the first layer, aliasing in the second.

* A channel of a rectified layer is *dead* on an image set when its activation is <= ``threshold``
  (default 0) at every position of every image: it carries no information and its deconvnet
  projections are blank.
* A conv filter *dominates* when its RMS (root mean square of its weights) exceeds ``factor``
  times the median RMS of its layer (ZF: "a few filters dominate"; their fix is the
  renormalisation of :mod:`deconvis.training.renorm`).
* First layer: the radially averaged power spectrum of each filter and its share of energy in
  low / mid / high bands (:mod:`deconvis.analysis.spectra`).
* Second layer: the share of its projections' energy at the first layer's stride frequency
  (:func:`deconvis.analysis.spectra.aliasing`; ZF's stride-4 layer 1 gave "aliasing artifacts").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from deconvis.analysis.common import markdown_table
from deconvis.analysis.spectra import BAND_EDGES, Aliasing, aliasing, band_fractions, power_spectrum, radial_profile
from deconvis.errors import DeconvisError
from deconvis.io.images import normalize, open_images, preprocess_image
from deconvis.io.models import Preprocess
from deconvis.mirror.deconvnet import DeconvNet

Images = Union[Tensor, Iterable[Tensor]]


def channel_max(model: nn.Module, images: Images, layers: Sequence[str],
                batch_size: int = 32) -> Dict[str, Tensor]:
    """Per-channel maximum activation over ``images`` for each of ``layers``.

    ``images``: a normalised batch [N, 3, H, W] (split into ``batch_size`` chunks) or an iterable
    of such batches. ``layers``: aliases (conv1..) or module names, resolved by
    :class:`deconvis.mirror.deconvnet.DeconvNet`. Returns {layer as given: float64 [C]}.
    """
    layers = list(layers)
    if not layers:
        raise DeconvisError("no layers given; name at least one layer, e.g. conv2")
    dn = DeconvNet(model)
    names = {l: dn.resolve(l) for l in layers}
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise DeconvisError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        batches: Iterable[Tensor] = images.split(max(1, int(batch_size)))
    else:
        batches = images
    p = next(model.parameters(), None)
    best: Dict[str, Optional[Tensor]] = {l: None for l in layers}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                if p is not None:
                    x = x.to(device=p.device, dtype=p.dtype)
                acts = dn.activations(x, list(set(names.values())))
                for l, n in names.items():
                    m = acts[n].amax(dim=tuple(d for d in range(acts[n].dim()) if d != 1)).double().cpu()
                    best[l] = m if best[l] is None else torch.maximum(best[l], m)
    finally:
        model.train(was_training)
    if any(v is None for v in best.values()):
        raise DeconvisError("no images given; pass a non-empty batch [N, 3, H, W]")
    return {l: v for l, v in best.items() if v is not None}


def dead_channels(model: nn.Module, images: Images, layers: Sequence[str], threshold: float = 0.0,
                  batch_size: int = 32) -> Dict[str, List[int]]:
    """{layer: sorted channel ids whose maximum activation over ``images`` is <= ``threshold``}.

    Inputs as :func:`channel_max`; the model is run in eval mode (restored afterwards)."""
    mx = channel_max(model, images, layers, batch_size=batch_size)
    return {l: [int(c) for c in torch.nonzero(v <= threshold).flatten()] for l, v in mx.items()}


def image_set_batches(spec: str, resize: int, crop: int, batch_size: int = 32,
                      max_images: Optional[int] = None,
                      mean: Sequence[float] = (0.485, 0.456, 0.406),
                      std: Sequence[float] = (0.229, 0.224, 0.225)) -> List[Tensor]:
    """An image set (:func:`deconvis.io.images.open_images` spec, e.g. ``builtin:skimage-crops``)
    preprocessed (short side ``resize``, centre crop ``crop`` pixels) and normalised, as a list
    of float32 batches [<=batch_size, 3, crop, crop]."""
    pp = Preprocess(resize=int(resize), crop=(int(crop), int(crop)), mean=tuple(mean), std=tuple(std))
    src = open_images(spec, max_images=max_images)
    xs = [normalize(preprocess_image(src.load(i), pp), pp) for i in range(len(src))]
    return [torch.stack(xs[i:i + batch_size]) for i in range(0, len(xs), batch_size)]


# --------------------------------------------------------------------------- filters (weights)
def conv_modules(model: nn.Module) -> List[Tuple[str, nn.Conv2d]]:
    """(module name, module) of every ``nn.Conv2d`` in ``model.named_modules()`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def filter_rms(weight: Tensor) -> np.ndarray:
    """RMS of each filter of a conv weight [C_out, C_in/groups, kh, kw] -> float64 [C_out]."""
    w = weight.detach().double().cpu()
    return w.pow(2).mean(dim=tuple(range(1, w.dim()))).sqrt().numpy()


def dominating(rms: np.ndarray, factor: float = 3.0) -> List[int]:
    """Filter ids whose RMS exceeds ``factor`` times the median RMS of the layer."""
    if factor <= 0:
        raise DeconvisError(f"dominating factor {factor} must be positive")
    med = float(np.median(rms))
    return [int(i) for i in np.nonzero(rms > factor * med)[0]]


@dataclass
class FilterStats:
    """Weight statistics of one conv module."""

    module: str
    filters: int
    rms_median: float
    rms_max: float
    dominating: List[int]


@dataclass
class DiagnoseResult:
    """Everything ``deconvis diagnose`` reports (see the module doc)."""

    images: int
    dead: Dict[str, List[int]]              # rectified layer -> dead channel ids
    widths: Dict[str, int]                  # rectified layer -> channels
    filters: List[FilterStats]
    dominating_factor: float
    first_conv: str
    stride: int
    band_edges: List[float]                 # cycles/pixel
    band_fractions: np.ndarray              # [C_out, 3] low/mid/high share of each layer-1 filter
    radial_freq: np.ndarray                 # [B] cycles/pixel
    radial_power: np.ndarray                # [C_out, B] radially averaged power (each filter / its total)
    alias_layer: Optional[str] = None
    aliasing: Optional[Aliasing] = None
    alias_spectrum: Optional[np.ndarray] = field(default=None, repr=False)  # [H, W] mean power, fftshifted

    def to_dict(self) -> Dict[str, object]:
        return {"images": self.images,
                "dead": {l: {"channels": self.widths[l], "dead": v} for l, v in self.dead.items()},
                "filters": [vars(f) for f in self.filters], "dominating_factor": self.dominating_factor,
                "first_conv": {"module": self.first_conv, "stride": self.stride, "band_edges": self.band_edges,
                               "band_fractions_mean": self.band_fractions.mean(0).tolist(),
                               "band_fractions": self.band_fractions.tolist(),
                               "radial_freq": self.radial_freq.tolist(),
                               "radial_power_mean": self.radial_power.mean(0).tolist()},
                "aliasing": None if self.aliasing is None else dict(self.aliasing.to_dict(), layer=self.alias_layer)}

    def markdown(self) -> str:
        lo, hi = self.band_edges
        b = self.band_fractions.mean(0)
        out = [f"Image set: {self.images} images.\n", "Dead channels (never active):\n",
               markdown_table(["layer", "dead / channels", "ids"],
                              [[l, f"{len(v)}/{self.widths[l]}", ", ".join(map(str, v[:20])) + (" ..." if len(v) > 20 else "")]
                               for l, v in self.dead.items()]),
               f"\nFilters whose RMS exceeds {self.dominating_factor:g} x the layer median:\n",
               markdown_table(["conv module", "filters", "RMS median", "RMS max", "dominating"],
                              [[f.module, f.filters, f"{f.rms_median:.4g}", f"{f.rms_max:.4g}", len(f.dominating)]
                               for f in self.filters]),
               f"\nFirst layer {self.first_conv} (stride {self.stride}): energy share low (< {lo:g}) "
               f"{b[0]:.3f}, mid {b[1]:.3f}, high (>= {hi:g} cycles/pixel) {b[2]:.3f}.\n"]
        if self.aliasing is not None:
            a = self.aliasing
            out.append(f"\nAliasing of {self.alias_layer} projections at the stride-{a.stride} lattice: "
                       f"{a.fraction:.4f} of the non-DC energy ({a.ratio:.2f}x a white spectrum); power per lattice bin "
                       f"{a.peak_ratio:.2f}x that of the other bins at the same radial frequencies.\n")
        return "".join(out)


def diagnose(model: nn.Module, images: Images, layers: Optional[Sequence[str]] = None,
             dominating_factor: float = 3.0, fft_size: int = 32, band_edges: Sequence[float] = BAND_EDGES,
             alias_layer: Optional[str] = "auto", alias_images: int = 32, alias_halfwidth: int = 1,
             batch_size: int = 32, alias_stride: int = 0) -> DiagnoseResult:
    """Diagnose ``model`` over ``images`` (a batch [N, 3, H, W] or an iterable of batches).

    ``layers``: rectified layers to check for dead channels (default: ``DeconvNet.conv_layers()``).
    ``fft_size``: the first-layer filters are zero-padded to this many points per axis.
    ``alias_layer``: the layer whose projections are checked for aliasing (``auto``: the second
    of ``conv_layers()``; None: skip); its strongest unit per channel over the first
    ``alias_images`` images is projected with the deconvnet. ``alias_stride``: the lattice
    period in pixels (0: the first conv's stride, ZF's definition; e.g. 4 for the stride of
    conv1 and pool1 together).
    """
    if alias_stride < 0:
        raise DeconvisError(f"alias_stride {alias_stride} must be >= 0 (0: the first conv's stride)")

    convs = conv_modules(model)
    if not convs:
        raise DeconvisError(f"{type(model).__name__} has no nn.Conv2d; diagnose needs a CNN")
    dn = DeconvNet(model)
    layers = list(layers) if layers else [dn.display_name(l) for l in dn.conv_layers()]
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise DeconvisError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        batches: List[Tensor] = list(images.split(max(1, int(batch_size))))
    else:
        batches = list(images)
    mx = channel_max(model, batches, layers, batch_size=batch_size)
    dead = {l: [int(c) for c in torch.nonzero(v <= 0).flatten()] for l, v in mx.items()}
    stats = []
    for name, m in convs:
        rms = filter_rms(m.weight)
        stats.append(FilterStats(name, len(rms), float(np.median(rms)), float(rms.max()),
                                 dominating(rms, dominating_factor)))
    first_name, first = convs[0]
    if fft_size < max(first.kernel_size):
        raise DeconvisError(f"fft_size {fft_size} is smaller than {first_name}'s {first.kernel_size} filters")
    power = power_spectrum(first.weight, fft_size)
    freq, prof = radial_profile(power)
    prof = prof / np.maximum(power.reshape(len(power), -1).sum(1), 1e-300)[:, None]
    res = DiagnoseResult(images=sum(len(b) for b in batches), dead=dead, widths={l: len(v) for l, v in mx.items()},
                         filters=stats, dominating_factor=float(dominating_factor), first_conv=first_name,
                         stride=int(first.stride[0]), band_edges=[float(e) for e in band_edges],
                         band_fractions=band_fractions(power, band_edges), radial_freq=freq, radial_power=prof)
    period = int(alias_stride) or res.stride
    if alias_layer is not None and period >= 2:
        name = alias_layer
        if name == "auto":
            cl = dn.conv_layers()
            if len(cl) < 2:
                return res
            name = dn.display_name(cl[1])
        x = torch.cat(batches)[:max(1, int(alias_images))]
        was = model.training
        model.eval()
        try:
            dn.forward(x, [name])
            units = dn.strongest(name, 1)
            proj = dn.project(name, units)
        finally:
            dn.release()
            model.train(was)
        live = proj.flatten(1).abs().sum(1) > 0
        if bool(live.any()):
            proj = proj[live]
            res.alias_layer = name
            res.aliasing = aliasing(proj, period, alias_halfwidth)
            h = proj.shape[-1]
            p = power_spectrum(proj, h).mean(0)
            res.alias_spectrum = np.fft.fftshift(p)
    return res
