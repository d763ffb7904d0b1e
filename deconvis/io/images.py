"""Image sets for mining and their preprocessing; this module holds the torch Dataset and loader and
re-exports the image sets (:mod:`deconvis.io.sources`) and pixel functions (:mod:`deconvis.io.pixels`).

Image-set specs (:func:`open_images`), as a string or a dict:

* a folder (``path/to/images`` or ``{type: folder, path: ...}``): every image below it,
  recursively, in sorted relative-path order (``.jpg .jpeg .png .bmp .tif .tiff .webp .ppm .pgm``);
  read with OpenCV; grey -> RGB, alpha dropped, 16-bit scaled to 8-bit. Unreadable files are
  skipped during mining and listed in the run log; so are files whose header says they are
  larger than ``max_pixels`` (a decompression bomb: never decoded), and files above
  :data:`deconvis.io.pixels.REDUCED_DECODE_ABOVE` pixels are decoded reduced (1/2 to 1/8, never
  below the resize target).
* a torchvision dataset (``torchvision:CIFAR10:/data/cifar`` or ``torchvision:CIFAR10:/data:test``
  or ``{type: torchvision, name: CIFAR10, root: /data, split: test}`` / ``train: false``); never
  downloaded: a clear error says where to put the files.
* ``builtin:skimage``: the photographs bundled with scikit-image (offline);
  ``builtin:skimage-crops``: those photos plus deterministic multi-scale crops of them
  (~250 images), a small but not thin set for the demo.

Every image gets a global index (its position in the set) and a name (relative path, dataset
item, or ``skimage:<photo>[@crop]``) that results use to name the source.

Preprocessing is :class:`deconvis.io.models.Preprocess`: resize the short side to ``resize`` pixels
(bilinear, antialiased when shrinking), centre-crop ``crop`` (h, w) -- the *displayed* image,
uint8 RGB ``[h, w, 3]`` -- then scale to [0, 1] and normalise by mean/std into the network input
``[3, h, w]``. Receptive-field boxes are in the pixel coordinates of the displayed image.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deconvis.io.models import Preprocess
from deconvis.io.pixels import (GREY, MAX_PIXELS, ImageTooLarge, UnreadableImage, crop_offset, denormalize,
                                normalize, normalize_batch, preprocess_image, read_image, resized_size, to_rgb8, unnormalize)
from deconvis.io.prefetch import Prefetch
from deconvis.io.sources import (BUILTIN_SETS, CROP_SCALES, IMAGE_EXTS, FolderImages, ImageSource, ImagesSpec,
                                 LimitedImages, SKIMAGE_PHOTOS, SkimageImages, TorchvisionImages, open_images,
                                 parse_images_spec, photo_crops, skimage_photo)

log = logging.getLogger("deconvis")

__all__ = ["BUILTIN_SETS", "CROP_SCALES", "GREY", "IMAGE_EXTS", "MAX_PIXELS", "FolderImages", "ImageDataset",
           "ImageSource", "ImageTooLarge", "ImagesSpec", "LimitedImages", "Normalized", "SKIMAGE_PHOTOS", "SkimageImages", "TorchvisionImages", "UnreadableImage",
           "crop_offset", "denormalize", "make_loader", "normalize", "normalize_batch", "open_images", "parse_images_spec",
           "photo_crops", "preprocess_image", "read_image", "resized_size", "skimage_photo", "to_rgb8", "unnormalize"]


class ImageDataset(Dataset):
    """``(input [3, h, w] float32 normalised, index)`` per image of ``source``; with
    ``displayed=True`` ``(displayed uint8 [h, w, 3], index)`` instead, for a loader whose batches
    are normalised whole (:class:`Normalized`: cheaper than an image at a time).

    An unreadable image yields a zero tensor and index ``-1 - i`` (mining skips and logs it), so
    one bad file never stops a long run. ``display(i)`` gives the displayed uint8 image.
    """

    def __init__(self, source: ImageSource, preprocess: Preprocess, start: int = 0, displayed: bool = False):
        self.source, self.preprocess, self.start = source, preprocess, int(start)
        self.displayed = bool(displayed)

    def __len__(self) -> int:
        return max(0, len(self.source) - self.start)

    def display(self, i: int) -> np.ndarray:
        """Image ``i`` (global index) as displayed: uint8 RGB ``[h, w, 3]`` after resize+crop."""
        return preprocess_image(self.source.load(i, min_side=self.preprocess.resize), self.preprocess)

    def __getitem__(self, j: int) -> Tuple[torch.Tensor, int]:
        i = self.start + j
        try:
            shown = self.display(i)
        except UnreadableImage:
            h, w = self.preprocess.crop
            if self.displayed:
                return torch.zeros(h, w, 3, dtype=torch.uint8), -1 - i
            return torch.zeros(3, h, w, dtype=torch.float32), -1 - i
        if self.displayed:
            return torch.from_numpy(shown), i
        return normalize(shown, self.preprocess), i


class Normalized:
    """Batches ``(displayed uint8 [B, h, w, 3], ids [B])`` of a loader over an
    ``ImageDataset(..., displayed=True)`` as ``(input float32 [B, 3, h, w], ids)``: each batch moved
    to ``device`` as uint8, then normalised there (:func:`deconvis.io.pixels.normalize_batch`,
    value for value the per-image :func:`normalize`). ``read_ahead``: the loader is read on a
    thread, the next batches decoding meanwhile (:class:`deconvis.io.prefetch.Prefetch`; for a
    loader with no worker processes). Iterable as often as the loader."""

    def __init__(self, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]], preprocess: Preprocess,
                 device: "torch.device | str" = "cpu", read_ahead: bool = False):
        self.loader, self.preprocess, self.device = loader, preprocess, torch.device(device)
        self.read_ahead = bool(read_ahead)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for shown, ids in Prefetch(self.loader) if self.read_ahead else self.loader:
            yield normalize_batch(shown.to(self.device, non_blocking=True), self.preprocess), ids


def make_loader(dataset: ImageDataset, batch_size: int, workers: int = 0, pin_memory: bool = False, *,
                sampler: Optional[Sampler] = None, prefetch_factor: int = 2,
                persistent_workers: bool = False) -> DataLoader:
    """Ordered (unshuffled) batches ``(images [B, 3, h, w], ids [B])`` (of an ``ImageDataset(...,
    displayed=True)``: ``(displayed uint8 [B, h, w, 3], ids [B])``, see :class:`Normalized`).

    ``sampler`` picks (and orders) the dataset positions, e.g. one rank's shard
    (:class:`deconvis.runs.distributed.ShardSampler`); ``workers`` processes decode in parallel, each
    ``prefetch_factor`` batches ahead; ``pin_memory`` (for CUDA) lets the copy to the device run
    asynchronously; ``persistent_workers`` keeps the workers between passes. (Workers leave
    OpenCV's thread settings alone: ``cv2.setNumThreads`` in a forked worker hangs when the parent
    had used OpenCV's thread pool.)"""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=bool(persistent_workers and workers > 0),
                      prefetch_factor=prefetch_factor if workers > 0 else None)
