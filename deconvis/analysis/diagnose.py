"""Training diagnostics: channels that never fire (dead ReLUs, ZF 2014 Fig. 6's "dead" filters).

A channel of a rectified layer is *dead* on an image set when its activation is <= ``threshold``
(default 0) at every position of every image: it carries no information and its deconvnet
projections are blank.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from deconvis.errors import DeconvisError

Images = Union[Tensor, Iterable[Tensor]]


def channel_max(model: nn.Module, images: Images, layers: Sequence[str],
                batch_size: int = 32) -> Dict[str, Tensor]:
    """Per-channel maximum activation over ``images`` for each of ``layers``.

    ``images``: a normalised batch [N, 3, H, W] (split into ``batch_size`` chunks) or an iterable
    of such batches. ``layers``: aliases (conv1..) or module names, resolved by
    :class:`deconvis.mirror.deconvnet.DeconvNet`. Returns {layer as given: float64 [C]}.
    """
    from deconvis.mirror.deconvnet import DeconvNet

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
    from deconvis.io.images import normalize, open_images, preprocess_image
    from deconvis.io.models import Preprocess

    pp = Preprocess(resize=int(resize), crop=(int(crop), int(crop)), mean=tuple(mean), std=tuple(std))
    src = open_images(spec, max_images=max_images)
    xs = [normalize(preprocess_image(src.load(i), pp), pp) for i in range(len(src))]
    return [torch.stack(xs[i:i + batch_size]) for i in range(0, len(xs), batch_size)]


def summary(dead: Dict[str, List[int]], widths: Dict[str, int]) -> str:
    """One line: ``conv1 0/32, conv2 3/64, ...``."""
    return ", ".join(f"{l} {len(v)}/{widths[l]}" for l, v in dead.items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m deconvis.analysis.diagnose [WEIGHTS]``: dead channels of zfnet_demo on the demo set."""
    import argparse

    from deconvis.io.models import load_model

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("weights", nargs="?", default="deconvis/assets/zfnet_demo.pt")
    ap.add_argument("--images", default="builtin:skimage-crops")
    a = ap.parse_args(argv)
    lm = load_model("zfnet_demo", a.weights)
    pp = lm.preprocess
    batches = image_set_batches(a.images, pp.resize, pp.crop[0], mean=pp.mean, std=pp.std)
    layers = [f"conv{i}" for i in range(1, 6)]
    mx = channel_max(lm.model, batches, layers)
    dead = {l: [int(c) for c in torch.nonzero(v <= 0).flatten()] for l, v in mx.items()}
    n = sum(len(b) for b in batches)
    print(f"{a.weights}: dead channels over {n} images: " + summary(dead, {l: len(v) for l, v in mx.items()}))
    for l, v in mx.items():
        live = v[v > 0].numpy()
        print(f"  {l}: max act median {np.median(live) if live.size else 0:.3g}, dead {dead[l]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
