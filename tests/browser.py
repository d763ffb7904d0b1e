"""Headless Chromium for tests, driven by Playwright for Python: Debian's ``chromium`` (never a
browser download), found by :func:`find_chromium`, launched with :data:`CHROMIUM_ARGS` (no
sandbox as root in containers, no GPU, nothing that reaches the network on its own).

:class:`PageErrors` collects what a user would see as broken: console errors, uncaught
exceptions and failed requests (a missing image on a ``file://`` page is one). The fixtures in
``conftest.py`` (``chromium_browser``, ``page``) use these.
"""
from __future__ import annotations

import os
import shutil
from typing import List, Optional

#: where Debian and Ubuntu put Chromium, then names on PATH
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def find_chromium() -> Optional[str]:
    """Path of the system's Chromium (``$DECONVIS_CHROMIUM`` first), or None when there is none."""
    env = os.environ.get("DECONVIS_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for path in CHROMIUM_PATHS:
        if os.access(path, os.X_OK):
            return path
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class PageErrors:
    """Error lines of one page: ``console: ...``, ``exception: ...``, ``request failed: URL (why)``."""

    def __init__(self, page) -> None:
        self.lines: List[str] = []
        page.on("console", lambda m: self.lines.append(f"console: {m.text}") if m.type in ("error", "assert") else None)
        page.on("pageerror", lambda e: self.lines.append(f"exception: {e}"))
        page.on("requestfailed", lambda r: self.lines.append(f"request failed: {r.url} ({r.failure})"))
