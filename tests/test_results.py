"""results.json schema: round trip, version check, malformed files."""
from __future__ import annotations

import json

import pytest

from deconvis.runs import results as R
from deconvis.errors import DeconvisError


def _sample() -> R.Results:
    w0 = R.Winner(rank=0, image=4, source="a/b.png", activation=2.5, y=1, x=2, box=[-1, 6, 0, 7],
                  box_clipped=[0, 6, 0, 7], tiles={"rec": "tiles/conv1/c0000_0_rec.png",
                                                   "img": "tiles/conv1/c0000_0_img.png"})
    w1 = R.Winner(rank=1, image=0, source="c.png", activation=1.0, y=0, x=0)
    lr = R.LayerResult(name="features.1", label="conv1", channels=1, channels_total=64, map_size=[55, 55],
                       rf=[7, 7], units=[R.ChannelResult(channel=0, winners=[w0, w1])])
    return R.Results(config={"k": 2}, mining_hash="m", projection_hash="p", model={"spec": "x"},
                     preprocess={"resize": 8}, input_size=[8, 8], rule="deconvnet",
                     images={"count": 5, "items": {"4": {"name": "a/b.png", "path": "/x/a/b.png"}}},
                     layers=[lr], stats={"images": 5})


def test_roundtrip(tmp_path):
    res = _sample()
    R.save(res, str(tmp_path))
    back = R.load(str(tmp_path))
    assert back == res
    d = json.loads((tmp_path / "results.json").read_text())
    assert list(d)[:4] == ["schema", "version", "created", "status"]
    assert d["layers"][0]["units"][0]["winners"][1]["box"] is None
    assert back.layer("conv1") is back.layers[0] and back.layer("features.1") is back.layers[0]


def test_version_and_schema_checks(tmp_path):
    d = _sample().to_dict()
    for bad, match in [({**d, "version": 99}, "version 99"), ({**d, "schema": "x"}, "not a deconvis results"),
                       ({**d, "layers": [{"name": "x"}]}, "malformed")]:
        (tmp_path / "results.json").write_text(json.dumps(bad))
        with pytest.raises(DeconvisError, match=match):
            R.load(str(tmp_path))
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(DeconvisError, match="cannot read"):
        R.load(str(tmp_path))
    with pytest.raises(DeconvisError, match="does not exist"):
        R.load(str(tmp_path / "nowhere"))
