"""index.html: self-contained, links resolve, hostile names escaped, works in headless Chromium
(Playwright driving the system's Chromium; see tests/browser.py)."""
from __future__ import annotations

import html.parser
import json
import os

import pytest

import pipeline_fixtures as fx
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


def test_script_file_and_class_names_are_escaped_everywhere_in_the_template():
    """Autoescape on: a file named ``<script>...`` (an image source, an analysis file, a table
    cell, a skip reason) shows as text in every place the template prints it."""
    evil = "<script>alert(1)</script>.png"
    w = R.Winner(rank=0, image=0, source=evil, activation=1.0, y=0, x=0)
    lr = R.LayerResult(name="conv1", label=evil, channels=1, channels_total=1, map_size=[1, 1],
                       sheets=[evil], units=[R.ChannelResult(channel=0, winners=[w])])
    rec = R.AnalysisRecord(name=evil, status=evil, reason=evil, files={evil: evil}, headers=[evil],
                           rows=[[evil, 1.5]], notes=[evil])
    res = R.Results(config={"k": 1, "run": evil}, mining_hash="", projection_hash="", model={"spec": evil, "weights": evil},
                    preprocess={}, input_size=[8, 8], rule="deconvnet", images={"spec": evil, "count": 1}, layers=[lr],
                    analyses={evil: rec})
    text = report.render_html(res)
    assert "<script>alert" not in text and text.count("<script") == 2
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;.png") >= 12
    assert '<td class="num">1.5</td>' in text  # numbers are cells, not escaped markup


def test_templates_ship_as_package_data():
    """Every template file is matched by setup.cfg's package_data, and Jinja2 is a dependency."""
    import configparser
    import fnmatch

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(os.path.dirname(__file__), "..", "setup.cfg"))
    globs = cfg["options.package_data"]["deconvis"].replace(",", " ").split()
    root = os.path.join(os.path.dirname(report.__file__), "..")
    tdir = os.path.join(root, "render", "templates")
    names = sorted(os.listdir(tdir))
    assert names and all(any(fnmatch.fnmatch("render/templates/" + n, g) for g in globs) for n in names), (names, globs)
    assert any(r.lower().startswith("jinja2") for r in cfg["options"]["install_requires"].split())


def _loaded(page, selector):
    """Wait until every image matching ``selector`` has loaded or failed (eagerly, lazy ones too);
    the number that failed (naturalWidth 0)."""
    return page.evaluate("""sel => Promise.all([...document.querySelectorAll(sel)].map(i => {
        i.loading = 'eager'; return i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; }); }))
        .then(() => [...document.querySelectorAll(sel)].filter(i => !i.naturalWidth).length)""", selector)


def test_report_in_headless_chromium_loads_switches_tabs_and_enlarges_tiles(run_out, page):
    """The page as a user sees it: it loads without console errors, its script built the first
    layer's channels, a click on a tab shows that layer, a click on a tile opens the enlarged
    view of that winner, the arrow keys step through the ranks, Escape and a click close it, and a
    link to ``#label`` opens that layer's tab."""
    from playwright.sync_api import expect

    url = "file://" + os.path.abspath(run_out.report)
    page.goto(url)
    layers = run_out.results.layers
    expect(page.locator("body")).not_to_have_class("nojs")
    expect(page.locator("nav button")).to_have_text([lr.label for lr in layers])
    first = layers[0]
    expect(page.locator("nav button.active")).to_have_text(first.label)
    expect(page.locator("section.layer.active .ch")).to_have_count(first.channels)
    # tabs switch on a real click
    second = layers[1]
    page.locator("nav button").nth(1).click()
    expect(page.locator("nav button.active")).to_have_text(second.label)
    expect(page.locator("section.layer.active")).to_have_id("L1")
    assert page.evaluate("location.hash") == "#" + second.label
    n_tiles = second.channels * len(second.units[0].winners) * 2
    expect(page.locator("section.layer.active .t[title]")).to_have_count(n_tiles)
    # every tile image of the open tab loaded (no broken links), and only the open tab is shown
    assert _loaded(page, "section.layer.active .t img") == 0
    expect(page.locator("section.layer:not(.active)").first).to_be_hidden()
    # each tile is the window of its cell in the channel's sprite: rank r in column r, rec above img
    h, wd = second.cell
    k = len(second.units[0].winners)
    assert page.evaluate("document.querySelector('section.layer.active .t img').naturalWidth") == k * wd
    unit = second.units[1]
    w = unit.winners[2]
    s = 64 / max(h, wd)
    boxes = page.evaluate(f"[...document.querySelectorAll('#L1c{unit.channel} .t')].map(t=>{{const i=t.querySelector('img');"
                          "const a=t.getBoundingClientRect(), b=i.getBoundingClientRect();"
                          "return [i.getAttribute('src'), b.left-a.left, b.top-a.top, a.width, a.height];})")
    for n, (src, dx, dy, tw, th) in enumerate(boxes):  # k rec tiles, then k img tiles
        row, rank = divmod(n, k)
        assert src == unit.sprite and (dx, dy) == pytest.approx((-rank * wd * s, -row * h * s), abs=0.6), n
        assert (tw, th) == pytest.approx((round(wd * s), round(h * s)), abs=0.6)

    def big_offset():
        """The enlarged patch's offset inside its frame and the frame's width (CSS px)."""
        return page.evaluate("(()=>{const i=document.querySelector('#box img.img'), a=i.parentElement.getBoundingClientRect(),"
                             "b=i.getBoundingClientRect(); return [b.left-a.left, b.top-a.top, a.width];})()")

    # a tile click opens the enlarged view of that winner: its cell of the sprite
    page.locator(f"#L1c{unit.channel} .tiles").first.locator(".t").nth(2).click()
    box = page.locator("#box")
    expect(box).to_have_class("on")
    expect(box).to_be_visible()
    expect(page.locator("#box img.rec")).to_have_attribute("src", unit.sprite)
    dx, dy, fw = big_offset()
    assert dx == pytest.approx(-2 * fw, abs=1.0) and dy == pytest.approx(-h * fw / wd, abs=1.0)
    text = page.locator("#box p").text_content()
    assert f"channel {unit.channel}  rank 3 of" in text and f"image #{w.image}" in text
    assert _loaded(page, "#box img") == 0
    # arrows step to the previous and next rank (not past the last), Escape closes
    assert len(unit.winners) == 3
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#box p")).to_contain_text(f"channel {unit.channel}  rank 2 of")
    assert big_offset()[0] == pytest.approx(-1 * fw, abs=1.0)
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#box p")).to_contain_text(f"channel {unit.channel}  rank 3 of")
    assert big_offset()[0] == pytest.approx(-2 * fw, abs=1.0)
    page.keyboard.press("Escape")
    expect(box).not_to_have_class("on")
    # reopen; a click on the view closes it
    page.locator(f"#L1c{unit.channel} .tiles").first.locator(".t").nth(2).click()
    expect(box).to_have_class("on")
    box.click()
    expect(box).not_to_have_class("on")
    expect(box).to_be_hidden()
    # a deep link opens its tab (on loading: the page does not follow later hash changes)
    third = layers[2]
    page.goto("about:blank")
    page.goto(url + "#" + third.label)
    expect(page.locator("nav button.active")).to_have_text(third.label)
    expect(page.locator("section.layer.active .ch")).to_have_count(third.channels)
    assert page.errors.lines == []


def test_report_with_analyses_in_headless_chromium(tmp_path, page):
    """With --analyses, each analysis is a tab after the layers: a click shows its section with
    the figure (loaded) and the key-number table; no console errors."""
    from playwright.sync_api import expect

    out = pipeline.run(fx.tiny_config(tmp_path, analyses=["diagnose", "correspondence"]))
    page.goto("file://" + os.path.abspath(out.report))
    labels = [lr.label for lr in out.results.layers]
    expect(page.locator("nav button")).to_have_text(labels + ["diagnose", "correspondence"])
    page.locator("nav button").nth(len(labels)).click()
    expect(page.locator("section.analysis.active")).to_have_id("A-diagnose")
    assert page.evaluate("location.hash") == "#diagnose"
    expect(page.locator("section.layer.active")).to_have_count(0)
    assert _loaded(page, "section.analysis.active img.fig") == 0
    assert page.locator("section.analysis.active img.fig").evaluate("i => i.naturalWidth") > 100
    expect(page.locator("section.analysis.active img.fig")).to_be_visible()
    rows = out.results.analyses["diagnose"].rows
    expect(page.locator("section.analysis.active table.keys tr")).to_have_count(len(rows) + 1)
    page.locator("nav button").nth(len(labels) + 1).click()
    expect(page.locator("section.analysis.active")).to_contain_text("Skipped")
    page.locator("nav button").nth(1).click()  # back to a layer: its channels are built
    expect(page.locator("section.layer.active .ch")).to_have_count(out.results.layers[1].channels)
    assert page.errors.lines == []


def test_page_errors_are_collected(page, tmp_path):
    """The error collector the report tests rely on sees a broken image, a console error and an
    uncaught exception (so ``errors == []`` above means something)."""
    html_path = tmp_path / "broken.html"
    html_path.write_text("<img src='missing.png'><script>console.error('boom'); null.x;</script>")
    page.goto("file://" + str(html_path))
    page.wait_for_load_state("load")
    text = "\n".join(page.errors.lines)
    assert "missing.png" in text and "console: boom" in text and "exception:" in text


def test_page_environment_looks_up_fields_as_jinja_does():
    """The pages' environment reads ``d.name`` of a plain dict as the item directly: the same text
    as Jinja's own environment for items, a key that shadows a dict method (``d.items`` stays the
    method), attributes of objects and dict subclasses, nested fields; a missing field still fails."""
    import types

    import jinja2

    from deconvis.render.pages import environment

    class Sub(dict):
        label = "attr"

    src = ("{{ d.a }} {{ d.b.c }} {% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %} "
           "{{ d.keys is callable }} {{ o.x }} {{ s.label }} {{ s.n }} {{ d.__class__.__name__ }}")
    ctx = dict(d={"a": 1, "b": {"c": "<x>"}, "items": "shadow", "keys": 5},
               o=types.SimpleNamespace(x=2.5), s=Sub(n=3, label="item"))
    plain = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    ours = environment()
    assert ours.from_string(src).render(**ctx) == plain.from_string(src).render(**ctx)
    assert ours.from_string("{{ d.items is callable }}").render(d={"items": 1}) == "True"  # the method
    with pytest.raises(jinja2.UndefinedError):
        ours.from_string("{{ d.missing }}").render(d={"a": 1})
