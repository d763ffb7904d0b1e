"""results.json schema: round trip, version check, malformed files."""
from __future__ import annotations

import json

import pytest

from deconvis.runs import results as R
from deconvis.errors import DeconvisError


def _sample(legacy_tiles: bool = True) -> R.Results:
    w0 = R.Winner(rank=0, image=4, source="a/b.png", activation=2.5, y=1, x=2, box=[-1, 6, 0, 7],
                  box_clipped=[0, 6, 0, 7], tiles={"rec": "tiles/conv1/c0000_0_rec.png",
                                                   "img": "tiles/conv1/c0000_0_img.png"} if legacy_tiles else None)
    w1 = R.Winner(rank=1, image=0, source="c.png", activation=1.0, y=0, x=0)
    w2 = R.Winner(rank=0, image=4, source="a/b.png", activation=-0.5, y=0, x=1, box=[0, 7, 1, 8],
                  box_clipped=[0, 7, 1, 8])
    lr = R.LayerResult(name="features.1", label="conv1", channels=2, channels_total=64, map_size=[55, 55],
                       rf=[7, 7], cell=[7, 7], units=[R.ChannelResult(channel=0, winners=[w0, w1]),
                                                      R.ChannelResult(channel=3, winners=[w2],
                                                                      sprite="tiles/conv1/c0003.png")])
    return R.Results(config={"k": 2}, mining_hash="m", projection_hash="p", model={"spec": "x"},
                     preprocess={"resize": 8}, input_size=[8, 8], rule="deconvnet",
                     images={"count": 5, "items": {"4": {"name": "a/b.png", "path": "/x/a/b.png"}}},
                     layers=[lr], stats={"images": 5})


@pytest.mark.parametrize("legacy_tiles", [False, True])
def test_roundtrip(tmp_path, legacy_tiles):
    res = _sample(legacy_tiles)
    R.save(res, str(tmp_path))
    back = R.load(str(tmp_path))
    assert back == res
    text = (tmp_path / "results.json").read_text()
    d = json.loads(text)
    assert list(d)[:4] == ["schema", "version", "created", "status"] and d["version"] == R.VERSION == 4
    cols = d["layers"][0]["units"]  # columns: per channel, per winner
    assert cols["channel"] == [0, 3] and cols["image"] == [[4, 0], [4]] and cols["box"][0][1] is None
    assert cols["sprite"] == [None, "tiles/conv1/c0003.png"] and d["layers"][0]["cell"] == [7, 7]
    assert ("tiles" in cols) == legacy_tiles  # only a resumed version-1 run has per-winner tile files
    assert "source" in cols  # c.png is not among images.items: kept per winner
    assert d["sprites"]["rows"] == ["rec", "img"]
    assert any(line.startswith('  {"name":"features.1"') for line in text.splitlines())  # one line per layer
    assert back.layer("conv1") is back.layers[0] and back.layer("features.1") is back.layers[0]


def test_version_1_is_read_and_written_back_as_version_1(tmp_path):
    res = _sample()
    res.version = 1
    R.save(res, str(tmp_path))
    d = json.loads((tmp_path / "results.json").read_text())
    assert d["version"] == 1 and "sprites" not in d
    assert d["layers"][0]["units"][0]["winners"][0]["tiles"]["rec"] == "tiles/conv1/c0000_0_rec.png"
    back = R.load(str(tmp_path))
    assert back.version == 1 and back.layers[0].units[0].winners == res.layers[0].units[0].winners


def test_non_finite_activation_is_null_in_the_file(tmp_path):
    res = _sample()
    res.layers[0].units[0].winners[1].activation = float("inf")
    R.save(res, str(tmp_path))
    d = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert d["layers"][0]["units"]["activation"][0] == [2.5, None]


def test_version_and_schema_checks(tmp_path):
    d = _sample().to_dict()
    for bad, match in [({**d, "version": 99}, "version 99"), ({**d, "schema": "x"}, "not a deconvis results"),
                       ({**d, "layers": [{"name": "x"}]}, "malformed"),
                       ({**d, "layers": [{**d["layers"][0], "units": {**d["layers"][0]["units"], "x": [[0]]}}]},
                        "malformed")]:
        (tmp_path / "results.json").write_text(json.dumps(bad))
        with pytest.raises(DeconvisError, match=match):
            R.load(str(tmp_path))
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(DeconvisError, match="cannot read"):
        R.load(str(tmp_path))
    with pytest.raises(DeconvisError, match="does not exist"):
        R.load(str(tmp_path / "nowhere"))


def test_version_4_bottom_k_and_class_means_round_trip(tmp_path):
    """The bottom-k (a layer of the pre-activation row, in the same columns) and the class means
    come back as written; a layer without them writes neither key."""
    res = _sample(False)
    low = R.Winner(rank=0, image=4, source="a/b.png", activation=-3.25, y=2, x=0, box=[0, 7, -3, 4],
                   box_clipped=[0, 7, 0, 4])
    res.layers[0].bottom = R.LayerResult(name="features.0", label="conv1-bottom", channels=2, channels_total=64,
                                         map_size=[55, 55], rf=[7, 7], cell=[7, 7],
                                         units=[R.ChannelResult(channel=0, winners=[low], sprite="tiles/conv1-bottom/c0000.png"),
                                                R.ChannelResult(channel=3, winners=[])])
    res.layers[0].class_means = [[[1, 2.5, 3], [0, 1.0, 2]], []]
    res.images["classes"] = ["cat", "dog"]
    res.config["bottom_k"] = 1
    R.save(res, str(tmp_path))
    d = json.loads((tmp_path / "results.json").read_text())
    layer = d["layers"][0]
    assert layer["bottom"]["name"] == "features.0" and layer["bottom"]["units"]["activation"] == [[-3.25], []]
    assert layer["class_means"] == [[[1, 2.5, 3], [0, 1.0, 2]], []] and d["images"]["classes"] == ["cat", "dog"]
    back = R.load(str(tmp_path))
    assert back == res and back.layers[0].bottom.units[0].winners == [low] and R.bottom_k(back) == 1
    res.layers[0].bottom = res.layers[0].class_means = None
    R.save(res, str(tmp_path))
    layer = json.loads((tmp_path / "results.json").read_text())["layers"][0]
    assert "bottom" not in layer and "class_means" not in layer
