"""The projection's staging file (runs/phases/project.py ``_Staging``): a channel's rows are
stored and read back as put, and released (a hole punched in the file) once read, the other
channels' rows untouched; every projected channel is released in a run, and the file is gone
after it (renamed aside at once, deleted on a background thread; a leftover of a run killed
while deleting goes with the next staging of that layer)."""
from __future__ import annotations

import glob
import os
import threading
import types

import numpy as np
import pytest

import pipeline_fixtures as fx
from deconvis.runs import pipeline
from deconvis.runs.phases import project


@pytest.mark.parametrize("cell", [[40, 41], [32, 64]])  # rows of 29,520 bytes (not page-aligned), 9 pages
def test_release_drops_one_channels_rows_and_keeps_the_others(tmp_path, cell):
    st = project._Staging(str(tmp_path), 0, 3)
    lr = types.SimpleNamespace(name="l", label="l", cell=cell)
    rows = st.slot(lr, [5, 7, 9, 11])
    assert rows == {5: 0, 7: 1, 9: 2, 11: 3}
    h, w = cell
    rng = np.random.default_rng(0)
    tiles = {(c, r, s): rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for c in rows for r in range(3) for s in (0, 1)}
    for (c, r, s), t in tiles.items():
        st.put("l", c, r, s, t)
    for c in rows:  # each channel reads back as put: [k, 2, h, w, 3], rank then rec/img
        assert np.array_equal(st.read("l", c), np.stack([np.stack([tiles[c, r, 0], tiles[c, r, 1]]) for r in range(3)]))
    path = st.layers["l"].path
    st.release("l", 7)
    st.release("l", 11)
    size = st.read("l", 5).nbytes
    for c in rows:
        row = st.read("l", c).reshape(-1)
        if c in (5, 9):
            assert np.array_equal(row, np.stack([np.stack([tiles[c, r, 0], tiles[c, r, 1]]) for r in range(3)]).reshape(-1))
        else:  # the pages wholly inside the row are gone (read back as zeros); its edges may stay
            inner = row[4096:size - 4096]
            assert inner.size > 0 and (inner == 0).all(), c
    st.close()
    assert not os.path.exists(path)
    _join_deleters()
    assert os.listdir(os.path.dirname(path)) == []


def _join_deleters():
    for t in threading.enumerate():
        if t.name == "deconvis-staging":
            t.join()


def test_a_staging_file_left_while_deleting_goes_with_the_next_staging(tmp_path):
    lr = types.SimpleNamespace(name="l", label="l", cell=[8, 8])
    folder = tmp_path / "tiles" / "l"
    folder.mkdir(parents=True)
    left = folder / f".staging.rank0.npy{project.STAGING_TRASH}123-456"  # a killed run's, mid-delete
    other = folder / f".staging.rank1.npy{project.STAGING_TRASH}123-456"  # another rank's: not ours to touch
    left.write_bytes(b"x" * 100)
    other.write_bytes(b"x")
    st = project._Staging(str(tmp_path), 0, 3)
    st.slot(lr, [0, 1])
    assert sorted(os.listdir(folder)) == [".staging.rank0.npy", other.name]
    st.close()
    _join_deleters()
    assert os.listdir(folder) == [other.name]


def test_every_projected_channel_is_released_and_the_staging_file_removed(tmp_path, monkeypatch):
    released, real = [], project._Staging.release
    monkeypatch.setattr(project._Staging, "release", lambda self, layer, c: released.append((layer, c)) or real(self, layer, c))
    out = pipeline.run(fx.tiny_config(tmp_path, bottom_k=0))
    want = sorted((lr.name, u.channel) for lr in out.results.layers for u in lr.units)
    assert sorted(released) == want
    _join_deleters()
    assert glob.glob(os.path.join(out.run_dir, "tiles", "*", ".staging*")) == []
