"""deconvis.io.prefetch: reading ahead on a thread keeps the items, their order and the errors."""
from __future__ import annotations

import threading
import time

import pytest

from deconvis.io.prefetch import Prefetch


def test_same_items_in_order_read_ahead_on_another_thread():
    readers = []

    def source():
        for i in range(20):
            readers.append(threading.current_thread())
            yield i

    pf = Prefetch(source(), depth=3)
    assert list(pf) == list(range(20))
    assert readers and all(t is not threading.current_thread() for t in readers)


def _counted(n, read):
    """0..n-1, each appended to ``read`` as it is read."""
    for i in range(n):
        read.append(i)
        yield i


def test_reads_ahead_of_a_slow_caller_but_no_further_than_depth():
    read = []
    it = iter(Prefetch(_counted(50, read), depth=2))
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(read) < 4 and time.monotonic() < deadline:  # 0 taken, 1-2 queued, 3 waiting to be put
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(read) == 4
    it.close()


def test_an_error_reaches_the_caller_at_its_item():
    def source():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for x in Prefetch(source()):
            got.append(x)
    assert got == [1, 2]


def test_a_caller_that_stops_early_stops_the_thread():
    read = []
    before = {t.name for t in threading.enumerate()}
    for x in Prefetch(_counted(10_000, read), depth=2, name="pf-test-early"):
        if x == 3:
            break
    assert "pf-test-early" not in {t.name for t in threading.enumerate()} - before
    assert len(read) < 10  # stopped, not drained to the end


def test_each_pass_starts_again_and_len_is_the_sources():
    pf = Prefetch([1, 2, 3])
    assert list(pf) == [1, 2, 3] and list(pf) == [1, 2, 3] and len(pf) == 3
    with pytest.raises(ValueError, match="depth"):
        Prefetch([1], depth=0)
