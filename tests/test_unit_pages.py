"""Unit pages (units/<layer>/<channel>.html): one per mined channel, linked from the report; each
shows the top-k from the sprite, the winners' thumbnails with the RF box, the histogram of the
maximum over the image set, the firing share and the most correlated channels; every link
resolves; names are escaped; pages of a run without unit statistics still render."""
from __future__ import annotations

import html.parser
import os
import re

import numpy as np
import pytest
import torch

import pipeline_fixtures as fx
from deconvis.runs import pipeline
from deconvis.runs import results as R
from deconvis.runs import unit_pages


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.classes, self.rects, self.fired = [], [], [], None
        self._fired = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("href", "src"):
            if a.get(key):
                self.refs.append((tag, a.get("class"), a[key]))
        if tag == "rect":
            self.rects.append(a)
        if tag == "b" and a.get("class") == "fired":
            self._fired = True

    def handle_data(self, data):
        if self._fired:
            self.fired, self._fired = data, False


@pytest.fixture(scope="module")
def run_out(tmp_path_factory):
    return pipeline.run(fx.tiny_config(tmp_path_factory.mktemp("units"), per_sheet=3, unit_erf=True))


def _parse(run_dir, label, channel):
    path = os.path.join(run_dir, unit_pages.unit_page(label, channel))
    p = _Page()
    text = open(path, encoding="utf-8").read()
    p.feed(text)
    return path, p, text


def test_every_channel_has_a_page_whose_links_resolve_and_numbers_match_the_mining(run_out):
    res = R.load(run_out.run_dir)
    assert res.version == 3
    n_img = res.images["readable"]
    for lr in res.layers:
        st = lr.unit_stats
        assert st is not None and st["images"] == n_img
        for ci, u in enumerate(lr.units):
            path, p, text = _parse(run_out.run_dir, lr.label, u.channel)
            here = os.path.dirname(path)
            for tag, cls, ref in p.refs:
                if ref.startswith("data:image/png;base64,"):  # the layer-1 filter, inline
                    continue
                target = ref.split("#")[0]
                assert not os.path.isabs(target) and os.path.isfile(os.path.normpath(os.path.join(here, target))), ref
            recs = [r for t, c, r in p.refs if c == "rec"]
            thumbs = [r for t, c, r in p.refs if t == "img" and "thumbs/" in r]
            assert recs == ["../../" + u.sprite] * len(u.winners)
            assert thumbs == [f"../../units/thumbs/{w.image}.jpg" for w in u.winners]
            assert text.count('class="rfbox"') == len(u.winners)
            assert "../../index.html#" + lr.label in [r for _, _, r in p.refs]
            # the histogram's bars hold every image, its firing share is the stats'
            bars = re.findall(r"<title>\[[^\]<]*\): (\d+)</title>", text)
            assert sum(map(int, bars)) == n_img and len(p.rects) == len(bars) > 0
            assert p.fired == f"{100 * st['fired'][ci]:.1f} %"
            corr = [r for t, c, r in p.refs if t == "a" and r.startswith("../../units/") and r.endswith(".html")]
            assert corr == ["../../" + unit_pages.unit_page(lr.label, j) for j, _ in st["correlated"][ci]]
    # the unit's highest maximum over the set is its top winner's activation: the last nonempty bin holds it
    lr = res.layers[0]
    for ci, u in enumerate(lr.units):
        first, counts = lr.unit_stats["hist"][ci]
        b = first + len(counts) - 1
        edges = lr.unit_stats["edges"]
        assert (edges[b - 1] if b else -np.inf) <= u.winners[0].activation < (edges[b] if b < len(edges) else np.inf)


def test_rf_box_on_the_thumbnail_is_the_winners_clipped_box(run_out):
    res = R.load(run_out.run_dir)
    lr = res.layers[1]
    u = lr.units[0]
    _, _, text = _parse(run_out.run_dir, lr.label, u.channel)
    H, W = res.input_size
    styles = re.findall(r'class="rfbox" style="top:([\d.]+)%;height:([\d.]+)%;left:([\d.]+)%;width:([\d.]+)%"', text)
    assert len(styles) == len(u.winners)
    for w, (t, h, l, wd) in zip(u.winners, styles):
        y0, y1, x0, x1 = w.box_clipped
        assert [float(t), float(h), float(l), float(wd)] == pytest.approx(
            [100 * y0 / H, 100 * (y1 - y0) / H, 100 * x0 / W, 100 * (x1 - x0) / W], abs=0.006)


def test_hostile_source_names_are_escaped_and_runs_without_stats_still_render(tmp_path):
    evil = "<script>alert(1)</script>.png"
    w = R.Winner(rank=0, image=0, source=evil, activation=1.0, y=0, x=0, box=[0, 4, 0, 4], box_clipped=[0, 4, 0, 4])
    lr = R.LayerResult(name="c", label="c", channels=1, channels_total=1, map_size=[1, 1], rf=[4, 4], cell=[4, 4],
                       units=[R.ChannelResult(channel=0, winners=[w], sprite="tiles/c/c0000.png")])
    res = R.Results(config={"k": 1, "run": evil}, mining_hash="", projection_hash="", model={"spec": evil},
                    preprocess={}, input_size=[8, 8], rule="deconvnet", images={"spec": evil, "count": 1}, layers=[lr])
    assert unit_pages.write_unit_pages(res, str(tmp_path)) == 1
    text = open(tmp_path / "units" / "c" / "0000.html", encoding="utf-8").read()
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;.png" in text
    assert 'id="dist"' not in text and 'class="rec"' in text  # no unit_stats (a version-2 run): no histogram


def test_report_links_to_unit_pages_and_a_page_loads_in_chromium(run_out, page):
    from playwright.sync_api import expect

    page.goto("file://" + os.path.abspath(run_out.report) + "#conv2")
    lr = run_out.results.layers[1]
    link = page.locator(f"#L1c{lr.units[2].channel} h3 a.unit")
    expect(link).to_have_attribute("href", unit_pages.unit_page(lr.label, lr.units[2].channel))
    link.click()
    expect(page.locator("header h1")).to_contain_text(f"{lr.label} channel {lr.units[2].channel}")
    imgs = page.locator("#top img")
    assert imgs.count() == 3 * len(lr.units[2].winners)
    # the RF + ERF image (unit_erf is on by default) and its legend
    expect(page.locator("#erf img.erf")).to_have_count(1)
    expect(page.locator("#erf .legend")).to_contain_text("theoretical RF")
    assert page.evaluate("Promise.all([...document.images].map(i=>{i.loading='eager';return i.complete?0:"
                         "new Promise(r=>{i.onload=i.onerror=r;});})).then(()=>[...document.images]"
                         ".filter(i=>!i.naturalWidth).length)") == 0
    # the RF box lies inside its thumbnail
    box = page.locator(".thumb").first.bounding_box()
    rf = page.locator(".rfbox").first.bounding_box()
    assert box["x"] - 2 <= rf["x"] and rf["x"] + rf["width"] <= box["x"] + box["width"] + 2
    page.locator("a[rel=next]").click()
    expect(page.locator("header h1")).to_contain_text(f"channel {lr.units[3].channel}")
    assert page.errors.lines == []


def test_layer_one_filter_is_the_first_convs_weights_on_conv1_pages_only(run_out):
    """The filter images are the first conv's weights stretched symmetrically about 0 (grey);
    only the layer whose channels and RF are that conv's gets them (the run's conv1)."""
    import base64
    from types import SimpleNamespace

    import cv2

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3))
    specs = [SimpleNamespace(name="1", channels_total=4, channels=4, rf_size=(3, 3)),
             SimpleNamespace(name="2", channels_total=2, channels=2, rf_size=(5, 5))]
    f = unit_pages.first_layer_filters(net, specs)
    assert list(f) == ["1"] and f["1"].shape == (4, 3, 3, 3)
    w = net[0].weight.detach().double()
    for c in range(4):
        want = (w[c] / w[c].abs().max() * 127.5 + 127.5).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(f["1"][c], want, atol=0.51)
    res = R.load(run_out.run_dir)
    for lr in res.layers:
        _, p, _ = _parse(run_out.run_dir, lr.label, lr.units[1].channel)
        uris = [r for t, c, r in p.refs if c == "filter"]
        assert len(uris) == (lr.label == "conv1"), lr.label
        for uri in uris:
            png = np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8)
            got = cv2.imdecode(png, cv2.IMREAD_COLOR)
            assert got.shape == (*tuple(lr.rf), 3) and np.abs(got.astype(float) - 127.5).max() == pytest.approx(127.5, abs=0.5)
