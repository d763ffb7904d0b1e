"""A background writer: encode and write files on a thread while the caller computes.

OpenCV's encoders and file writes release the GIL, so on a machine whose cores the forward does
not keep busy (data loading, Python between kernels, a GPU run) the output path overlaps the
compute instead of following it. At most ``max_pending`` tasks wait (the caller blocks beyond
that: memory stays bounded); the first error is raised by :meth:`BackgroundWriter.close` (or by
the next :meth:`submit`), and ``close`` always waits for what was submitted; after an error in the
caller, :meth:`BackgroundWriter.abandon` drops what has not started. Tasks write through
:mod:`deconvis.io.atomic`, so a failed or dropped task leaves no partial file.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, List, Optional


class BackgroundWriter:
    """``submit(fn, *args)`` runs on ``threads`` worker threads (0: inline, in the caller), named
    ``name``; with one thread the tasks run in the order submitted."""

    def __init__(self, threads: int = 1, max_pending: int = 64, name: str = "deconvis-writer"):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name) if threads > 0 else None
        self._slots = threading.BoundedSemaphore(max(1, max_pending))
        self._errors: List[BaseException] = []
        self._lock = threading.Lock()

    def _done(self, fut: Future) -> None:
        self._slots.release()
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            with self._lock:
                self._errors.append(exc)

    def _raise(self) -> None:
        with self._lock:
            if self._errors:
                raise self._errors[0]

    def submit(self, fn: Callable[..., Any], *args: Any) -> Optional[Future]:
        """Run ``fn(*args)`` in the background (blocks while ``max_pending`` tasks wait)."""
        self._raise()
        if self._pool is None:
            fn(*args)
            return None
        self._slots.acquire()
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(self._done)
        return fut

    def close(self) -> None:
        """Wait for every task; raise the first error of any."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._raise()

    def abandon(self) -> None:
        """After an error in the caller: drop the tasks not started, wait for the running ones (each
        writes a whole file or none), raise nothing (the caller's error is the one to report).
        A no-op after :meth:`close`."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # an error in the caller: keep its error
            self.abandon()
