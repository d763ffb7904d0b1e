"""Unit pages (units/<layer>/<channel>.html): one per mined channel, linked from the report; each
shows the top-k from the sprite, the winners' thumbnails with the RF box, the bottom-k (the most
negative pre-activations) the same way, the histogram of the maximum over the image set, the
firing share, the classes with the highest mean response (the run's images are an ImageFolder
tree) and the most correlated channels; every link resolves; names are escaped; pages of a run
without unit statistics still render."""
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


CLASSES = ("apple", "<b>pear", "plum")


@pytest.fixture(scope="module")
def run_out(tmp_path_factory):
    """The tiny pipeline run over the fixture images sorted into three class folders."""
    tmp = tmp_path_factory.mktemp("units")
    flat = tmp / "flat"
    fx.write_images(str(flat))
    for i, name in enumerate(sorted(os.listdir(flat))):
        os.makedirs(tmp / "imgs" / CLASSES[i % 3], exist_ok=True)
        os.rename(flat / name, tmp / "imgs" / CLASSES[i % 3] / name)
    return pipeline.run(fx.tiny_config(tmp, per_sheet=3, unit_erf=True))


def _parse(run_dir, label, channel):
    path = os.path.join(run_dir, unit_pages.unit_page(label, channel))
    p = _Page()
    text = open(path, encoding="utf-8").read()
    p.feed(text)
    return path, p, text


def test_every_channel_has_a_page_whose_links_resolve_and_numbers_match_the_mining(run_out):
    res = R.load(run_out.run_dir)
    assert res.version == R.VERSION == 4
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
            low = lr.bottom.units[ci]  # every layer of the tiny net is a ReLU: each has a bottom-k
            assert recs == ["../../" + u.sprite] * len(u.winners) + ["../../" + low.sprite] * len(low.winners)
            assert thumbs == [f"../../units/thumbs/{w.image}.jpg" for w in u.winners + low.winners]
            assert text.count('class="rfbox"') == len(u.winners) + len(low.winners)
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
    ws = u.winners + lr.bottom.units[0].winners  # the top-k, then the bottom-k
    assert len(styles) == len(ws)
    for w, (t, h, l, wd) in zip(ws, styles):
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
    imgs = page.locator("main img")
    # top-k, bottom-k, and the RF + ERF image (unit_erf on in this run)
    assert imgs.count() == 3 * (len(lr.units[2].winners) + len(lr.bottom.units[2].winners)) + 1
    expect(page.locator("#bottom h2")).to_contain_text("Bottom-3")
    expect(page.locator("#classes tr")).to_have_count(1 + 3)  # the header, three classes
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


def test_bottom_k_section_shows_the_minima_of_the_preactivation(run_out):
    """Each page's bottom-k block lists the mined minima of the ReLU's input row, most negative
    first, from the bottom sprite (its own folder), after the top-k; results.json holds them and
    the replay check covered them (recomputed at the pre-activation row)."""
    res = R.load(run_out.run_dir)
    n_top = sum(len(u.winners) for lr in res.layers for u in lr.units)
    n_low = sum(len(u.winners) for lr in res.layers for u in lr.bottom.units)
    assert n_low == n_top and res.stats["replay"]["checked"] == n_top + n_low
    assert res.stats["replay"]["mismatches"] == 0
    for lr in res.layers:
        low = lr.bottom
        assert low.label == lr.label + "-bottom" and low.name != lr.name and low.cell == lr.cell
        for ci, u in enumerate(lr.units):
            lu = low.units[ci]
            vals = [w.activation for w in lu.winners]
            assert vals == sorted(vals) and len(vals) == R.bottom_k(res)
            assert lu.sprite == f"tiles/{lr.label}-bottom/c{u.channel:04d}.png"
            _, p, text = _parse(run_out.run_dir, lr.label, u.channel)
            top, bottom = text.split('id="bottom"')
            assert 'id="top"' in top and f"before rectification ({low.name})" in bottom
            shown = re.findall(r"<span>#\d+ &middot; ([^ ]+) &middot; \((\d+), (\d+)\)</span>", bottom.split('id="classes"')[0])
            assert shown == [(f"{w.activation:.4g}", str(w.y), str(w.x)) for w in lu.winners]


def test_class_table_lists_the_top_classes_by_mean_maximum(run_out):
    """The classes table is the five (here three) classes with the highest mean of the channel's
    maximum over their images, recomputed here from the sprite-free brute force: each image's
    maximum by a forward of the model, averaged per class folder; names escaped."""
    import html as html_mod

    res = R.load(run_out.run_dir)
    assert res.images["classes"] == sorted(CLASSES)
    from deconvis.io.images import ImageDataset
    from deconvis.runs.config import load_config
    from deconvis.runs.distributed import DistInfo
    from deconvis.runs.phases.prepare import prepare

    ctx = prepare(load_config(None, {k: v for k, v in res.config.items() if k not in ("render_only", "fresh")}),
                  run_out.run_dir, None, DistInfo())
    src = ctx.source
    names, labels = src.labels()
    ds = ImageDataset(src, ctx.preprocess)
    x = torch.stack([ds[i][0] for i in range(len(src))])
    acts = ctx.dn.activations(x, ctx.layers)
    for lr in res.layers:
        mx = acts[lr.name].double().flatten(2).amax(2)  # [N, C]
        for ci in (0, len(lr.units) - 1):
            means = {j: float(mx[[i for i in range(len(src)) if labels[i] == j], ci].mean()) for j in range(3)}
            order = sorted(means, key=lambda j: (-means[j], j))
            assert [r[0] for r in lr.class_means[ci]] == order
            assert [r[1] for r in lr.class_means[ci]] == pytest.approx([means[j] for j in order], rel=1e-5)
            _, _, text = _parse(run_out.run_dir, lr.label, lr.units[ci].channel)
            table = text.split('id="classes"')[1].split("</table>")[0]
            rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(\d+)</td></tr>", table)
            assert [html_mod.unescape(r[0]) for r in rows] == [names[j] for j in order]
            assert [int(r[2]) for r in rows] == [labels.count(j) for j in order]
            assert "<b>pear" not in table


@pytest.mark.parametrize("version", [2, 3])
def test_a_version_2_or_3_run_still_opens_and_re_renders(run_out, tmp_path, version):
    """The run's results.json written as an older version would have it (no bottom-k, no class
    means; version 2 also no unit statistics) re-renders with --render-only: its pages show the
    top-k without the new sections, and the file stays at its version."""
    import json
    import shutil

    from deconvis.runs.config import load_config

    run_dir = tmp_path / "out" / "old"
    shutil.copytree(run_out.run_dir, run_dir, ignore=shutil.ignore_patterns("units", "*-bottom"))
    d = json.loads((run_dir / "results.json").read_text())
    d["version"] = version
    d["images"].pop("classes")
    d["config"].pop("bottom_k")
    for layer in d["layers"]:
        del layer["bottom"], layer["class_means"]
        if version == 2:
            del layer["unit_stats"]
    (run_dir / "results.json").write_text(json.dumps(d))
    over = {k: v for k, v in d["config"].items() if k not in ("render_only", "fresh")}
    out = pipeline.run(load_config(None, {**over, "out": str(tmp_path / "out"), "run": "old", "render_only": True}))
    assert out.results.version == version and all(lr.bottom is None for lr in out.results.layers)
    assert json.loads((run_dir / "results.json").read_text())["version"] == version
    lr = out.results.layers[0]
    path, p, text = _parse(str(run_dir), lr.label, lr.units[0].channel)
    assert [r for t, c, r in p.refs if c == "rec"] == ["../../" + lr.units[0].sprite] * len(lr.units[0].winners)
    assert 'id="bottom"' not in text and 'id="classes"' not in text and ('id="dist"' in text) == (version == 3)


def test_pages_share_one_stylesheet_holding_the_base_and_unit_rules(run_out):
    """No page inlines the CSS (a third of its bytes): each links ``units/unit.css``, which holds
    the shared base rules, the unit page's own and the extras', with the tile size."""
    from deconvis.render.pages import environment

    css = open(os.path.join(run_out.run_dir, unit_pages.UNIT_CSS), encoding="utf-8").read()
    base = environment().get_template("base.css").render()
    assert base.strip() in css and f"--tile:{unit_pages.UNIT_TILE_PX}px" in css
    assert ".rfbox{" in css and "svg.hist rect" in css and ".legend" in css  # unit.html's and unit_extras.css's
    res = R.load(run_out.run_dir)
    for lr in res.layers:
        path, p, text = _parse(run_out.run_dir, lr.label, lr.units[0].channel)
        assert "<style" not in text
        assert [r for t, _, r in p.refs if t == "link"] == ["../unit.css"]


def test_thumbnails_come_from_the_projections_decode(tmp_path, monkeypatch):
    """The projection writes every winner's thumbnail (top-k and bottom-k) from the image it
    decodes anyway: the report phase decodes none, and a thumbnail is the displayed image
    area-resized to THUMB_PX (within JPEG's error)."""
    import cv2

    from deconvis.io.images import FolderImages, preprocess_image

    monkeypatch.setattr(unit_pages, "preprocess_image", lambda *a, **k: pytest.fail("decoded again for a thumbnail"))
    cfg = fx.tiny_config(tmp_path)
    res = pipeline.run(cfg).results
    ids = {w.image for lr in res.layers for layer in (lr, lr.bottom) if layer is not None
           for u in layer.units for w in u.winners}
    folder = os.path.join(cfg.out, cfg.run, unit_pages.THUMBS_DIR)
    assert sorted(os.listdir(folder)) == sorted(f"{i}.jpg" for i in ids)
    i = min(ids)
    shown = preprocess_image(FolderImages(cfg.images).load(i), res.preprocess)
    want = cv2.resize(shown, (unit_pages.THUMB_PX, unit_pages.THUMB_PX), interpolation=cv2.INTER_AREA)
    got = cv2.imread(os.path.join(folder, f"{i}.jpg"), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).mean() < 3  # blocky 5x: JPEG ~2


def test_a_failing_thumbnail_write_fails_the_run(tmp_path, monkeypatch):
    """The thumbnails are written on a thread of their own: an error there reaches the caller
    (the projection ends with it), even on the last thumbnail (no later write to report it), and
    no thumbnail is half-written."""
    real = unit_pages.write_thumb
    calls = []

    def counting(run_dir, image, shown):
        calls.append(image)
        real(run_dir, image, shown)

    monkeypatch.setattr(unit_pages, "write_thumb", counting)
    pipeline.run(fx.tiny_config(tmp_path, run="clean"))
    last = len(calls)
    calls.clear()

    def flaky(run_dir, image, shown):
        calls.append(image)
        if len(calls) == last:
            raise OSError("disk full (planted)")
        real(run_dir, image, shown)

    monkeypatch.setattr(unit_pages, "write_thumb", flaky)
    cfg = fx.tiny_config(tmp_path, run="flaky")
    with pytest.raises(OSError, match="planted"):
        pipeline.run(cfg)
    assert len(calls) == last
    folder = os.path.join(cfg.out, cfg.run, unit_pages.THUMBS_DIR)
    names = os.listdir(folder)
    assert names and all(re.fullmatch(r"\d+\.jpg", f) for f in names)  # no temporary file left
