"""Screenshot of the live explorer for the README (``docs/images/explorer.png``).

Serves ``deconvis explore RUN_DIR`` on a free port of 127.0.0.1, opens it in the system's
Chromium with Playwright (never a browser download), chooses an image, a layer and a channel,
projects the channel's strongest unit (the Enter key) and saves the page::

    python scripts/screenshot_explorer.py outputs/demo docs/images/explorer.png --image r0 --layer conv5
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from browser import CHROMIUM_ARGS, find_chromium  # noqa: E402
from deconvis.explore.app import make_app  # noqa: E402
from deconvis.explore.server import ExploreConfig, Served, build_session  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("out", help="PNG file to write")
    ap.add_argument("--image", default="r0", help="image id (r<index> of the run's set)")
    ap.add_argument("--layer", default="conv3")
    ap.add_argument("--channel", type=int, default=-1, help="channel (-1: the layer's strongest on the image)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1000)
    args = ap.parse_args()
    from playwright.sync_api import expect, sync_playwright

    session = build_session(ExploreConfig.from_dict({"run": args.run_dir}))
    srv = Served(make_app(session, title=f"deconvis explore: {os.path.basename(os.path.abspath(args.run_dir))}"))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(srv.url)
            page.select_option("#image", args.image)
            labels = [l.label for l in session.layers]
            page.locator("#layers button").nth(labels.index(args.layer)).click()
            lay = session.layer(args.layer)
            expect(page.locator("#grid .map")).to_have_count(lay.channels)
            maxima = session.maps(args.image, args.layer).maxima
            channel = args.channel if args.channel >= 0 else max(range(len(maxima)), key=maxima.__getitem__)
            page.locator("#grid .map").nth(channel).click()
            expect(page.locator("#top .pic").first).to_be_visible()
            page.locator("#lname").click()
            page.keyboard.press("Enter")
            expect(page.locator("#proj figure")).to_have_count(3)
            page.wait_for_timeout(300)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        srv.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
