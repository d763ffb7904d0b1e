"""Settings of ``deconvis explore``, building its :class:`~deconvis.explore.session.Session` from a
run folder or a model, and serving the app with uvicorn on 127.0.0.1 only.

Starlette and uvicorn are optional (``pip install 'deconvis[explore]'``): this module imports
them only when the explorer starts, so the settings and the CLI load without them, and their
absence is a one-line :class:`DeconvisError`.
"""
from __future__ import annotations

import os
import socket
import threading
import webbrowser
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from deconvis.config import Config, check_device, option
from deconvis.errors import DeconvisError
from deconvis.explore.session import Session
from deconvis.io.images import ImageSource, open_images
from deconvis.io.models import load_model, resolve_weights, with_resize_crop
from deconvis.io.pixels import MAX_PIXELS
from deconvis.runs import results as run_results
from deconvis.utils.device import use_device

#: the only address the explorer listens on
HOST = "127.0.0.1"
INSTALL_HINT = "pip install 'deconvis[explore]'"


@dataclass
class ExploreConfig(Config):
    """Settings of ``deconvis explore``: every key is a YAML key (--config) and a --flag."""

    run: str = option("", "run folder written by deconvis visualize (holds results.json); empty: explore "
                          "--model/--weights without a run", metavar="DIR")
    model: str = option("", "without a run: torchvision name, module:callable, file.py:callable or zfnet_demo "
                            "(with a run: empty = the run's model)")
    weights: str = option("", "checkpoint path, asset:NAME, a torchvision weights name or random "
                              "(empty: the run's weights, else random)")
    images: str = option("", "image set to pick from: folder, torchvision:NAME:ROOT or builtin:skimage-crops "
                             "(empty: the run's set; without a run, uploads only)")
    max_images: Optional[int] = option(None, "list only the first N images of the set (null: the run's setting)")
    layers: List[str] = option([], "layers to show, comma separated (empty: the run's layers, else every conv layer)")
    resize: Optional[int] = option(None, "without a run: short side in pixels before the crop (null: the weights')")
    crop: Optional[int] = option(None, "without a run: centre-crop side in pixels (null: the weights')")
    port: int = option(8765, "port on 127.0.0.1 (0: any free port); the explorer never listens elsewhere")
    open_browser: bool = option(False, "open the page in the default web browser")
    max_upload_mb: float = option(20.0, "largest upload in megabytes (MiB)")
    max_upload_pixels: int = option(40_000_000, "largest uploaded image in pixels (width x height)")
    seed: Optional[int] = option(None, "seed random weights are drawn from (null: the run's seed, else 0)")
    device: str = option("cpu", "auto, cpu, cuda or cuda:N")
    threads: int = option(0, "torch CPU threads (0: torch's default)")

    def validate(self) -> None:
        if not self.run and not self.model:
            raise DeconvisError("nothing to explore: give a run folder (deconvis explore outputs/demo) or --model")
        if self.run and not os.path.isdir(self.run):
            raise DeconvisError(f"run folder {self.run!r} does not exist; give the folder deconvis visualize wrote "
                                "(e.g. outputs/demo: make demo)")
        if not 0 <= self.port <= 65535:
            raise DeconvisError(f"port {self.port} must be in 0..65535 (0: any free port)")
        if self.max_upload_mb <= 0 or self.max_upload_pixels < 1:
            raise DeconvisError("max_upload_mb and max_upload_pixels must be positive")
        for key in ("resize", "crop", "max_images"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise DeconvisError(f"{key} {v} must be at least 1 (or null)")
        if self.threads < 0:
            raise DeconvisError(f"threads {self.threads} must be >= 0 (0: torch's default)")
        check_device(self.device)


def _open_set(spec: Any, max_images: Optional[int], max_pixels: Optional[int],
              base_dir: Optional[str]) -> Tuple[Optional[ImageSource], str]:
    """The image set, or (None, why) when it cannot be opened here (moved, no scikit-image)."""
    if not spec:
        return None, "no image set given: upload an image, or start with --images"
    try:
        return open_images(spec, max_images, base_dir=base_dir, max_pixels=max_pixels), ""
    except DeconvisError as exc:
        return None, f"the image set cannot be opened: {exc}"


def build_session(cfg: ExploreConfig) -> Session:
    """The session ``cfg`` describes: a run's model, preprocessing, image set and results, or a
    model alone (``--model``; images from ``--images`` or uploads)."""
    cfg.checked()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = use_device(cfg.device)
    res, run_dir, config_dir = None, None, None
    run_cfg: dict = {}
    if cfg.run:
        run_dir = cfg.run
        res = run_results.load(run_dir)
        run_cfg = res.config
        config_dir = os.path.dirname(os.path.abspath(run_dir.rstrip("/\\")))
    spec = cfg.model or (str(run_cfg.get("model") or res.model.get("spec")) if res is not None else "")
    weights = cfg.weights or str(run_cfg.get("weights") or "random")
    seed = cfg.seed if cfg.seed is not None else int(run_cfg.get("seed", 0) or 0)
    torch.manual_seed(seed)  # random weights: the run's draw
    loaded = load_model(spec, resolve_weights(weights, config_dir), device)
    if res is not None and not cfg.model:
        pp = res.preprocess
    else:
        pp = with_resize_crop(loaded.preprocess, cfg.resize, cfg.crop)
    images = cfg.images or run_cfg.get("images") or ""
    max_images = cfg.max_images if cfg.max_images is not None else run_cfg.get("max_images")
    max_pixels = run_cfg.get("max_pixels", MAX_PIXELS)
    source, why = _open_set(images, max_images, max_pixels, config_dir)
    return Session(loaded, pp, source=source, results=res, run_dir=run_dir, layers=cfg.layers,
                   max_upload_bytes=int(cfg.max_upload_mb * (1 << 20)), max_upload_pixels=cfg.max_upload_pixels,
                   source_error=why)


def need_web_stack() -> None:
    """DeconvisError naming the extra when Starlette or uvicorn is missing."""
    try:  # optional dependencies: the extra [explore]
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise DeconvisError(f"deconvis explore needs Starlette and uvicorn ({exc.name} is missing): "
                            f"{INSTALL_HINT}") from None


def bind(port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:``port`` (0: a free port); DeconvisError when taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        raise DeconvisError(f"cannot listen on {HOST}:{port} ({exc.strerror}); choose another --port "
                            "(0: any free port)") from None
    sock.listen(64)
    return sock


class Served:
    """A uvicorn server of ``app`` on 127.0.0.1 in a background thread (tests, benchmarks):
    ``url``; :meth:`stop` shuts it down (the app's lifespan end closes its session)."""

    def __init__(self, app: Any, port: int = 0) -> None:
        need_web_stack()
        import uvicorn  # optional dependency: the extra [explore]

        self.sock = bind(port)
        self.url = f"http://{HOST}:{self.sock.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            self.thread.join(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def serve(cfg: ExploreConfig, on_ready: Optional[Any] = None) -> None:
    """Build the session and serve it on 127.0.0.1 until interrupted; uploads are removed at exit."""
    need_web_stack()
    import uvicorn  # optional dependency: the extra [explore]

    from deconvis.explore.app import make_app  # imports Starlette (the extra [explore])

    session = build_session(cfg)
    name = os.path.basename(os.path.abspath(cfg.run.rstrip("/\\"))) if cfg.run else session.loaded.spec
    app = make_app(session, title=f"deconvis explore: {name}")
    sock = bind(cfg.port)
    url = f"http://{HOST}:{sock.getsockname()[1]}/"
    print(f"deconvis explore: {url} (Ctrl+C to stop)", flush=True)
    if on_ready is not None:
        on_ready(url)
    if cfg.open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on")).run(sockets=[sock])
    finally:
        sock.close()
        session.close()

