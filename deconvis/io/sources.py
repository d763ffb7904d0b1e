"""Image sets: the :class:`ImageSource` interface (names, paths, uint8 RGB loads), its folder,
torchvision and scikit-image implementations, and the spec parser :func:`open_images`
(the spec forms are listed in :mod:`deconvis.io.images`).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from deconvis.errors import DeconvisError, close_matches
from deconvis.io.pixels import MAX_PIXELS, read_image, to_rgb8, too_large

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

class ImageSource:
    """An indexable image set: ``len``, ``name(i)``, ``path(i)`` and ``load(i)`` -> uint8 RGB."""

    spec: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def path(self, i: int) -> str:
        """Where image ``i`` comes from (file path, or the name for non-file sources)."""
        return self.name(i)

    def load(self, i: int, min_side: Optional[int] = None) -> np.ndarray:
        """Image ``i``, uint8 RGB ``[H, W, 3]``; ``min_side``: the caller resizes the short side
        down to that many pixels (a file source may then decode a large image reduced)."""
        raise NotImplementedError

    def refusal(self, i: int) -> str:
        """Why image ``i`` is refused without decoding ('' when it is not: see
        :func:`deconvis.io.pixels.too_large`)."""
        return ""

    def labels(self) -> Optional[Tuple[List[str], List[int]]]:
        """``(class names, class index per image)`` when the set is labelled (an ImageFolder
        tree), else None."""
        return None


class FolderImages(ImageSource):
    """Every image file below ``root`` (recursive, sorted relative paths)."""

    def __init__(self, root: str, max_pixels: Optional[int] = MAX_PIXELS):
        self.max_pixels = max_pixels  # images above it are skipped, never decoded (0/None: no cap)
        if not os.path.exists(root):
            raise DeconvisError(f"image folder {root!r} does not exist; pass --images with a folder of "
                                "images, torchvision:NAME:ROOT or builtin:skimage-crops")
        if not os.path.isdir(root):
            raise DeconvisError(f"--images {root!r} is a file, not a folder of images")
        self.root = os.path.abspath(root)
        self.spec = root
        files: List[str] = []
        for folder, dirs, names in os.walk(self.root, followlinks=True):
            dirs.sort()
            for n in names:
                if n.lower().endswith(IMAGE_EXTS) and not n.startswith("."):
                    files.append(os.path.relpath(os.path.join(folder, n), self.root))
        files.sort()
        if not files:
            raise DeconvisError(f"image folder {root!r} holds no images ({' '.join(IMAGE_EXTS)}); "
                                "point --images at a folder with images")
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return self.files[i]

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def load(self, i: int, min_side: Optional[int] = None) -> np.ndarray:
        return read_image(self.path(i), self.max_pixels, min_side)

    def refusal(self, i: int) -> str:
        return too_large(self.path(i), self.max_pixels)

    def labels(self) -> Optional[Tuple[List[str], List[int]]]:
        """An ImageFolder tree (every image inside a class sub-folder of ``root``, at least two
        classes): the first folder of each relative path is its class (classes sorted by name)."""
        tops = [f.replace(os.sep, "/").split("/", 1) for f in self.files]
        if any(len(t) < 2 for t in tops):
            return None
        names = sorted({t[0] for t in tops})
        if len(names) < 2:
            return None
        index = {n: j for j, n in enumerate(names)}
        return names, [index[t[0]] for t in tops]


class TorchvisionImages(ImageSource):
    """A torchvision dataset (``torchvision.datasets.<name>``), loaded with ``download=False``."""

    def __init__(self, name: str, root: str, split: Optional[str] = None, train: Optional[bool] = None,
                 kwargs: Optional[Mapping[str, Any]] = None):
        import torchvision.datasets as tvd  # start-up time: torchvision's datasets are slow to import

        names = [n for n in dir(tvd) if not n.startswith("_") and isinstance(getattr(tvd, n), type)]
        cls = getattr(tvd, name, None)
        if cls is None or not isinstance(cls, type):
            raise DeconvisError(f"torchvision has no dataset {name!r}" + close_matches(name, names))
        params = inspect.signature(cls.__init__).parameters
        kw: Dict[str, Any] = dict(kwargs or {})
        if "root" in params:
            kw["root"] = root
        if split is not None:
            if "split" in params:
                kw["split"] = split
            elif "train" in params and split in ("train", "test", "val"):
                kw["train"] = split == "train"
            else:
                raise DeconvisError(f"torchvision {name} takes no split; drop {split!r} from --images")
        if train is not None:
            kw["train"] = bool(train)
        if "download" in params:
            kw["download"] = False
        where = os.path.abspath(root) if root else "(no root given)"
        try:
            self.ds = cls(**kw)
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            raise DeconvisError(
                f"torchvision dataset {name} is not under {where} and deconvis never downloads "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); download it on a machine "
                f"with network (torchvision.datasets.{name}(root, download=True)) and copy it to {where}") from exc
        except TypeError as exc:
            raise DeconvisError(f"torchvision dataset {name} does not accept {sorted(kw)}: {exc}") from exc
        self.label = f"{name}" + (f"[{split}]" if split else "") + ("[train]" if train else "[test]" if train is False else "")
        self.spec = f"torchvision:{name}:{root}" + (f":{split}" if split else "")
        if len(self.ds) == 0:
            raise DeconvisError(f"torchvision dataset {name} under {where} is empty")

    def __len__(self) -> int:
        return len(self.ds)

    def name(self, i: int) -> str:
        samples = getattr(self.ds, "samples", None) or getattr(self.ds, "imgs", None)
        if samples is not None and isinstance(samples[i], (tuple, list)) and isinstance(samples[i][0], str):
            return f"{self.label}#{i}:{os.path.basename(samples[i][0])}"
        return f"{self.label}#{i}"

    def path(self, i: int) -> str:
        samples = getattr(self.ds, "samples", None) or getattr(self.ds, "imgs", None)
        if samples is not None and isinstance(samples[i], (tuple, list)) and isinstance(samples[i][0], str):
            return samples[i][0]
        return self.name(i)

    def load(self, i: int, min_side: Optional[int] = None) -> np.ndarray:
        item = self.ds[i]
        img = item[0] if isinstance(item, (tuple, list)) else item
        if hasattr(img, "convert"):  # PIL
            return to_rgb8(np.asarray(img.convert("RGB")))
        if isinstance(img, torch.Tensor):
            a = img.detach().cpu().numpy()
            a = np.moveaxis(a, 0, -1) if a.ndim == 3 and a.shape[0] in (1, 3, 4) else a
            return to_rgb8(a)
        return to_rgb8(np.asarray(img))

    def labels(self) -> Optional[Tuple[List[str], List[int]]]:
        """The dataset's ``classes`` and ``targets`` (ImageFolder, CIFAR, ...) when it has both."""
        classes, targets = getattr(self.ds, "classes", None), getattr(self.ds, "targets", None)
        if not classes or targets is None or len(targets) != len(self.ds):
            return None
        return [str(c) for c in classes], [int(t) for t in targets]


# scikit-image photographs (offline, bundled with the package); name -> loader
def _skimage_photos() -> Dict[str, Callable[[], np.ndarray]]:
    import skimage.data as sd  # optional dependency: scikit-image (the demo extra)

    def stereo_left() -> np.ndarray:
        return sd.stereo_motorcycle()[0]

    return {
        "astronaut": sd.astronaut, "coffee": sd.coffee, "chelsea": sd.chelsea, "rocket": sd.rocket,
        "motorcycle": stereo_left, "camera": sd.camera, "coins": sd.coins, "moon": sd.moon,
        "page": sd.page, "text": sd.text, "brick": sd.brick, "grass": sd.grass, "gravel": sd.gravel,
        "hubble_deep_field": sd.hubble_deep_field, "retina": sd.retina,
        "immunohistochemistry": sd.immunohistochemistry, "cell": sd.cell, "clock": sd.clock,
    }


SKIMAGE_PHOTOS: Tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera", "coins", "moon", "page", "text",
    "brick", "grass", "gravel", "hubble_deep_field", "retina", "immunohistochemistry", "cell", "clock")

#: multi-scale crops of ``builtin:skimage-crops``: (side as a fraction of the short side, grid n)
CROP_SCALES: Tuple[Tuple[float, int], ...] = ((0.6, 2), (0.35, 3))


@functools.lru_cache(maxsize=None)
def skimage_photo(name: str) -> np.ndarray:
    """One bundled scikit-image photo as uint8 RGB (cached per process)."""
    try:
        loader = _skimage_photos()[name]
    except ImportError as exc:
        raise DeconvisError("builtin:skimage needs scikit-image (pip install scikit-image)") from exc
    return to_rgb8(loader())


def photo_crops(h: int, w: int) -> List[Tuple[str, Tuple[int, int, int, int]]]:
    """The deterministic crops of an ``h x w`` photo: ``(tag, (y0, y1, x0, x1))`` half-open, the
    whole photo first, then for each (scale s, grid n) in :data:`CROP_SCALES` n x n squares of
    side ``round(s * min(h, w))`` evenly spaced from corner to corner."""
    out: List[Tuple[str, Tuple[int, int, int, int]]] = [("", (0, h, 0, w))]
    for s, n in CROP_SCALES:
        side = max(1, int(round(s * min(h, w))))
        for gy in range(n):
            for gx in range(n):
                y0 = int(round(gy * (h - side) / (n - 1))) if n > 1 else (h - side) // 2
                x0 = int(round(gx * (w - side) / (n - 1))) if n > 1 else (w - side) // 2
                out.append((f"@{s:.2f}[{gy},{gx}]", (y0, y0 + side, x0, x0 + side)))
    return out


class SkimageImages(ImageSource):
    """``builtin:skimage`` (the photos) or ``builtin:skimage-crops`` (photos + multi-scale crops)."""

    def __init__(self, crops: bool = False, photos: Sequence[str] = SKIMAGE_PHOTOS):
        try:
            importlib.import_module("skimage.data")
        except ImportError as exc:
            raise DeconvisError("builtin:skimage needs scikit-image: pip install scikit-image") from exc
        self.spec = "builtin:skimage-crops" if crops else "builtin:skimage"
        self.items: List[Tuple[str, str, Tuple[int, int, int, int]]] = []
        for p in photos:
            if crops:
                h, w = skimage_photo(p).shape[:2]
                for tag, box in photo_crops(h, w):
                    self.items.append((p, tag, box))
            else:
                self.items.append((p, "", (0, -1, 0, -1)))

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        p, tag, _ = self.items[i]
        return f"skimage:{p}{tag}"

    def load(self, i: int, min_side: Optional[int] = None) -> np.ndarray:
        p, tag, (y0, y1, x0, x1) = self.items[i]
        img = skimage_photo(p)
        if not tag:
            return img.copy()
        return np.ascontiguousarray(img[y0:y1, x0:x1])


class LimitedImages(ImageSource):
    """The first ``n`` images of another source (``--max-images``)."""

    def __init__(self, base: ImageSource, n: int):
        self.base, self.n = base, min(int(n), len(base))
        self.spec = base.spec

    def __len__(self) -> int:
        return self.n

    def name(self, i: int) -> str:
        return self.base.name(i)

    def path(self, i: int) -> str:
        return self.base.path(i)

    def load(self, i: int, min_side: Optional[int] = None) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.base.load(i, min_side)

    def refusal(self, i: int) -> str:
        return self.base.refusal(i)

    def labels(self) -> Optional[Tuple[List[str], List[int]]]:
        lab = self.base.labels()
        return None if lab is None else (lab[0], lab[1][:self.n])


ImagesSpec = Union[str, Mapping[str, Any]]


def _split_torchvision(spec: str) -> Dict[str, Any]:
    parts = spec.split(":")
    # torchvision:NAME[:ROOT[:SPLIT]]; a Windows drive letter in ROOT is rejoined
    if len(parts) < 2 or not parts[1]:
        raise DeconvisError(f"--images {spec!r}: write torchvision:NAME:ROOT[:SPLIT], e.g. torchvision:CIFAR10:/data/cifar")
    name = parts[1]
    rest = parts[2:]
    split = None
    if len(rest) >= 2 and not (len(rest[0]) == 1 and rest[0].isalpha()):
        split = rest[-1]
        rest = rest[:-1]
    root = ":".join(rest)
    return {"type": "torchvision", "name": name, "root": root, "split": split}


def parse_images_spec(spec: ImagesSpec) -> Dict[str, Any]:
    """Normalise an image-set spec (string or dict) to a dict with a ``type`` key."""
    if isinstance(spec, Mapping):
        d = dict(spec)
        t = d.get("type")
        if t not in ("folder", "torchvision", "builtin"):
            raise DeconvisError(f"images: type must be folder, torchvision or builtin, got {t!r}")
        allowed = {"folder": {"type", "path"}, "builtin": {"type", "name"},
                   "torchvision": {"type", "name", "root", "split", "train", "kwargs"}}[t]
        extra = sorted(set(d) - allowed)
        if extra:
            raise DeconvisError(f"images: unknown key {extra[0]!r} for type {t}" + close_matches(extra[0], allowed))
        need = {"folder": ["path"], "builtin": ["name"], "torchvision": ["name"]}[t]
        for key in need:
            if not d.get(key):
                raise DeconvisError(f"images: type {t} needs a {key!r} key")
        return d
    if not isinstance(spec, str) or not spec:
        raise DeconvisError("images: give a folder, torchvision:NAME:ROOT or builtin:skimage-crops")
    if spec.startswith("builtin:"):
        return {"type": "builtin", "name": spec[len("builtin:"):]}
    if spec.startswith("torchvision:"):
        return _split_torchvision(spec)
    return {"type": "folder", "path": spec}


BUILTIN_SETS = ("skimage", "skimage-crops")


def open_images(spec: ImagesSpec, max_images: Optional[int] = None, base_dir: Optional[str] = None,
                max_pixels: Optional[int] = MAX_PIXELS) -> ImageSource:
    """The image set named by ``spec`` (see module doc), optionally cut to its first
    ``max_images``. Relative folder paths are tried against the working directory, then
    ``base_dir`` (the config file's folder). Files above ``max_pixels`` pixels are skipped
    undecoded (0/None: no cap). Raises DeconvisError for missing/empty sets."""
    d = parse_images_spec(spec)
    src: ImageSource
    if d["type"] == "builtin":
        if d["name"] not in BUILTIN_SETS:
            raise DeconvisError(f"unknown built-in image set {d['name']!r}; choose "
                                + ", ".join(f"builtin:{b}" for b in BUILTIN_SETS) + close_matches(d["name"], BUILTIN_SETS))
        src = SkimageImages(crops=d["name"] == "skimage-crops")
    elif d["type"] == "torchvision":
        root = d.get("root") or ""
        if root and not os.path.isabs(root) and base_dir and not os.path.exists(root) \
                and os.path.exists(os.path.join(base_dir, root)):
            root = os.path.join(base_dir, root)
        src = TorchvisionImages(d["name"], root, split=d.get("split"), train=d.get("train"), kwargs=d.get("kwargs"))
    else:
        path = os.path.expanduser(str(d["path"]))
        if not os.path.isabs(path) and base_dir and not os.path.exists(path) \
                and os.path.exists(os.path.join(base_dir, path)):
            path = os.path.join(base_dir, path)
        src = FolderImages(path, max_pixels)
    if len(src) == 0:
        raise DeconvisError(f"image set {src.spec!r} is empty")
    if max_images is not None and max_images > 0 and max_images < len(src):
        src = LimitedImages(src, max_images)
    return src
