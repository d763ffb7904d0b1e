"""Faults injected into a run (issue: reliability): each ends in one ``deconvis: error:`` line
naming the problem and the way out, and loses nothing already finished."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

import pipeline_fixtures as fx
from deconvis.cli import build_parser, main
from deconvis.errors import DeconvisError
from deconvis.runs import lock as run_lock
from deconvis.runs import pipeline
from deconvis.runs import results as results_mod


def _snapshot(folder) -> dict:
    """Every file under ``folder`` -> sha1 (but run.log, which each attempt appends to, and the lock)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name in ("run.log", run_lock.LOCK_FILE):
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.fixture
def done(tmp_path):
    cfg = fx.tiny_config(tmp_path)
    out = pipeline.run(cfg)
    return cfg, out


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("deconvis: error: ") and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- --help
def _subcommands() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_has_working_help(capsys):
    subs = _subcommands()
    assert {"visualize", "train", "rf", "erf"} <= set(subs)  # and any added later
    for name, sub in subs.items():
        text = sub.format_help()
        assert text.startswith(f"usage: deconvis {name}") and "--help" in text, name
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert capsys.readouterr().out.startswith(f"usage: deconvis {name}"), name
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    top = capsys.readouterr().out
    assert e.value.code == 0 and all(n in top for n in subs)


# --------------------------------------------------------------------------- --out
def test_out_under_a_regular_file_is_one_line(tmp_path, capsys):
    cfg = fx.tiny_config(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(DeconvisError, match=rf"cannot create run folder {blocker}/sub/t: {blocker} is a file"):
        pipeline.run(dataclasses.replace(cfg, out=str(blocker / "sub")))
    assert blocker.read_text() == "x"
    conf = tmp_path / "c.yaml"
    err = _cli_error(capsys, ["visualize", "--model", cfg.model, "--images", cfg.images, "--out",
                              str(blocker / "sub"), "--resize", "32", "--crop", "32", "--no-progress"])
    assert str(blocker) in err and "is a file, not a folder" in err and not conf.exists()


def test_out_not_writable_is_one_line(tmp_path, monkeypatch):
    cfg = fx.tiny_config(tmp_path)
    import deconvis.io.atomic as atomic

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)  # a read-only folder (we may run as root)
    with pytest.raises(DeconvisError) as e:
        pipeline.run(cfg)
    msg = str(e.value)
    assert msg == (f"cannot write to run folder {cfg.out}/t: Permission denied; choose another output folder "
                   "(--out) or fix its permissions")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder(tmp_path):
    cfg = fx.tiny_config(tmp_path)
    os.makedirs(cfg.out)
    os.chmod(cfg.out, 0o500)
    try:
        with pytest.raises(DeconvisError, match="cannot write to run folder .*Permission denied"):
            pipeline.run(cfg)
    finally:
        os.chmod(cfg.out, 0o700)


# --------------------------------------------------------------------------- results.json
@pytest.mark.parametrize("damage", [b"{\"schema\": \"deconvis", b"[1, 2]"])
def test_corrupt_results_on_resume_says_fresh_and_keeps_files(done, damage, capsys):
    cfg, out = done
    path = os.path.join(out.run_dir, "results.json")
    with open(path, "wb") as f:
        f.write(damage)
    before = _snapshot(out.run_dir)
    with pytest.raises(DeconvisError) as e:
        pipeline.run(cfg)
    msg = str(e.value)
    assert path in msg and "--fresh" in msg and "\n" not in msg
    assert _snapshot(out.run_dir) == before  # the tiles, sheets and mining checkpoint are still there
    with pytest.raises(DeconvisError, match="--fresh"):
        pipeline.run(dataclasses.replace(cfg, render_only=True))
    again = pipeline.run(dataclasses.replace(cfg, fresh=True))
    assert again.mined and json.load(open(path))["schema"] == results_mod.SCHEMA


# --------------------------------------------------------------------------- run lock
def _live_other_process():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_second_run_on_a_locked_folder_names_the_holder(done, capsys):
    cfg, out = done
    holder = _live_other_process()
    try:
        lock = os.path.join(out.run_dir, run_lock.LOCK_FILE)
        with open(lock, "w") as f:
            json.dump({"pid": holder.pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00"}, f)
        before = _snapshot(out.run_dir)
        with pytest.raises(DeconvisError) as e:
            pipeline.run(dataclasses.replace(cfg, fresh=True))  # would delete everything if it ran
        assert str(e.value) == (f"{os.path.abspath(out.run_dir)} is in use by another deconvis run: process "
                                f"{holder.pid} on {socket.gethostname()} (since 2026-01-01 00:00:00); wait for it, "
                                f"use another --run, or delete {lock} if that run is gone")
        assert _snapshot(out.run_dir) == before
        with pytest.raises(DeconvisError, match="in use by another deconvis run"):
            pipeline.run(dataclasses.replace(cfg, render_only=True))
        # a lock from another host is never taken over, even with a pid that is free here
        with open(lock, "w") as f:
            json.dump({"pid": 2 ** 22 + 7, "host": "elsewhere"}, f)
        with pytest.raises(DeconvisError, match="process 4194311 on elsewhere"):
            pipeline.run(cfg)
        assert _snapshot(out.run_dir) == before
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(done, caplog):
    cfg, out = done
    dead = _live_other_process()
    dead.kill()
    dead.wait()
    lock = os.path.join(out.run_dir, run_lock.LOCK_FILE)
    with open(lock, "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)
    with caplog.at_level(logging.WARNING, logger="deconvis"):
        again = pipeline.run(cfg)
    assert any("taking over the lock" in r.getMessage() and f"process {dead.pid}" in r.getMessage()
               for r in caplog.records)
    assert not again.mined and again.projected == 0  # resumed: the finished work was kept
    assert not os.path.exists(lock)  # released at the end


def test_lock_is_held_during_the_run_and_released_on_error(done, monkeypatch):
    cfg, out = done
    seen = {}

    def spy(*a, **k):
        seen["holder"] = run_lock.read(out.run_dir)
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "render_phase", spy)
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run(dataclasses.replace(cfg, per_sheet=2))
    assert seen["holder"]["pid"] == os.getpid() and seen["holder"]["host"] == socket.gethostname()
    assert run_lock.read(out.run_dir) is None


def test_two_concurrent_acquires_one_wins(tmp_path):
    run_lock.acquire(str(tmp_path))
    with pytest.raises(DeconvisError, match="already in use by this process"):
        run_lock.acquire(str(tmp_path))
    code = ("import sys; from deconvis.runs import lock\n"
            "try:\n    lock.acquire(sys.argv[1])\nexcept Exception as e:\n    print(e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and f"process {os.getpid()} on {socket.gethostname()}" in r.stdout, r.stderr
    run_lock.release(str(tmp_path))
    assert run_lock.read(str(tmp_path)) is None


def test_train_and_erf_outputs_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    err = _cli_error(capsys, ["train", "--epochs", "1", "--no-snapshots", "--out-dir", str(blocker / "train")])
    assert f"cannot create output folder {blocker}/train: {blocker} is a file, not a folder" in err
    model = tmp_path / "m.py"
    model.write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())\n")
    err = _cli_error(capsys, ["erf", "--model", f"{model}:make", "--layer", "1", "--input-size", "8",
                              "--images", "1", "--out", str(blocker / "erf")])
    assert f"{blocker} is a file, not a folder" in err and blocker.read_text() == "x"
