"""Image formats of a visualize run's pictures: size, error and encode time per candidate.

Reads a run folder written with ``--lossless`` (PNG sprites and sheets: the exact pixels) and
re-encodes a sample of each part with every candidate setting:

* the sprites of each layer (``tiles/<layer>/c*.png``; error split into the reconstructions' row and
  the image patches' row, :mod:`deconvis.render.sprites`),
* the sheets of each layer (``layer_<label>_p*.png``),
* the winners' thumbnails, rebuilt from the image folder (``--images``) as the run builds them.

Per part and candidate: the megabytes the whole part would take (the sample's bytes scaled by the
part's pixel count), the size against the run's current format (JPEG quality 93, 4:4:4), the mean
and 99th-percentile absolute error in levels of 255 (all pixels and colour channels, against the
lossless pixels), and the encode CPU seconds for the whole part (scaled the same way).

    python benchmarks/bench_formats.py RUN_DIR [--every 3] [--images DIR] [--record]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time
from typing import Callable, Dict, List, Tuple

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, record, table  # noqa: E402

SECTION = "Image formats of the run's pictures (benchmarks/bench_formats.py)"


def _jpeg(q: int, sampling: int = cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, optimize: bool = False,
          chroma: int = 0, progressive: bool = False) -> Callable[[np.ndarray], bytes]:
    params = [cv2.IMWRITE_JPEG_QUALITY, q, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
    if optimize:
        params += [cv2.IMWRITE_JPEG_OPTIMIZE, 1]
    if progressive:
        params += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    if chroma:
        params += [cv2.IMWRITE_JPEG_LUMA_QUALITY, q, cv2.IMWRITE_JPEG_CHROMA_QUALITY, chroma]

    def enc(bgr: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".jpg", bgr, params)
        assert ok
        return buf.tobytes()
    return enc


def _png(level: int) -> Callable[[np.ndarray], bytes]:
    def enc(bgr: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, level])
        assert ok
        return buf.tobytes()
    return enc


#: name -> encoder of a BGR uint8 image; the first is the run's current format (the reference)
CANDIDATES: Dict[str, Callable[[np.ndarray], bytes]] = {
    "JPEG 93 4:4:4 (current)": _jpeg(93),
    "JPEG 92 4:4:4": _jpeg(92),
    "JPEG 91 4:4:4": _jpeg(91),
    "JPEG 90 4:4:4": _jpeg(90),
    "JPEG 93 4:4:4, chroma 90": _jpeg(93, chroma=90),
    "JPEG 93 4:2:2": _jpeg(93, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422),
    "JPEG 93 4:4:4 optimized Huffman": _jpeg(93, optimize=True),
    "JPEG 93 4:4:4 progressive": _jpeg(93, progressive=True),
    "JPEG 92 4:4:4 optimized Huffman": _jpeg(92, optimize=True),
    "JPEG 92 4:4:4 progressive": _jpeg(92, progressive=True),
    "PNG level 3 (lossless)": _png(3),
    "PNG level 6 (lossless)": _png(6),
}


def _sample(paths: List[str], every: int) -> List[str]:
    return paths[::max(1, every)]


def measure(images: List[np.ndarray], total_px: int, rows: int = 1) -> List[List[str]]:
    """Rows per candidate for one part: ``images`` BGR uint8 (the sample), ``total_px`` the
    part's pixels; ``rows`` 2: also the error of the top and bottom halves (sprites: rec, img)."""
    sample_px = sum(im.shape[0] * im.shape[1] for im in images)
    scale = total_px / max(sample_px, 1)
    out, ref = [], None
    for name, enc in CANDIDATES.items():
        size, cpu = 0, 0.0
        errs: List[List[np.ndarray]] = [[] for _ in range(rows)]
        for im in images:
            t = time.thread_time()
            buf = enc(im)
            cpu += time.thread_time() - t
            size += len(buf)
            back = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
            d = np.abs(back.astype(np.int16) - im.astype(np.int16)).astype(np.uint8)
            h = d.shape[0] // rows
            for j in range(rows):
                errs[j].append(d[j * h:(j + 1) * h].ravel())
        ref = ref or size
        stats = []
        for e in errs:
            e = np.concatenate(e)
            stats.append(f"{e.mean():.2f} / {np.percentile(e, 99):.0f}")
        out.append([name, f"{size * scale / 1e6:.1f}", f"{size / ref:.2f}", *stats, f"{cpu * scale:.2f}"])
    return out


def thumbnails(folder: str, n: int) -> Tuple[List[np.ndarray], int]:
    """The first ``n`` images of ``folder`` as the run's thumbnails (resize short side 256, centre
    crop 224, area-downscaled to 160 px): BGR, and the pixels of all of them."""
    paths = sorted(glob.glob(os.path.join(folder, "*.jpg")))[:n]
    out = []
    for p in paths:
        im = cv2.imread(p, cv2.IMREAD_COLOR)
        h, w = im.shape[:2]
        s = 256 / min(h, w)
        im = cv2.resize(im, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        y, x = (im.shape[0] - 224) // 2, (im.shape[1] - 224) // 2
        out.append(cv2.resize(im[y:y + 224, x:x + 224], (160, 160), interpolation=cv2.INTER_AREA))
    return out, 160 * 160 * len(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a run folder written with --lossless")
    ap.add_argument("--every", type=int, default=3, help="measure every N-th sprite and sheet of each layer")
    ap.add_argument("--images", default="", help="the run's image folder (for the thumbnails' rows)")
    ap.add_argument("--thumbs", type=int, default=300, help="thumbnails to measure")
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    run = args.run_dir
    head = ["candidate", "MB (whole part)", "size vs current", "error: mean / p99 levels", "encode CPU s"]
    body = []
    for layer_dir in sorted(glob.glob(os.path.join(run, "tiles", "*"))):
        paths = sorted(glob.glob(os.path.join(layer_dir, "c*.png")))
        if not paths:
            continue
        label = os.path.basename(layer_dir)
        first = cv2.imread(paths[0], cv2.IMREAD_COLOR)
        imgs = [cv2.imread(p, cv2.IMREAD_COLOR) for p in _sample(paths, args.every)]
        total = first.shape[0] * first.shape[1] * len(paths)
        print(f"sprites {label}: {len(paths)} x {first.shape[1]}x{first.shape[0]}", flush=True)
        body.append(f"**Sprites {label}** ({len(paths)} sprites of {first.shape[1]} x {first.shape[0]} px; "
                    f"{len(imgs)} measured)\n\n"
                    + table(["candidate", "MB (whole part)", "size vs current", "error rec: mean / p99",
                             "error img: mean / p99", "encode CPU s"], measure(imgs, total, rows=2)))
    sheets: Dict[str, List[str]] = {}
    for p in sorted(glob.glob(os.path.join(run, "layer_*_p*.png"))):
        sheets.setdefault(re.sub(r"_p\d+\.png$", "", os.path.basename(p))[len("layer_"):], []).append(p)
    for label, paths in sheets.items():
        all_imgs = [cv2.imread(p, cv2.IMREAD_COLOR) for p in paths]
        total = sum(im.shape[0] * im.shape[1] for im in all_imgs)
        imgs = _sample(all_imgs, args.every)
        print(f"sheets {label}: {len(paths)}", flush=True)
        body.append(f"**Sheets {label}** ({len(paths)} pages, {total / 1e6:.1f} Mpx; {len(imgs)} measured)\n\n"
                    + table(head, measure(imgs, total)))
    if args.images:
        n_thumbs = len(glob.glob(os.path.join(run, "units", "thumbs", "*.jpg"))) or args.thumbs
        imgs, px = thumbnails(args.images, args.thumbs)
        print("thumbnails", flush=True)
        body.append(f"**Thumbnails** ({n_thumbs} in the run; {len(imgs)} measured, scaled to {n_thumbs})\n\n"
                    + table(head, measure(imgs, px * n_thumbs // max(len(imgs), 1))))
    text = (f"{machine()}\n\nRun folder: `{os.path.basename(os.path.normpath(run))}` (written with `--lossless`). "
            "MB: the sample's bytes scaled to the whole part by its pixels; error: absolute difference to the "
            "lossless pixels over every pixel and colour channel, levels of 255; encode CPU: thread CPU seconds "
            "of the encoder, scaled the same way.\n\n" + "\n\n".join(body))
    print(text)
    if args.record:
        record(SECTION, text)


if __name__ == "__main__":
    main()
