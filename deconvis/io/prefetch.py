"""Read ahead on a thread: the next batches decode while the caller computes.

A DataLoader with no worker processes (the CPU default: workers would take cores from the
forward) decodes each batch on the caller's thread, between two forwards. OpenCV's decoder and
resize release the GIL, and so do torch's ops, so one background thread overlaps the decode
with the compute: on the CPU it runs while the caller is in Python between kernels (the
windowed mirror's bookkeeping, the tiles' hand-off), on a GPU run while the device computes.
"""
from __future__ import annotations

import queue
import threading
from typing import Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")

_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetch(Generic[T]):
    """Iterate ``source`` on a background thread, at most ``depth`` items ahead of the caller:
    the same items in the same order. An error raised while reading is raised to the caller at
    the item where it happened; a caller that stops early (``break``, an error of its own: the
    iterator is closed or collected) stops the thread after the item it is reading. Each
    ``iter()`` starts a new pass over ``source``. ``len()`` is the source's."""

    def __init__(self, source: Iterable[T], depth: int = 2, name: str = "deconvis-prefetch"):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.source, self.depth, self.name = source, int(depth), name

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[T]:
        q: "queue.Queue[object]" = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for item in self.source:
                    if not put(item):
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                put(_Failed(exc))
                return
            put(_END)

        thread = threading.Thread(target=read, name=self.name, daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = q.get(timeout=0.5)
                except queue.Empty:
                    if not thread.is_alive() and q.empty():  # (never expected: the reader always ends with an item)
                        raise RuntimeError(f"{self.name}: the reading thread ended without a last item") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item  # type: ignore[misc]
        finally:
            stop.set()
            while thread.is_alive():  # unblock a reader waiting on a full queue, then let it end
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()
