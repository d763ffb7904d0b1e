"""The explorer's JSON API (Starlette TestClient, no server): on a tiny run in float64, its image
list and layers are the run's, a layer's sheet holds every channel of the model's own forward,
a unit's three projections equal the autograd oracle and its RF box the theoretical one, every
bad input is a JSON error with a 4xx status, nothing outside the run folder is served, and the
uploads folder is gone after shutdown."""
from __future__ import annotations

import base64
import os
import sys

import cv2
import numpy as np
import pytest
import torch

import pipeline_fixtures as fx
from autograd_oracle import oracle_project
from deconvis import cli
from deconvis.errors import DeconvisError
from deconvis.explore import server
from deconvis.explore.server import ExploreConfig, build_session
from deconvis.io.pixels import normalize, preprocess_image, read_image
from deconvis.render.display import to_uint8
from deconvis.runs import pipeline

pytest.importorskip("starlette", reason="the explorer tests need the test extra: pip install -e '.[test]'")
from starlette.testclient import TestClient  # noqa: E402

from deconvis.explore.app import make_app  # noqa: E402

RULES = ("deconvnet", "guided", "gradient")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return pipeline.run(fx.tiny_config(tmp_path_factory.mktemp("explore"), per_sheet=3)).run_dir


def _session(run_dir, **over):
    s = build_session(ExploreConfig.from_dict({"run": run_dir, **over}))
    s.loaded.model.double()  # the mirror shares the parameters: the whole session computes in float64
    return s


@pytest.fixture(scope="module")
def client(run_dir):
    s = _session(run_dir)
    with TestClient(make_app(s)) as c:
        c.session = s
        yield c


def _png(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return img[:, :, ::-1] if img.ndim == 3 else img


def _uri(text: str) -> np.ndarray:
    assert text.startswith("data:image/png;base64,")
    return _png(base64.b64decode(text.split(",", 1)[1]))


def _input(client, i):
    s = client.session
    shown = preprocess_image(read_image(s.source.path(i)), s.preprocess)
    return shown, normalize(shown, s.preprocess).double()[None]


def test_info_lists_the_run_images_and_layers(client, run_dir):
    from deconvis.runs import results

    res = results.load(run_dir)
    info = client.get("/api/info").json()
    files = sorted(f for f in os.listdir(res.images["spec"]) if f.endswith(".png"))
    assert [im["name"] for im in info["images"]] == files
    assert [im["id"] for im in info["images"]] == [f"r{i}" for i in range(len(files))]
    assert [(l["name"], l["label"], l["channels"], l["map_size"]) for l in info["layers"]] == \
        [(lr.name, lr.label, lr.channels_total, lr.map_size) for lr in res.layers]
    assert info["input_size"] == [fx.SIZE, fx.SIZE] and info["run"] is True
    page = client.get("/")
    assert page.status_code == 200 and 'id="data"' in page.text and "explore.js" not in page.text


def test_displayed_image_is_the_run_preprocessing(client):
    r = client.get("/api/image/r3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert np.array_equal(_png(r.content), _input(client, 3)[0])


def _acts(client, i):
    """{layer: [C, h, w]} of image ``i`` by the model's own forward (hooks, no mirror), float64."""
    model = client.session.loaded.model
    _, x = _input(client, i)
    acts = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.detach()[0]))
             for n in ("1", "4", "7")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return acts


def test_layer_sheet_holds_every_channel_of_the_model_forward(client):
    acts = _acts(client, 5)
    for name in ("1", "4", "7"):
        meta = client.get("/api/maps", params={"image": "r5", "layer": name}).json()
        sheet = _png(client.get("/" + meta["png"]).content)
        a = acts[name]
        c, h, w = a.shape
        assert meta["map_size"] == [h, w] and meta["cols"] == int(np.ceil(np.sqrt(c)))
        scale = float(a.abs().max())
        assert meta["scale"] == pytest.approx(scale, rel=1e-12)
        for ch in range(c):
            r, k = divmod(ch, meta["cols"])
            tile = sheet[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w].astype(int)
            want = np.round(a[ch].numpy() * 255.0 / scale)
            assert np.abs(tile - want).max() <= 1, (name, ch)
            assert meta["max"][ch] == pytest.approx(float(a[ch].max()), rel=1e-12)
            assert a[ch][tuple(meta["argmax"][ch])] == a[ch].max()


def _units(a):
    """Two firing units of [C, h, w]: the strongest of all, and the firing one nearest the
    top-left corner (its box runs past the image)."""
    c, h, w = a.shape
    flat = int(a.argmax())
    first = (flat // (h * w), flat % (h * w) // w, flat % w)
    pos = (a > 0).nonzero().tolist()
    corner = min(pos, key=lambda p: (p[1] + p[2], p[0]))
    return [first, tuple(corner)]


@pytest.mark.parametrize("layer", ["1", "4", "7"])
@pytest.mark.parametrize("which", [0, 1])
def test_unit_projections_equal_the_oracle_and_the_box_the_theory(client, layer, which):
    c, y, x = _units(_acts(client, 7)[layer])[which]
    _, img = _input(client, 7)
    r = client.get("/api/unit", params={"image": "r7", "layer": layer, "channel": c, "y": y, "x": x, "raw": 1})
    assert r.status_code == 200, r.text
    u = r.json()
    box = fx.theoretical_box(client.session.loaded.model, layer, y, x)
    assert u["box"] == box
    assert u["box_clipped"] == [max(box[0], 0), min(box[1], fx.SIZE), max(box[2], 0), min(box[3], fx.SIZE)]
    assert set(u["projections"]) == set(RULES)
    for rule in RULES:
        raw = u["raw"][rule]
        assert raw["dtype"] == "float64"
        rec = torch.from_numpy(np.frombuffer(base64.b64decode(raw["data"]), np.float64).reshape(raw["shape"]).copy())
        y0, y1, x0, x1 = u["window"]
        full = torch.zeros(3, fx.SIZE - min(y0, 0) + max(y1 - fx.SIZE, 0), fx.SIZE - min(x0, 0) + max(x1 - fx.SIZE, 0),
                           dtype=torch.float64)
        oy, ox = -min(y0, 0), -min(x0, 0)
        full[:, oy + y0:oy + y1, ox + x0:ox + x1] = rec
        got = full[:, oy:oy + fx.SIZE, ox:ox + fx.SIZE]
        want = oracle_project(client.session.loaded.model, img, layer, torch.tensor([[0, c, y, x]]), rule)[0]
        assert float(want.abs().max()) > 0
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max())), rule
        assert np.array_equal(_uri(u["projections"][rule]), to_uint8(rec[None])[0])
    acts = client.get("/api/maps", params={"image": "r7", "layer": layer}).json()
    assert u["activation"] <= acts["max"][c]


def test_one_rule_only(client):
    u = client.get("/api/unit", params={"image": "r1", "layer": "conv2", "channel": 1, "y": 3, "x": 3,
                                        "rules": "guided"}).json()
    assert list(u["projections"]) == ["guided"]


def test_channel_gives_the_run_top_k_and_unit_page(client, run_dir):
    from deconvis.runs import results

    lr = results.load(run_dir).layer("conv2")
    r = client.get("/api/channel", params={"layer": "conv2", "channel": 3}).json()
    top = r["top"]
    assert top["sprite"] == "run/" + lr.units[3].sprite and top["page"] == "run/units/conv2/0003.html"
    assert [(w["image"], w["y"], w["x"]) for w in top["winners"]] == [(w.image, w.y, w.x) for w in lr.units[3].winners]
    for url in (top["sprite"], top["page"]):
        got = client.get("/" + url)
        assert got.status_code == 200
        assert got.content == open(os.path.join(run_dir, url[len("run/"):]), "rb").read()


@pytest.mark.parametrize("params,status,words", [
    ({"layer": "conv9"}, 404, "unknown layer 'conv9'"),
    ({"channel": 5}, 400, "channel 5 is outside conv2"),
    ({"channel": -1}, 400, "channel -1 is outside"),
    ({"y": 16}, 400, "unit (16, 2) is outside the 16x16 map"),
    ({"x": -1}, 400, "is outside the 16x16 map"),
    ({"x": "two"}, 400, "x must be an integer"),
    ({"image": "r99"}, 404, "outside the run's set of 12 images"),
    ({"image": "../etc"}, 404, "is not an image id"),
    ({"image": "u7"}, 404, "no upload 'u7'"),
    ({"rules": "lrp"}, 400, "rules 'lrp'"),
])
def test_bad_unit_requests_are_json_errors(client, params, status, words):
    q = {"image": "r0", "layer": "conv2", "channel": 1, "y": 2, "x": 2, **params}
    r = client.get("/api/unit", params=q)
    assert r.status_code == status and words in r.json()["error"], r.text


def test_missing_parameter_and_unknown_route_are_json_errors(client):
    r = client.get("/api/maps", params={"image": "r0"})
    assert r.status_code == 400 and "missing query parameter 'layer'" in r.json()["error"]
    r = client.get("/api/nothing")
    assert r.status_code == 404 and "error" in r.json()


def _png_bytes(h, w):
    ok, buf = cv2.imencode(".png", np.full((h, w, 3), 77, np.uint8))
    return buf.tobytes()


def test_uploads_checked_and_usable(run_dir):
    s = _session(run_dir, max_upload_mb=0.01, max_upload_pixels=900)
    with TestClient(make_app(s)) as c:
        r = c.post("/api/upload", params={"name": "notes.txt"}, content=b"not an image at all")
        assert r.status_code == 415 and "not an image" in r.json()["error"]
        r = c.post("/api/upload", params={"name": "empty.png"}, content=b"")
        assert r.status_code == 415
        r = c.post("/api/upload", params={"name": "big.png"}, content=_png_bytes(31, 30))
        assert r.status_code == 413 and "30x31 = 930 pixels" in r.json()["error"] and "900" in r.json()["error"]
        r = c.post("/api/upload", params={"name": "heavy.bin"}, content=os.urandom(11000))
        assert r.status_code == 413 and "cap of 10485 bytes" in r.json()["error"]
        r = c.post("/api/upload", params={"name": "streamed.bin"}, content=iter([b"x" * 6000] * 2))  # no length
        assert r.status_code == 413 and "is above the cap of 10485 bytes" in r.json()["error"]  # cut while streaming
        r = c.post("/api/upload", params={"name": "../../x.png"}, content=_png_bytes(30, 30))
        assert r.status_code == 200 and r.json() == {"id": "u1", "name": "x.png"}
        assert os.listdir(s.upload_dir) == ["u1"]
        img = _png(c.get("/api/image/u1").content)
        assert img.shape == (fx.SIZE, fx.SIZE, 3) and (img == 77).all()
        assert c.get("/api/maps", params={"image": "u1", "layer": "conv1"}).status_code == 200
        assert [i["id"] for i in c.get("/api/info").json()["images"]][-1] == "u1"


def test_uploads_removed_at_shutdown(run_dir):
    s = _session(run_dir)
    with TestClient(make_app(s)) as c:
        assert c.post("/api/upload", params={"name": "a.png"}, content=_png_bytes(20, 20)).status_code == 200
        folder = s.upload_dir
        assert os.path.isfile(os.path.join(folder, "u1"))
    assert not os.path.exists(folder)


def test_nothing_outside_the_run_folder_is_served(client, run_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    link = os.path.join(run_dir, "escape.txt")
    os.symlink(secret, link)
    try:
        assert client.get("/run/results.json").status_code == 200
        for path in ("/run/%2e%2e/%2e%2e/secret.txt", "/run/..%2f..%2fsecret.txt", "/run/escape.txt",
                     "/run/tiles/%2e%2e/%2e%2e/results.json", f"/run/{secret}", "/run//etc/passwd", "/run/results.json%00"):
            r = client.get(path)
            assert r.status_code in (403, 404) and "error" in r.json(), path
        assert client.get("/run/tiles").status_code == 404  # a folder is not a file
    finally:
        os.remove(link)


def test_model_without_a_run(tmp_path):
    spec = fx.write_net(tmp_path)
    s = build_session(ExploreConfig.from_dict({"model": spec, "crop": 32, "resize": 32}))
    with TestClient(make_app(s)) as c:
        info = c.get("/api/info").json()
        assert info["images"] == [] and info["run"] is False and "no image set" in info["images_note"]
        assert [l["label"] for l in info["layers"]] == ["conv1", "conv2", "conv3"]
        key = c.post("/api/upload", params={"name": "a.png"}, content=_png_bytes(40, 50)).json()["id"]
        u = c.get("/api/unit", params={"image": key, "layer": "conv3", "channel": 0, "y": 1, "x": 1}).json()
        assert len(u["projections"]) == 3
        assert c.get("/api/channel", params={"layer": "conv3", "channel": 0}).json()["top"] is None
        assert c.get("/run/x").status_code == 404


def test_without_the_extra_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(DeconvisError, match=r"pip install 'deconvis\[explore\]'"):
        server.need_web_stack()
    assert cli.main(["explore", "--model", fx.write_net(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deconvis[explore]" in err[0]


def test_cli_config_errors(tmp_path, capsys):
    assert cli.main(["explore"]) == 2
    assert "nothing to explore" in capsys.readouterr().err
    assert cli.main(["explore", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["explore", str(tmp_path)]) == 2  # a folder without results.json
    assert "results.json does not exist" in capsys.readouterr().err


def test_shipped_config_names_every_key():
    import dataclasses

    from deconvis.config import load_yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    values = load_yaml(os.path.join(root, "configs", "explore.yaml"))
    assert sorted(values) == sorted(f.name for f in dataclasses.fields(ExploreConfig))
    cfg = ExploreConfig().update(values, source="configs/explore.yaml")
    assert cfg.run == "outputs/demo" and cfg.port == 8765
