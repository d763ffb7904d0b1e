"""``deconvis invariance``, ``correspondence`` and ``diagnose`` end to end on the demo net (small
settings), their YAML configs (every key a flag and the reverse), and one-line errors."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import yaml

from deconvis.analysis.correspondence_run import CorrespondenceConfig
from deconvis.analysis.diagnose_run import DiagnoseConfig
from deconvis.analysis.invariance_run import InvarianceConfig
from deconvis.cli import main

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("name, cls", [("invariance", InvarianceConfig), ("correspondence", CorrespondenceConfig),
                                       ("diagnose", DiagnoseConfig)])
def test_yaml_keys_are_the_flags(name, cls):
    path = os.path.join(ROOT, "configs", f"{name}.yaml")
    with open(path) as f:
        keys = set(yaml.safe_load(f))
    assert keys == {f.name for f in dataclasses.fields(cls)}
    cfg = cls.load(path)
    assert cfg.to_dict() == cls().to_dict()  # the shipped YAML states the defaults


def test_invariance_cli(tmp_path):
    out = tmp_path / "inv"
    rc = main(["invariance", "--images", "skimage:coffee,skimage:chelsea", "--translate-steps", "3",
               "--scale-steps", "2", "--rotate-steps", "2", "--fill", "reflect", "--out-dir", str(out)])
    assert rc == 0
    rec = json.loads((out / "invariance.json").read_text())
    assert [s["transform"] for s in rec["sweeps"]] == ["translate", "scale", "rotate"]
    assert rec["sweeps"][0]["amounts"] == [-34.0, 0.0, 34.0]  # 0.268 * 128 px
    assert rec["fill"] == "reflect" and "mirror" in rec["fill_meaning"]
    assert len(rec["sweeps"][2]["distance"]["conv1"]) == 2
    assert (out / "invariance.png").stat().st_size > 1000


def test_correspondence_cli(tmp_path):
    parts = tmp_path / "parts.yaml"
    parts.write_text(yaml.safe_dump([
        {"image": "skimage:chelsea", "crop": [0, 300, 75, 375], "part": "nose", "box": [220, 262, 232, 292]},
        {"image": "skimage:chelsea", "crop": [30, 300, 90, 360], "part": "nose", "box": [220, 262, 232, 292]},
        {"image": "skimage:chelsea", "part": "nose", "box": [220, 262, 232, 292]},
    ]))
    out = tmp_path / "cor"
    assert main(["correspondence", "--parts", str(parts), "--layers", "conv2", "--random-trials", "1",
                 "--out-dir", str(out)]) == 0
    rec = json.loads((out / "correspondence.json").read_text())
    assert list(rec["table"]) == ["nose", "random(nose)"]
    assert rec["table"]["nose"]["conv2"]["n_images"] == 3
    assert "| nose |" in (out / "correspondence.md").read_text()
    assert (out / "correspondence.png").exists()


def test_diagnose_cli(tmp_path):
    out = tmp_path / "diag"
    assert main(["diagnose", "--images", "builtin:skimage", "--max-images", "3", "--alias-images", "3",
                 "--out-dir", str(out)]) == 0
    rec = json.loads((out / "diagnose.json").read_text())
    assert rec["images"] == 3 and list(rec["dead"]) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert rec["aliasing"]["layer"] == "conv2" and rec["first_conv"]["stride"] == 2
    assert abs(sum(rec["first_conv"]["band_fractions_mean"]) - 1) < 1e-9
    assert (out / "diagnose.png").exists() and (out / "diagnose.md").exists()


@pytest.mark.parametrize("argv, match", [
    (["invariance", "--images", "skimage:coffee", "--layers", "conv9"], "conv9"),
    (["invariance", "--images", "skimage:coffee", "--targets", "500", "--transforms", "translate",
      "--translate-steps", "1"], "target class 500 is out of range"),
    (["invariance", "--images", "skimage:cofee"], "did you mean: coffee"),
    (["diagnose", "--band-low", "0.3", "--band-high", "0.2"], "band_low < band_high"),
    (["correspondence", "--fill", "edge"], "fill 'edge'"),
])
def test_errors_are_one_line(argv, match, tmp_path, capsys):
    assert main(argv + ["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


def test_part_box_outside_the_image(tmp_path, capsys):
    parts = tmp_path / "parts.yaml"
    parts.write_text(yaml.safe_dump([
        {"image": "skimage:chelsea", "part": "nose", "box": [220, 262, 232, 292]},
        {"image": "skimage:coffee", "part": "nose", "box": [380, 420, 10, 30]},  # coffee is 400 px high
    ]))
    assert main(["correspondence", "--parts", str(parts), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "outside the image" in err and len(err.splitlines()) == 1
