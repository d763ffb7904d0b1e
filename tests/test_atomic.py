"""Atomic writes: complete file or the old one, never a half-written file or a stray temp."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from deconvis.io import atomic


def test_writes_and_replaces(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic.write_json(p, {"x": 1})
    atomic.write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    atomic.write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode & 0o044  # readable by others, like a normal file (not mkstemp's 0600)
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.json"]


def test_failure_keeps_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "r.json"
    atomic.write_json(p, {"ok": True})
    with pytest.raises(ValueError):
        atomic.write_json(p, {"bad": float("nan")})  # NaN is refused before anything is replaced
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(p) as tmp:
            with open(tmp, "w") as f:
                f.write('{"half": ')
            raise RuntimeError("killed mid-write")
    assert json.loads(p.read_text()) == {"ok": True}
    assert os.listdir(tmp_path) == ["r.json"]


def test_png_is_rgb_and_roundtrips(tmp_path):
    import cv2

    img = np.zeros((4, 5, 3), np.uint8)
    img[..., 0] = 255  # red
    atomic.write_png(tmp_path / "x.png", img)
    back = cv2.imread(str(tmp_path / "x.png"))
    assert back[0, 0].tolist() == [0, 0, 255]  # OpenCV reads BGR: red is last
    atomic.write_png(tmp_path / "g.png", np.full((3, 3), 9, np.uint8))
    assert cv2.imread(str(tmp_path / "g.png"), cv2.IMREAD_UNCHANGED)[0, 0] == 9
    with pytest.raises(TypeError):
        atomic.write_png(tmp_path / "f.png", np.zeros((2, 2, 3), np.float32))


def test_save_torch_loads_weights_only(tmp_path):
    atomic.save_torch({"a": torch.arange(3), "n": 4, "l": ["x"]}, tmp_path / "s.pt")
    d = torch.load(tmp_path / "s.pt", weights_only=True)
    assert d["a"].tolist() == [0, 1, 2] and d["n"] == 4 and d["l"] == ["x"]
