"""index.html: self-contained, links resolve, hostile names escaped, renders in headless Chromium."""
from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess

import cv2
import pytest

import pipeline_fixtures as fx
from deconvis.runs import pipeline
from deconvis.render import report
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
        assert len(L["units"]) == lr.channels
        for u in L["units"]:
            for w in u["w"]:
                for kind in ("rec", "img"):
                    assert os.path.isfile(os.path.join(run_out.run_dir, w[kind]))
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


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
def test_report_renders_in_headless_chromium(run_out, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium/chrome on PATH (apt-get install chromium)")
    url = "file://" + os.path.abspath(run_out.report) + "#conv2"
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
              "--window-size=1200,900"]
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the script built conv2's channel blocks (chosen by the #conv2 anchor): 5 channels x 3 x 2 tiles
    conv2 = next(lr for lr in run_out.results.layers if lr.label == "conv2")
    assert dom.stdout.count('class="ch"') == conv2.channels
    assert len(re.findall(r'<div class="t"[^>]*title=', dom.stdout)) == conv2.channels * 3 * 2
    assert 'class="active">conv2<' in dom.stdout and "nojs" not in dom.stdout.split("<body")[1][:40]
    shot = tmp_path / "shot.png"
    r = subprocess.run(common + [f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (900, 1200) and img.std() > 20  # not a blank page
