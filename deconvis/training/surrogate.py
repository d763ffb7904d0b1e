"""Offline training data for the demo net: an exemplar surrogate task on real photographs.

Dosovitskiy et al. (NIPS 2014, "Discriminative unsupervised feature learning with exemplar
CNNs"): pick many *seed* patches from natural photographs; each seed is its own class; a
training sample is a random transformation of its seed (translation, scale, rotation, flip,
contrast, colour). Telling seeds apart under these transformations needs edge, colour and
texture detectors, which is what we want the demo's first layers to learn, with no labels and
no downloads.

The photographs are the ones that ship inside scikit-image (``skimage.data``; grey ones become
3 channels). Seeds are chosen where the image has structure (largest gradient energy among a few
random candidates), round-robin over the photos. Everything is deterministic: the seeds follow
``seed``, and sample ``i`` of epoch ``e`` follows ``(seed, e, i)`` only -- independent of batch
order, worker count or the global RNG.

Geometry: a seed is a square ``(cy, cx, side)`` in photo pixels (centre, side length); samples
are ``size x size`` crops produced by one affine warp of the photo (OpenCV, bilinear,
reflected borders).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from deconvis.errors import DeconvisError
from deconvis.io.images import unnormalize
from deconvis.io.models import IMAGENET_MEAN, IMAGENET_STD

#: skimage.data photographs used by default (those missing offline are skipped)
PHOTO_NAMES: Tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "camera", "coins", "moon",
    "brick", "grass", "gravel", "hubble_deep_field", "retina", "immunohistochemistry", "cell",
    "page", "text", "clock",
)  # synthetic flat-colour images (colorwheel, logo) are left out: they teach colour blobs only

_PHOTO_CACHE: Dict[str, np.ndarray] = {}


def _as_rgb(img: np.ndarray) -> np.ndarray:
    """Any skimage image -> uint8 [H, W, 3]."""
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / (hi - lo if hi > lo else 1.0) * 255.0).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:  # RGBA: composite on white
        a = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3] * a + 255.0 * (1 - a)).round().astype(np.uint8)
    return np.ascontiguousarray(img[:, :, :3])


def load_photo(name: str) -> np.ndarray:
    """One bundled skimage photograph as uint8 RGB [H, W, 3] (cached). ``stereo_motorcycle``
    gives its left view. Raises DeconvisError when it is not available offline."""
    if name in _PHOTO_CACHE:
        return _PHOTO_CACHE[name]
    try:
        import skimage.data as skd  # optional dependency: scikit-image (the demo extra)
    except ImportError as exc:
        raise DeconvisError("the demo training data needs scikit-image: pip install scikit-image") from exc
    fn = getattr(skd, name, None)
    if fn is None:
        raise DeconvisError(f"skimage.data has no image {name!r}")
    try:
        img = fn()
    except Exception as exc:  # needs pooch/network: not bundled
        raise DeconvisError(f"skimage.data.{name} is not available offline ({type(exc).__name__})") from exc
    if isinstance(img, tuple):
        img = img[0]
    rgb = _as_rgb(img)
    _PHOTO_CACHE[name] = rgb
    return rgb


def load_photos(names: Sequence[str] = PHOTO_NAMES) -> List[Tuple[str, np.ndarray]]:
    """The photographs of ``names`` that load offline, as (name, uint8 RGB [H, W, 3])."""
    out = []
    for n in names:
        try:
            out.append((n, load_photo(n)))
        except DeconvisError:
            continue
    if not out:
        raise DeconvisError("none of the scikit-image sample photos could be loaded; "
                            "install scikit-image (its bundled images need no network)")
    return out


@dataclass(frozen=True)
class Seed:
    """One exemplar: the square of side ``side`` pixels centred at (``cy``, ``cx``) in photo
    ``photo`` (index into the dataset's photo list)."""

    photo: int
    cy: float
    cx: float
    side: float


@dataclass(frozen=True)
class Augment:
    """Ranges of the random transformations (Dosovitskiy et al. 2014, Sec. 2.1)."""

    translate: float = 0.2       # +- fraction of the seed side
    scale: Tuple[float, float] = (0.7, 1.4)   # zoom factor range (log-uniform)
    rotate: float = 20.0         # +- degrees
    flip: bool = True            # horizontal flip with probability 1/2
    contrast: Tuple[float, float] = (0.5, 1.6)   # multiply the deviation from the mean
    brightness: float = 0.1      # +- added to all channels (image in [0, 1])
    saturation: Tuple[float, float] = (0.3, 2.0)  # multiply the deviation from grey
    hue: float = 0.5             # +- fraction of a turn of hue rotation (0.5: any hue)
    gamma: Tuple[float, float] = (0.6, 1.6)
    grey: float = 0.2            # probability of dropping colour altogether


_GREY_SIDE = 128  # short side of the grey thumbnails used to rate seed candidates


def _grey_thumbnail(photo: np.ndarray) -> Tuple[np.ndarray, float]:
    """Grey float32 thumbnail (short side about ``_GREY_SIDE`` px) and its scale (thumb px per photo px)."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    h, w = photo.shape[:2]
    f = min(1.0, _GREY_SIDE / min(h, w))
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    if f < 1.0:
        grey = cv2.resize(grey, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return grey.astype(np.float32) / 255.0, f


def _gradient_energy(grey: np.ndarray, f: float, cy: float, cx: float, side: float) -> float:
    """Mean squared gradient of ``grey`` (a thumbnail at scale ``f``) over the square (cy, cx, side)
    given in photo pixels."""
    half = max(1, int(round(side * f / 2)))
    y, x = int(round(cy * f)), int(round(cx * f))
    patch = grey[max(0, y - half):y + half, max(0, x - half):x + half]
    if patch.shape[0] < 3 or patch.shape[1] < 3:
        return 0.0
    gy, gx = np.gradient(patch)
    return float(np.mean(gx * gx + gy * gy))


def choose_seeds(photos: Sequence[np.ndarray], num_classes: int, seed: int,
                 side_range: Tuple[float, float] = (0.15, 0.45), candidates: int = 8) -> List[Seed]:
    """``num_classes`` seed squares, round-robin over ``photos``; per seed the most textured
    (largest mean squared gradient) of ``candidates`` random squares whose side is a fraction
    ``side_range`` of the photo's short side."""
    rng = np.random.default_rng([seed, 7919])
    thumbs = [_grey_thumbnail(p) for p in photos]
    order = rng.permutation(len(photos))
    seeds: List[Seed] = []
    for k in range(num_classes):
        pi = int(order[k % len(photos)])
        h, w = photos[pi].shape[:2]
        best, best_e = None, -1.0
        for _ in range(candidates):
            side = float(rng.uniform(*side_range)) * min(h, w)
            cy = float(rng.uniform(side / 2, h - side / 2))
            cx = float(rng.uniform(side / 2, w - side / 2))
            e = _gradient_energy(thumbs[pi][0], thumbs[pi][1], cy, cx, side)
            if e > best_e:
                best, best_e = Seed(pi, cy, cx, side), e
        assert best is not None
        seeds.append(best)
    return seeds


def _affine(seed: Seed, size: int, scale: float, angle_deg: float, ty: float, tx: float,
            flip: bool) -> np.ndarray:
    """2x3 matrix mapping output pixels (size x size) to photo pixels for cv2.WARP_INVERSE_MAP."""
    s = seed.side / scale / size               # photo pixels per output pixel
    a = math.radians(angle_deg)
    ca, sa = math.cos(a) * s, math.sin(a) * s
    fx = -1.0 if flip else 1.0
    c = (size - 1) / 2.0
    # photo = R*S*F*(out - c) + centre
    m = np.array([[ca * fx, -sa, 0.0], [sa * fx, ca, 0.0]], dtype=np.float64)
    cy, cx = seed.cy + ty * seed.side, seed.cx + tx * seed.side
    m[0, 2] = cx - (m[0, 0] * c + m[0, 1] * c)
    m[1, 2] = cy - (m[1, 0] * c + m[1, 1] * c)
    return m


def render_seed(photo: np.ndarray, seed: Seed, size: int, scale: float = 1.0, angle_deg: float = 0.0,
                ty: float = 0.0, tx: float = 0.0, flip: bool = False) -> np.ndarray:
    """The (transformed) seed square as uint8 RGB [size, size, 3]."""
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    m = _affine(seed, size, scale, angle_deg, ty, tx, flip)
    return cv2.warpAffine(photo, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT_101)


def _hue_rotation(turn: float) -> np.ndarray:
    """3x3 RGB matrix rotating hue by ``turn`` (fraction of 2*pi) about the grey axis."""
    a = 2 * math.pi * turn
    c, s = math.cos(a), math.sin(a)
    k = 1.0 / 3.0
    sq = math.sqrt(k)
    return np.array([
        [c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
        [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
        [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)],
    ], dtype=np.float64)


def colour_jitter(img: np.ndarray, rng: np.random.Generator, aug: Augment) -> np.ndarray:
    """Random gamma, saturation, hue, contrast, brightness: uint8 RGB [H, W, 3] -> float32 RGB
    in [0, 1].

    Gamma is a lookup table; the rest is one affine colour map ``y = c*M*x + (1-c)*M*mu + b``
    (``M`` = hue rotation times saturation, ``mu`` the image's mean colour, ``c`` the contrast
    factor, ``b`` the brightness shift), then clipped to [0, 1].
    """
    import cv2  # start-up time: OpenCV loads only when an image is resized or encoded

    gamma = float(np.exp(rng.uniform(*np.log(aug.gamma))))
    lut = np.round(255.0 * np.power(np.arange(256) / 255.0, gamma)).astype(np.uint8)
    x = cv2.LUT(img, lut).astype(np.float32) * np.float32(1.0 / 255.0)
    sat = 0.0 if rng.random() < aug.grey else rng.uniform(*aug.saturation)
    m = sat * np.eye(3) + (1.0 - sat) / 3.0 * np.ones((3, 3))
    if aug.hue:
        m = _hue_rotation(rng.uniform(-aug.hue, aug.hue)) @ m
    c = rng.uniform(*aug.contrast)
    b = rng.uniform(-aug.brightness, aug.brightness)
    mu = x.reshape(-1, 3).mean(axis=0, dtype=np.float64)
    affine = np.concatenate([c * m, ((1.0 - c) * (m @ mu) + b)[:, None]], axis=1)
    y = cv2.transform(x, affine.astype(np.float32))
    return np.clip(y, 0.0, 1.0, out=y)


class ExemplarDataset(torch.utils.data.Dataset):
    """Exemplar surrogate classification: ``num_classes`` seeds x ``samples_per_class`` random
    transformations per epoch, generated on the fly.

    Item ``i`` -> (normalised image float32 [3, size, size], class ``i % num_classes``); it
    depends only on (``seed``, current epoch, ``i``). Call :meth:`set_epoch` each epoch for new
    transformations.
    """

    def __init__(self, num_classes: int = 128, samples_per_class: int = 32, size: int = 128,
                 seed: int = 0, photo_names: Sequence[str] = PHOTO_NAMES,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 augment: Optional[Augment] = None, epoch: int = 0) -> None:
        if num_classes < 2:
            raise DeconvisError(f"num_classes must be >= 2, got {num_classes}")
        if samples_per_class < 1:
            raise DeconvisError(f"samples_per_class must be >= 1, got {samples_per_class}")
        if size < 8:
            raise DeconvisError(f"image size must be >= 8 pixels, got {size}")
        named = load_photos(photo_names)
        self.photo_names = [n for n, _ in named]
        self.photos = [p for _, p in named]
        self.num_classes = int(num_classes)
        self.samples_per_class = int(samples_per_class)
        self.size = int(size)
        self.seed = int(seed)
        self.mean_std = ([float(m) for m in mean], [float(v) for v in std])  # exact, for metadata
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.augment = augment or Augment()
        self.epoch = int(epoch)
        self.seeds = choose_seeds(self.photos, self.num_classes, self.seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_classes * self.samples_per_class

    def _normalise(self, img: np.ndarray) -> Tensor:
        """float RGB [H, W, 3] in [0, 1] -> normalised float32 [3, H, W]."""
        x = (img - self.mean) * (1.0 / self.std)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))

    def sample(self, i: int, epoch: Optional[int] = None) -> Tuple[np.ndarray, int]:
        """Item ``i`` of ``epoch`` (default: current) as (float RGB [size, size, 3] in [0, 1], class)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        ep = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, ep & 0xFFFFFFFF, i])
        label = i % self.num_classes
        s = self.seeds[label]
        a = self.augment
        scale = float(np.exp(rng.uniform(*np.log(a.scale))))
        img = render_seed(self.photos[s.photo], s, self.size, scale=scale,
                          angle_deg=float(rng.uniform(-a.rotate, a.rotate)),
                          ty=float(rng.uniform(-a.translate, a.translate)),
                          tx=float(rng.uniform(-a.translate, a.translate)),
                          flip=bool(a.flip and rng.random() < 0.5))
        return colour_jitter(img, rng, a), label

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        img, label = self.sample(int(i))
        return self._normalise(img), label

    def batch(self, indices: Sequence[int], epoch: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Items ``indices`` stacked: (images [B, 3, size, size], labels int64 [B])."""
        imgs, labels = [], []
        for i in indices:
            img, lab = self.sample(int(i), epoch)
            imgs.append(self._normalise(img))
            labels.append(lab)
        return torch.stack(imgs), torch.tensor(labels, dtype=torch.int64)

    def canonical(self, label: int) -> np.ndarray:
        """Seed ``label`` untransformed: float32 RGB [size, size, 3] in [0, 1]."""
        s = self.seeds[label]
        return render_seed(self.photos[s.photo], s, self.size).astype(np.float32) / 255.0

    def probe_images(self, n: int = 32) -> Tensor:
        """A fixed probe set for snapshots: the untransformed seeds of ``n`` classes spread
        evenly over the class list, normalised [n, 3, size, size]."""
        n = max(1, min(int(n), self.num_classes))
        labels = np.linspace(0, self.num_classes - 1, n).round().astype(int)
        return torch.stack([self._normalise(self.canonical(int(c))) for c in labels])

    def denormalise(self, x: Tensor) -> Tensor:
        """Normalised images [N, 3, H, W] -> RGB in [0, 1]."""
        return unnormalize(x, self.mean, self.std)
