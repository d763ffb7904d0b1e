"""index.html: self-contained, links resolve, hostile names escaped, renders in headless Chromium."""
from __future__ import annotations

import html.parser
import json
import os

import pytest

import pipeline_fixtures as fx
from cdp_browser import Browser, chromium
from deconvis.runs import pipeline
from deconvis.runs import report
from deconvis.runs import results as R


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.scripts, self.external, self._in_data, self.data = [], 0, [], False, ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a":
            self.links.append(a["href"])
        if tag == "script":
            self.scripts += 1
            self._in_data = a.get("id") == "data"
            if "src" in a:
                self.external.append(a["src"])
        if tag == "link":
            self.external.append(a.get("href"))

    def handle_data(self, data):
        if self._in_data:
            self.data += data

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_data = False


@pytest.fixture(scope="module")
def run_out(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    return pipeline.run(fx.tiny_config(tmp, per_sheet=3))


def test_report_is_self_contained_and_links_resolve(run_out):
    text = open(run_out.report, encoding="utf-8").read()
    p = _Collect()
    p.feed(text)
    assert p.external == [] and p.scripts == 2 and "<style>" in text
    data = json.loads(p.data)
    assert data["k"] == 3 and [L["label"] for L in data["layers"]] == ["conv1", "conv2", "conv3"]
    for href in p.links:  # sheet links
        assert not os.path.isabs(href) and os.path.isfile(os.path.join(run_out.run_dir, href))
    assert len(p.links) == sum(len(lr.sheets) for lr in run_out.results.layers)
    n = 0
    for L, lr in zip(data["layers"], run_out.results.layers):
        assert len(L["units"]) == lr.channels and L["cell"] == lr.cell
        for u, ru in zip(L["units"], lr.units):
            assert u["s"] == ru.sprite and os.path.isfile(os.path.join(run_out.run_dir, u["s"]))  # one sprite per channel
            for w in u["w"]:
                assert "rec" not in w and "img" not in w  # tiles are cells of the sprite, not files
                assert data["images"][str(w["i"])].startswith("img")
                n += 1
    assert n == sum(len(u.winners) for lr in run_out.results.layers for u in lr.units)


def test_hostile_names_are_escaped():
    evil = '</script><img src=x onerror=alert(1)>"&'
    w = R.Winner(rank=0, image=0, source=evil, activation=1.0, y=0, x=0)
    lr = R.LayerResult(name=evil, label=evil, channels=1, channels_total=1, map_size=[1, 1],
                       units=[R.ChannelResult(channel=0, winners=[w])])
    res = R.Results(config={"k": 1, "run": evil}, mining_hash="", projection_hash="", model={"spec": evil},
                    preprocess={}, input_size=[8, 8], rule="deconvnet",
                    images={"spec": evil, "count": 1, "items": {"0": {"name": evil}}}, layers=[lr])
    text = report.render_html(res)
    assert "<img src=x" not in text and text.count("</script>") == 2
    p = _Collect()
    p.feed(text)
    data = json.loads(p.data)
    assert data["images"]["0"] == evil and data["layers"][0]["label"] == evil


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = chromium()  # installs Debian's chromium with apt-get when it is missing
    if exe is None:
        pytest.skip("no chromium/chrome, and apt-get cannot install it here (not root or no apt-get)")
    b = Browser(exe, str(tmp_path_factory.mktemp("chrome-profile")))
    yield b
    b.close()


def test_report_in_headless_chromium_loads_switches_tabs_and_enlarges_tiles(run_out, browser):
    """The page as a user sees it: it loads without console errors, its script built the first
    layer's channels, a click on a tab shows that layer, a click on a tile opens the enlarged
    view of that winner, and a click on the view closes it."""
    url = "file://" + os.path.abspath(run_out.report)
    browser.goto(url)
    layers = run_out.results.layers
    assert browser.js("document.body.classList.contains('nojs')") is False
    assert browser.js("[...document.querySelectorAll('nav button')].map(b=>b.textContent)") == [lr.label for lr in layers]
    first = layers[0]
    assert browser.js("document.querySelector('nav button.active').textContent") == first.label
    assert browser.js("document.querySelectorAll('section.layer.active .ch').length") == first.channels
    # tabs switch on a real click
    second = layers[1]
    browser.click("nav button:nth-of-type(2)")
    browser.settle()
    assert browser.js("document.querySelector('nav button.active').textContent") == second.label
    assert browser.js("document.querySelector('section.layer.active').id") == "L1"
    assert browser.js("location.hash") == "#" + second.label
    n_tiles = second.channels * len(second.units[0].winners) * 2
    assert browser.js("document.querySelectorAll('section.layer.active .t[title]').length") == n_tiles
    # every tile image of the open tab loaded (no broken links)
    browser.js("Promise.all([...document.querySelectorAll('section.layer.active .t img')].map(i=>{"
               "i.loading='eager'; return i.complete ? 0 : new Promise(r=>{i.onload=i.onerror=r;});}))")
    assert browser.js("[...document.querySelectorAll('section.layer.active .t img')].filter(i=>!i.naturalWidth).length") == 0
    # each tile is the window of its cell in the channel's sprite: rank r in column r, rec above img
    h, wd = second.cell
    k = len(second.units[0].winners)
    assert browser.js("document.querySelector('section.layer.active .t img').naturalWidth") == k * wd
    unit = second.units[1]
    w = unit.winners[2]
    s = 64 / max(h, wd)
    boxes = browser.js(f"[...document.querySelectorAll('#L1c{unit.channel} .t')].map(t=>{{const i=t.querySelector('img');"
                       "const a=t.getBoundingClientRect(), b=i.getBoundingClientRect();"
                       "return [i.getAttribute('src'), b.left-a.left, b.top-a.top, a.width, a.height];})")
    for n, (src, dx, dy, tw, th) in enumerate(boxes):  # k rec tiles, then k img tiles
        row, rank = divmod(n, k)
        assert src == unit.sprite and (dx, dy) == pytest.approx((-rank * wd * s, -row * h * s), abs=0.6), n
        assert (tw, th) == pytest.approx((round(wd * s), round(h * s)), abs=0.6)
    # a tile click opens the enlarged view of that winner
    browser.click(f"#L1c{unit.channel} .tiles .t:nth-child(3)")
    browser.settle()
    assert browser.js("document.getElementById('box').classList.contains('on')") is True
    src = browser.js("document.querySelector('#box img.rec').getAttribute('src')")
    assert src == unit.sprite
    big = browser.js("(()=>{const i=document.querySelector('#box img.img'), a=i.parentElement.getBoundingClientRect(),"
                     "b=i.getBoundingClientRect(); return [b.left-a.left, b.top-a.top, a.width];})()")
    assert big[0] == pytest.approx(-2 * wd * big[2] / wd, abs=1.0) and big[1] == pytest.approx(-h * big[2] / wd, abs=1.0)
    text = browser.js("document.querySelector('#box p').textContent")
    assert f"channel {unit.channel}  rank 3 of" in text and f"image #{w.image}" in text
    browser.js("new Promise(r=>{const i=document.querySelector('#box img.rec'); i.complete ? r() : (i.onload=i.onerror=r);})")
    assert browser.js("document.querySelector('#box img.rec').naturalWidth") > 0
    browser.click("#box")
    browser.settle()
    assert browser.js("document.getElementById('box').classList.contains('on')") is False
    assert browser.errors == []


def test_report_with_analyses_in_headless_chromium(tmp_path, browser):
    """With --analyses, each analysis is a tab after the layers: a click shows its section with
    the figure (loaded) and the key-number table; no console errors."""
    out = pipeline.run(fx.tiny_config(tmp_path, analyses=["diagnose", "correspondence"]))
    browser.goto("file://" + os.path.abspath(out.report))
    labels = [lr.label for lr in out.results.layers]
    assert browser.js("[...document.querySelectorAll('nav button')].map(b=>b.textContent)") == \
        labels + ["diagnose", "correspondence"]
    browser.click(f"nav button:nth-of-type({len(labels) + 1})")
    browser.settle()
    assert browser.js("document.querySelector('section.analysis.active').id") == "A-diagnose"
    assert browser.js("location.hash") == "#diagnose"
    assert browser.js("document.querySelectorAll('section.layer.active').length") == 0
    browser.js("new Promise(r=>{const i=document.querySelector('section.analysis.active img.fig');"
               " i.complete ? r() : (i.onload=i.onerror=r);})")
    assert browser.js("document.querySelector('section.analysis.active img.fig').naturalWidth") > 100
    rows = out.results.analyses["diagnose"].rows
    assert browser.js("document.querySelectorAll('section.analysis.active table.keys tr').length") == len(rows) + 1
    browser.click(f"nav button:nth-of-type({len(labels) + 2})")
    browser.settle()
    assert "Skipped" in browser.js("document.querySelector('section.analysis.active').textContent")
    browser.click("nav button:nth-of-type(2)")  # back to a layer: its channels are built
    browser.settle()
    assert browser.js("document.querySelectorAll('section.layer.active .ch').length") == out.results.layers[1].channels
    assert browser.errors == []
