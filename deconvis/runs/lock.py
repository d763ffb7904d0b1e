"""One run at a time per run folder: a lock file holding the owner's pid and host.

``with hold(run_dir):`` creates ``run_dir/.deconvis.lock`` exclusively (``O_CREAT | O_EXCL``,
atomic on local file systems and on NFSv3+) and removes it on leaving. A second run on the
same folder fails with one line naming the holder. A lock whose owner is a process on this
host that no longer exists is stale (the run was killed): it is taken over with a warning.
A lock held from another host cannot be checked and is never taken over; the message says
to remove the file if that run is gone. Under torchrun only rank 0 takes the lock and every
rank learns the outcome through :func:`deconvis.runs.distributed.agree`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from typing import Any, Dict, Iterator, Optional

from deconvis.errors import DeconvisError
from deconvis.runs import distributed

log = logging.getLogger("deconvis")

LOCK_FILE = ".deconvis.lock"


def _owner() -> Dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def read(run_dir: str) -> Optional[Dict[str, Any]]:
    """The holder recorded in ``run_dir``'s lock file, or None when there is none. A lock file
    that cannot be parsed (a writer killed between create and write) reads as ``{}``."""
    try:
        with open(os.path.join(run_dir, LOCK_FILE), encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        d = json.loads(text)
        return d if isinstance(d, dict) else {}
    except ValueError:
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _stale(holder: Dict[str, Any]) -> bool:
    """True when the holder is certainly gone: a process of this host that does not exist."""
    pid, host = holder.get("pid"), holder.get("host")
    return isinstance(pid, int) and host == socket.gethostname() and not _alive(pid)


def _describe(holder: Dict[str, Any]) -> str:
    if not holder:
        return "an unknown process (the lock file is empty)"
    return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since', '?')})"


def acquire(run_dir: str) -> None:
    """Take the lock of ``run_dir`` or raise DeconvisError naming its holder."""
    path = os.path.join(run_dir, LOCK_FILE)
    for _ in range(3):  # a stale lock removed, then retried; a racing run may win meanwhile
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read(run_dir)
            if holder is None:
                continue  # released between our open and read
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                raise DeconvisError(f"{os.path.abspath(run_dir)} is already in use by this process "
                                    "(a nested run on the same folder); use another --run")
            if _stale(holder):
                log.warning("taking over the lock of %s: its holder, %s, no longer runs (killed?)",
                            os.path.abspath(run_dir), _describe(holder))
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise DeconvisError(f"{os.path.abspath(run_dir)} is in use by another deconvis run: {_describe(holder)}; "
                                f"wait for it, use another --run, or delete {path} if that run is gone")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_owner(), f)
        return
    raise DeconvisError(f"could not take the lock {path}: other runs keep taking it; use another --run")


def release(run_dir: str) -> None:
    """Remove ``run_dir``'s lock if this process holds it."""
    holder = read(run_dir)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, LOCK_FILE))


@contextlib.contextmanager
def hold(run_dir: str, info: Any = None) -> Iterator[None]:
    """``with hold(run_dir, info):`` -- the run's lock for the duration of the block. ``info``
    (a :class:`~deconvis.runs.distributed.DistInfo`, or None for one process): only the main
    rank takes the lock; all ranks raise the same error when it is held elsewhere."""
    main = info is None or info.is_main
    acquired = False
    try:
        error: Optional[BaseException] = None
        if main:
            try:
                acquire(run_dir)
                acquired = True
            except DeconvisError as exc:
                error = exc
        if info is not None:
            distributed.agree(info, error, "lock")
        elif error is not None:
            raise error
        yield
    finally:
        if acquired:
            release(run_dir)
