"""The explorer in headless Chromium (Playwright), served by uvicorn on 127.0.0.1 in a thread over
a tiny run: choose an image, switch layers, click a map to enlarge it, click a unit and see its
three projections and RF box appear beside the channel's top-k and unit-page link, upload a bad
file and see the error, and step through channels and layers with the keyboard."""
from __future__ import annotations

import os
import urllib.request

import pytest

import pipeline_fixtures as fx
from deconvis.explore.server import ExploreConfig, Served, build_session
from deconvis.runs import pipeline

pytest.importorskip("starlette", reason="the explorer tests need the test extra: pip install -e '.[test]'")
from deconvis.explore.app import make_app  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = pipeline.run(fx.tiny_config(tmp_path_factory.mktemp("explore_browser"), per_sheet=3))
    session = build_session(ExploreConfig.from_dict({"run": out.run_dir}))
    srv = Served(make_app(session), port=0)
    srv.session = session
    try:
        yield srv
    finally:
        srv.stop()
    assert not os.path.exists(session.upload_dir)  # the app's shutdown closed the session: uploads removed


def _api(url):
    import json

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _loaded(page, selector):
    """How many images under ``selector`` have not loaded (0: all shown)."""
    return page.evaluate("""(sel) => Promise.all([...document.querySelectorAll(sel)].map(i => i.decode().catch(() => 0)))
        .then(() => [...document.querySelectorAll(sel)].filter(i => !i.naturalWidth).length)""", selector)


def test_click_through_the_explorer(served, page):
    from playwright.sync_api import expect

    s = served.session
    layers = s.layers
    page.goto(served.url)
    expect(page.locator("#layers button")).to_have_text([l.label for l in layers])
    expect(page.locator("#layers button.active")).to_have_text(layers[0].label)
    expect(page.locator("#grid .map")).to_have_count(layers[0].channels)
    # choose an image: the photo and the maps follow
    page.select_option("#image", "r4")
    expect(page.locator("#photo img")).to_have_attribute("src", "api/image/r4")
    assert _loaded(page, "#photo img") == 0
    # switch layers by a click on the tab
    page.locator("#layers button").nth(1).click()
    lay = layers[1]
    expect(page.locator("#layers button.active")).to_have_text(lay.label)
    expect(page.locator("#lname")).to_have_text(lay.label + (f" ({lay.name})" if lay.label != lay.name else ""))
    expect(page.locator("#grid .map")).to_have_count(lay.channels)
    # click a map: it is enlarged, its top-k and unit page appear
    page.locator("#grid .map").nth(2).click()
    expect(page.locator("#grid .map.sel")).to_have_attribute("data-c", "2")
    expect(page.locator("#chead")).to_contain_text(f"{lay.label} \u00b7 channel 2")
    expect(page.locator("#top .pic")).to_have_count(2 * s.results.k)
    assert _loaded(page, "#top img") == 0
    href = page.locator("#pagelink").get_attribute("href")
    assert href == "run/units/conv2/0002.html"
    with urllib.request.urlopen(served.url + href, timeout=30) as r:
        assert r.status == 200 and b"channel 2" in r.read()
    # click unit (y, x) of the enlarged map: three projections and the RF box of that unit
    h, w = lay.map_size
    big = page.locator("#big").bounding_box()
    y, x = 5, 9
    page.mouse.click(big["x"] + (x + 0.5) * big["width"] / w, big["y"] + (y + 0.5) * big["height"] / h)
    expect(page.locator("#proj figure")).to_have_count(3)
    expect(page.locator("#proj figcaption")).to_have_text(["deconvnet", "guided", "gradient"])
    assert _loaded(page, "#proj img") == 0
    want = _api(served.url + f"api/unit?image=r4&layer={lay.name}&channel=2&y={y}&x={x}&rules=deconvnet")
    b = want["box"]
    expect(page.locator("#uinfo")).to_contain_text(f"RF box y {b[0]}..{b[1]}, x {b[2]}..{b[3]} px")
    src = page.locator('#proj figure[data-rule="deconvnet"] img').get_attribute("src")
    assert src == want["projections"]["deconvnet"]
    expect(page.locator("#photo .rfbox")).to_be_visible()
    # a bad upload: the server's error is shown on the page
    page.set_input_files("#upload", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"no pixels"}])
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("upload 'notes.png' is not an image")
    # a good upload becomes the current image
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".png", np.full((40, 44, 3), 200, np.uint8))
    page.set_input_files("#upload", files=[{"name": "grey.png", "mimeType": "image/png", "buffer": buf.tobytes()}])
    expect(page.locator("#image")).to_have_value("u1")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#photo img")).to_have_attribute("src", "api/image/u1")
    expect(page.locator("#grid .map")).to_have_count(lay.channels)
    errors = [l for l in page.errors.lines if "status of 415" not in l]
    assert errors == []


def test_keyboard_moves_between_channels_and_layers(served, page):
    from playwright.sync_api import expect

    layers = served.session.layers
    page.goto(served.url)
    expect(page.locator("#grid .map")).to_have_count(layers[0].channels)
    expect(page.locator("#grid .map.sel")).to_have_attribute("data-c", "0")
    page.locator("#lname").click()  # focus the page, not the image list
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#grid .map.sel")).to_have_attribute("data-c", "2")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#chead")).to_contain_text(f"{layers[0].label} \u00b7 channel 1")
    page.keyboard.press("ArrowDown")
    expect(page.locator("#layers button.active")).to_have_text(layers[1].label)
    expect(page.locator("#grid .map")).to_have_count(layers[1].channels)
    expect(page.locator("#grid .map.sel")).to_have_attribute("data-c", "1")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")  # past the last layer: stays
    expect(page.locator("#layers button.active")).to_have_text(layers[2].label)
    page.keyboard.press("ArrowUp")
    expect(page.locator("#layers button.active")).to_have_text(layers[1].label)
    expect(page.locator("#grid")).to_have_attribute("data-layer", layers[1].name)  # its maps arrived
    # Enter projects the channel's strongest unit
    page.keyboard.press("Enter")
    expect(page.locator("#proj figure")).to_have_count(3)
    maps = _api(served.url + f"api/maps?image=r0&layer={layers[1].name}")
    y, x = maps["argmax"][1]
    want = _api(served.url + f"api/unit?image=r0&layer={layers[1].name}&channel=1&y={y}&x={x}&rules=deconvnet")
    expect(page.locator("#uinfo")).to_contain_text("RF box y {}..{}, x {}..{} px".format(*want["box"]))
    assert page.errors.lines == []
