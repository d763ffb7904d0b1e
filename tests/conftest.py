"""Shared pytest fixtures: a headless Chromium driven by Playwright (see ``tests/browser.py``)."""
from __future__ import annotations

import pytest

from browser import CHROMIUM_ARGS, PageErrors, find_chromium


@pytest.fixture(scope="session")
def chromium_browser():
    """One headless Chromium for the session. Skips (with the reason) only when the machine has no
    Chromium; a missing Playwright is an error (it is in the ``test`` extra)."""
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (looked for /usr/bin/chromium, chromium, chromium-browser, "
                    "google-chrome; install Debian's: apt-get install chromium, or set DECONVIS_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise RuntimeError("the browser tests need Playwright for Python: pip install -e '.[test]'") from exc
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
    except Exception:
        pw.stop()
        raise
    yield browser
    browser.close()
    pw.stop()


@pytest.fixture
def page(chromium_browser):
    """A fresh page (own context: no shared cache or storage) at 1200x900 CSS pixels; its
    collected errors are ``page.errors.lines``."""
    context = chromium_browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.errors = PageErrors(pg)
    yield pg
    context.close()
