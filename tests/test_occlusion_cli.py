"""``deconvis occlusion`` end to end on a tiny net; config keys = flags; one-line errors."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import yaml

from deconvis.analysis.occlusion_run import OcclusionConfig
from deconvis.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_model_file(tmp_path) -> str:
    path = tmp_path / "tinynet.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def tiny():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),\n"
        "                         nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(5, 3))\n")
    return f"{path}:tiny"


def test_cli_end_to_end_small(tmp_path):
    out = tmp_path / "out"
    rc = main(["occlusion", "--model", _tiny_model_file(tmp_path), "--weights", "random",
               "--images", "skimage:coffee", "--crop", "40", "--resize", "44", "--size", "12", "--stride", "7",
               "--fill", "zero", "--target", "1", "--batch-size", "5", "--out-dir", str(out)])
    assert rc == 0
    rec = json.loads((out / "coffee.json").read_text())
    assert rec["square_size"] == [12, 12] and rec["stride"] == [7, 7] and rec["fill"] == "zero"
    assert rec["target"] == 1 and rec["positions"] == 25  # tops 0, 7, 14, 21, 28 on a 40 px input
    assert len(rec["probability"]) == 5 and len(rec["top_class"][0]) == 5
    png = (out / "coffee.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 300_000
    summary = json.loads((out / "occlusion.json").read_text())
    assert summary["settings"]["size"] == 12 and summary["images"][0]["png"] == "coffee.png"
    assert not [p for p in os.listdir(out) if p.endswith(".tmp") or p.startswith(".")]


def test_cli_rectangle_and_two_strides(tmp_path):
    """--size H,W and --stride H,W: a non-square occluder with different steps down and across."""
    out = tmp_path / "out"
    rc = main(["occlusion", "--model", _tiny_model_file(tmp_path), "--weights", "random",
               "--images", "skimage:coffee", "--crop", "40", "--resize", "44", "--size", "12,6", "--stride", "7,11",
               "--out-dir", str(out)])
    assert rc == 0
    rec = json.loads((out / "coffee.json").read_text())
    assert rec["square_size"] == [12, 6] and rec["stride"] == [7, 11]
    assert rec["tops_y"] == [0, 7, 14, 21, 28] and rec["tops_x"] == [0, 11, 22, 33]  # 40 px input
    assert json.loads((out / "occlusion.json").read_text())["settings"]["size"] == [12, 6]
    cfg = OcclusionConfig.from_dict({"size": [12, 6], "stride": 7})  # the YAML form
    assert cfg.size == [12, 6] and cfg.stride == 7


def test_every_config_key_is_a_flag_and_back():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["occlusion"]
    flags = {a.dest for a in sub._actions if a.option_strings} - {"help", "config"}
    fields = {f.name for f in dataclasses.fields(OcclusionConfig)}
    assert flags == fields
    with open(os.path.join(ROOT, "configs", "occlusion.yaml")) as f:
        keys = set(yaml.safe_load(f))
    assert keys == fields
    OcclusionConfig.load(os.path.join(ROOT, "configs", "occlusion.yaml"))  # the shipped file validates


@pytest.mark.parametrize("argv,needle", [
    (["--size", "500", "--crop", "40", "--resize", "44"], "does not fit"),
    (["--stride", "0"], "stride must be at least 1"),
    (["--stride", "4,0"], "stride must be at least 1"),
    (["--size", "12,x"], "HEIGHT,WIDTH"),
    (["--size", "3,4,5"], "HEIGHT,WIDTH"),
    (["--size", "8,41", "--crop", "40", "--resize", "44"], "does not fit"),
    (["--layer", "conv9", "--size", "8", "--crop", "40", "--resize", "44"], "unknown layer"),
    (["--target", "3", "--size", "8", "--crop", "40", "--resize", "44"], "out of range"),
    (["--fill", "purple"], "fill"),
    (["--images", "skimage:nope"], "unknown scikit-image photo"),
])
def test_cli_bad_input_one_line(tmp_path, capsys, argv, needle):
    rc = main(["occlusion", "--model", _tiny_model_file(tmp_path), "--weights", "random",
               "--images", "skimage:coffee", "--out-dir", str(tmp_path / "o")] + argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deconvis: error:") and needle in lines[0], err
    assert not (tmp_path / "o" / "occlusion.json").exists()


def test_class_names_from_torchvision_weights_metadata():
    from deconvis.analysis.occlusion_run import class_names_of

    names = class_names_of("alexnet", "DEFAULT")  # metadata only: nothing is downloaded
    assert names is not None and len(names) == 1000 and names[0] == "tench"
    assert class_names_of("alexnet", "random") is None
