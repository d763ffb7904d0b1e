"""``deconvis rf`` and ``deconvis erf`` end to end, on a model file written by the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from deconvis.cli import main
from deconvis.cli.rf_cmd import parse_size
from deconvis.errors import DeconvisError

MODEL_PY = textwrap.dedent('''
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, 5, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    not_a_module = 42
''')


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL_PY)
    return str(path)


def test_rf_json(model_file, capsys):
    assert main(["rf", "--model", f"{model_file}:make", "--input-size", "20,17", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["input"] + [str(i) for i in range(8)]
    assert all(set(r) == {"name", "kind", "out", "rf", "jump", "start", "whole"} for r in rows)
    # conv 5/2/1: r 5, j 2, start 2 - 1 = 1 ; out (20+2-5)//2+1 = 9, (17+2-5)//2+1 = 8
    assert rows[1] == {"name": "0", "kind": "Conv2d", "out": [9, 8], "rf": [5, 5], "jump": [2, 2],
                       "start": [1, 1], "whole": False}
    # pool 3/2 ceil: r 5 + 2*2 = 9, j 4, start 1 + 2 = 3 ; out ceil((9-3)/2)+1 = 4, ceil((8-3)/2)+1 = 4
    assert rows[3] == {"name": "2", "kind": "MaxPool2d", "out": [4, 4], "rf": [9, 9], "jump": [4, 4],
                       "start": [3, 3], "whole": False}
    assert rows[-1]["kind"] == "Linear" and rows[-1]["rf"] == [20, 17] and rows[-1]["start"] == [9.5, 8]


def test_rf_table_and_layer_filter(model_file, capsys):
    assert main(["rf", "--model", f"{model_file}:make", "--input-size", "24", "--layer", "conv2",
                 "--layer", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    body = [l.split() for l in out[3:-1]]
    assert [b[0] for b in body] == ["4", "2"]          # conv2 alias -> rectified conv2 ("4"), then "2"
    assert body[0][1:] == ["ReLU", "5x5", "17x17", "4x4", "3,", "3"]   # 24 -> 11 -> 5 (ceil) -> 5


def test_rf_torchvision_model_json(capsys):
    assert main(["rf", "--model", "alexnet", "--input-size", "224", "--json", "--layer", "features.0"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row == {"name": "features.0", "kind": "Conv2d", "out": [55, 55], "rf": [11, 11], "jump": [4, 4],
                   "start": [3, 3], "whole": False}


@pytest.mark.parametrize("argv,needle", [
    (["rf", "--model", "alexnett"], "unknown model 'alexnett'"),
    (["rf", "--model", "{file}:not_a_module"], "not a torch.nn.Module"),
    (["rf", "--model", "{file}:make", "--input-size", "4"], "input 4x4 is too small for Sequential: layer 2"),
    (["rf", "--model", "{file}:make", "--input-size", "2x"], "--input-size '2x' must be H or H,W"),
    (["rf", "--model", "{file}:make", "--layer", "conv9"], "unknown layer 'conv9'"),
    (["erf", "--model", "{file}:make", "--layer", "nope", "--input-size", "16"], "unknown layer 'nope'"),
])
def test_errors_one_line_exit_2(model_file, capsys, argv, needle, tmp_path, monkeypatch):
    argv = [a.replace("{file}", model_file) for a in argv]
    monkeypatch.chdir(tmp_path)  # (erf's default output folder is relative: outputs/erf-...)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("deconvis: error: ") and needle in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "outputs")  # a refused command makes no output folder


def test_parse_size():
    assert parse_size("224") == (224, 224) and parse_size("224,160") == (224, 160)
    assert parse_size("31x17") == (31, 17)
    for bad in ("", "0", "a", "1,2,3", "-4", "3,"):
        with pytest.raises(DeconvisError):
            parse_size(bad)


def test_erf_writes_outputs(model_file, tmp_path, capsys):
    out = tmp_path / "erf"
    assert main(["erf", "--model", f"{model_file}:make", "--layer", "3", "--input-size", "21",
                 "--images", "3", "--out", str(out), "--path-count"]) == 0
    text = capsys.readouterr().out
    assert "95% mass fraction: 0." in text
    assert sorted(os.listdir(out)) == ["erf.npy", "erf.png", "path_count.npy", "path_count.png"]
    erf = np.load(out / "erf.npy")
    pc = np.load(out / "path_count.npy")
    assert erf.shape == (21, 21) and pc.shape == (21, 21)
    assert ((erf > 0) <= (pc > 0)).all()               # the ERF lives where paths exist
    frac = float(text.split("95% mass fraction: ")[1].split()[0])
    assert 0 < frac <= 1


def test_erf_default_out_dir(model_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["erf", "--model", f"{model_file}:make", "--layer", "conv1", "--input-size", "12",
                 "--images", "1"]) == 0
    assert (tmp_path / "outputs" / "erf-model-make-conv1" / "erf.png").is_file()


def test_subprocess_exit_code(model_file):
    proc = subprocess.run([sys.executable, "-m", "deconvis", "rf", "--model", f"{model_file}:make",
                           "--input-size", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("deconvis: error: input 3x3 is too small") and proc.stderr.count("\n") == 1
