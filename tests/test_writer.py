"""render.writer.BackgroundWriter: tasks run off the caller's thread with the same results as
inline, at most ``max_pending`` wait, a task's error comes back to the caller (from ``close`` or
the next ``submit``), ``abandon`` drops what has not started, and a task that fails while writing
through deconvis.io.atomic leaves no file, whole or partial."""
from __future__ import annotations

import os
import threading

import pytest

from deconvis.io.atomic import atomic_path, write_bytes
from deconvis.render.writer import BackgroundWriter


def _files(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_tasks_write_what_inline_writes_and_close_waits_for_all(tmp_path, threads):
    w = BackgroundWriter(threads=threads, max_pending=2)
    for i in range(20):
        w.submit(write_bytes, str(tmp_path / f"f{i:02d}"), bytes([i]) * (i + 1), False)
    w.close()
    assert _files(tmp_path) == [f"f{i:02d}" for i in range(20)]
    assert all((tmp_path / f"f{i:02d}").read_bytes() == bytes([i]) * (i + 1) for i in range(20))


def _half_written(path, data):
    """An atomic write that dies half way (a full disk, a killed encoder)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(f"disk full writing {os.path.basename(path)}")


def test_a_task_error_reaches_the_caller_and_leaves_no_partial_file(tmp_path):
    w = BackgroundWriter(threads=1, max_pending=4)
    w.submit(write_bytes, str(tmp_path / "a"), b"aaaa", False)
    w.submit(_half_written, str(tmp_path / "b"), b"bbbb")
    w.submit(write_bytes, str(tmp_path / "c"), b"cccc", False)
    with pytest.raises(OSError, match="disk full writing b"):
        w.close()
    assert _files(tmp_path) == ["a", "c"]  # no b, no temporary file of b
    w2 = BackgroundWriter(threads=1, max_pending=4)  # the next submit raises it too
    w2.submit(_half_written, str(tmp_path / "d"), b"dddd")
    w2._pool.shutdown(wait=True)  # the failed task has finished
    with pytest.raises(OSError, match="disk full writing d"):
        w2.submit(write_bytes, str(tmp_path / "e"), b"e", False)
    assert not os.path.exists(tmp_path / "e")
    w2.abandon()


def test_at_most_max_pending_wait_and_abandon_drops_what_has_not_started(tmp_path):
    gate, started = threading.Event(), threading.Event()

    def blocked(path):
        started.set()
        gate.wait(10)
        write_bytes(path, b"x", durable=False)

    w = BackgroundWriter(threads=1, max_pending=2)
    w.submit(blocked, str(tmp_path / "0"))
    started.wait(10)
    w.submit(write_bytes, str(tmp_path / "1"), b"1", False)  # 2 pending: the next submit must block
    third = threading.Thread(target=w.submit, args=(write_bytes, str(tmp_path / "2"), b"2", False))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # blocked while 2 wait
    gate.set()
    third.join(10)
    assert not third.is_alive()
    w.close()
    assert _files(tmp_path) == ["0", "1", "2"]

    gate.clear()
    started.clear()
    w = BackgroundWriter(threads=1, max_pending=8)
    w.submit(blocked, str(tmp_path / "r"))
    started.wait(10)
    for i in range(5):
        w.submit(write_bytes, str(tmp_path / f"q{i}"), b"q", False)
    threading.Timer(0.2, gate.set).start()
    w.abandon()  # the running task finishes its whole file; the queued ones never start
    assert "r" in _files(tmp_path) and not any(f.startswith("q") for f in _files(tmp_path))
    w.close()  # a no-op now
