"""The run-folder lock on its own (deconvis/runs/lock.py), without a pipeline run: a live holder
on this host keeps its lock and its life, release leaves another holder's lock alone, and a lock
file that holds no mapping reads as an unknown holder."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from deconvis.errors import DeconvisError
from deconvis.runs import lock as run_lock


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _write(run_dir, holder) -> str:
    path = os.path.join(run_dir, run_lock.LOCK_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(holder, f)
    return path


def test_a_live_holder_on_this_host_keeps_its_lock_and_is_not_signalled(tmp_path, sleeper):
    holder = {"pid": sleeper.pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00"}
    path = _write(tmp_path, holder)
    with pytest.raises(DeconvisError, match=rf"in use by another deconvis run: process {sleeper.pid} on "):
        run_lock.acquire(str(tmp_path))
    assert run_lock.read(str(tmp_path)) == holder and os.path.isfile(path)
    with pytest.raises(subprocess.TimeoutExpired):  # the liveness probe sends no real signal
        sleeper.wait(timeout=0.5)


def test_release_leaves_another_holders_lock_alone(tmp_path, sleeper):
    for holder in ({"pid": sleeper.pid, "host": socket.gethostname()},  # another process here
                   {"pid": os.getpid(), "host": "elsewhere"}):         # our pid, another host
        path = _write(tmp_path, holder)
        run_lock.release(str(tmp_path))
        assert os.path.isfile(path) and run_lock.read(str(tmp_path)) == holder
    os.remove(path)
    run_lock.acquire(str(tmp_path))
    run_lock.release(str(tmp_path))  # our own: removed
    assert run_lock.read(str(tmp_path)) is None


@pytest.mark.parametrize("text", ["[1, 2]", "7", "not json"])
def test_a_lock_file_without_a_mapping_reads_as_unknown(tmp_path, text):
    with open(os.path.join(tmp_path, run_lock.LOCK_FILE), "w", encoding="utf-8") as f:
        f.write(text)
    assert run_lock.read(str(tmp_path)) == {}
    with pytest.raises(DeconvisError, match="an unknown process"):
        run_lock.acquire(str(tmp_path))


def test_a_holder_owned_by_another_user_counts_as_alive(tmp_path, monkeypatch):
    """The probe's PermissionError means the process exists under another user (never raised for
    root, so it is simulated): the lock is kept, and the message names the folder and a holder
    whose start time is unknown as ``since ?``."""
    holder = {"pid": 4242, "host": socket.gethostname()}
    _write(tmp_path, holder)

    def denied(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(run_lock.os, "kill", denied)
    with pytest.raises(DeconvisError) as e:
        run_lock.acquire(str(tmp_path))
    assert str(e.value).startswith(f"{os.path.abspath(tmp_path)} is in use by another deconvis run: "
                                   f"process 4242 on {socket.gethostname()} (since ?); ")
    assert run_lock.read(str(tmp_path)) == holder


def test_the_lock_file_mode_is_0644_and_a_stale_takeover_names_the_folder(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid no longer runs
    _write(tmp_path, {"pid": dead.pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00"})
    old = os.umask(0o022)
    try:
        with caplog.at_level("WARNING"):
            run_lock.acquire(str(tmp_path))
    finally:
        os.umask(old)
    assert f"taking over the lock of {os.path.abspath(tmp_path)}: its holder, process {dead.pid}" in caplog.text
    path = os.path.join(tmp_path, run_lock.LOCK_FILE)
    assert os.stat(path).st_mode & 0o777 == 0o644 and run_lock.read(str(tmp_path))["pid"] == os.getpid()
    run_lock.release(str(tmp_path))


# Races, staged: another run takes, drops or removes the lock between two system calls of this
# one. The lock module's ``os.open``/``os.remove`` and ``read`` are wrapped so that the other
# run's step happens exactly there.

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_released_between_our_open_and_read_is_taken_on_the_next_try(tmp_path, monkeypatch, sleeper):
    path = _write(str(tmp_path), {"pid": sleeper.pid, "host": socket.gethostname()})
    real_read = run_lock.read

    def read_after_release(run_dir):  # the holder finishes just after our exclusive open failed
        os.remove(path)
        monkeypatch.setattr(run_lock, "read", real_read)
        return real_read(run_dir)

    monkeypatch.setattr(run_lock, "read", read_after_release)
    run_lock.acquire(str(tmp_path))
    assert run_lock.read(str(tmp_path))["pid"] == os.getpid()


def test_a_stale_lock_removed_by_another_run_first_is_still_taken_over(tmp_path, monkeypatch):
    """We find a stale lock; before we remove it, another run removes it (taking it over) and
    drops it again: our removal finds no file, which is no error, and our next try wins."""
    path = _write(str(tmp_path), {"pid": _dead_pid(), "host": socket.gethostname()})
    real_remove = os.remove

    def remove_raced(p, *a, **k):
        if p == path and not os.path.exists(p + ".raced"):
            real_remove(p)  # the other run's removal, just before ours
            open(p + ".raced", "w").close()
        return real_remove(p, *a, **k)

    monkeypatch.setattr(run_lock.os, "remove", remove_raced)
    run_lock.acquire(str(tmp_path))
    monkeypatch.setattr(run_lock.os, "remove", real_remove)
    assert run_lock.read(str(tmp_path))["pid"] == os.getpid()


def test_release_when_the_lock_vanished_after_our_read_is_no_error(tmp_path, monkeypatch):
    run_lock.acquire(str(tmp_path))
    path = os.path.join(str(tmp_path), run_lock.LOCK_FILE)
    real_read = run_lock.read

    def read_then_gone(run_dir):  # someone deletes the file by hand right after we read it
        holder = real_read(run_dir)
        os.remove(path)
        return holder

    monkeypatch.setattr(run_lock, "read", read_then_gone)
    run_lock.release(str(tmp_path))
    assert not os.path.exists(path)


def test_a_lock_retaken_on_every_try_gives_up_after_three_tries_with_a_clear_error(tmp_path, monkeypatch):
    """Each try finds a stale lock, removes it, and another run creates a new stale one before
    our next exclusive open: after three tries the error says so and what to do."""
    path = os.path.join(str(tmp_path), run_lock.LOCK_FILE)
    real_open = os.open
    tries = []

    def open_lost(p, *a, **k):
        if p == path:
            tries.append(p)
            _write(str(tmp_path), {"pid": _dead_pid(), "host": socket.gethostname()})  # the other run won
        return real_open(p, *a, **k)

    monkeypatch.setattr(run_lock.os, "open", open_lost)
    with pytest.raises(DeconvisError) as err:
        run_lock.acquire(str(tmp_path))
    assert str(err.value) == f"could not take the lock {path}: other runs keep taking it; use another --run"
    assert len(tries) == 3
