"""Shared helpers for the benchmark scripts: the machine line, timing, tables, BENCHMARKS.md."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from typing import Callable, List, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_MD = os.path.join(ROOT, "BENCHMARKS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}, Python {platform.python_version()}")


def best_time(fn: Callable[[], object], repeat: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """Best time of ``repeat`` calls on ``clock`` (wall time by default), seconds, after one
    warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def table(header: Sequence[str], rows: List[Sequence[object]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def record(section: str, body: str) -> None:
    """Replace (or append) ``## section`` in BENCHMARKS.md with ``body``, dated, atomically."""
    stamp = _dt.date.today().isoformat()
    block = f"## {section}\n\n_Recorded {stamp} on {machine()}._\n\n{body.strip()}\n"
    text = open(BENCH_MD).read() if os.path.exists(BENCH_MD) else "# Benchmarks\n\nEach section is written by the script named in it; rerun it to refresh.\n"
    parts = text.split("\n## ")
    head, sections = parts[0], parts[1:]
    sections = [s for s in sections if not s.startswith(section + "\n")]
    sections.append(block[3:])
    out = head.rstrip() + "\n\n" + "\n".join("## " + s.rstrip() + "\n" for s in sections)
    tmp = BENCH_MD + ".tmp"
    with open(tmp, "w") as f:
        f.write(out)
    os.replace(tmp, BENCH_MD)


def publish(section: str, body: str, save: bool) -> None:
    """Print the machine line and ``body``; with ``save`` also :func:`record` ``body`` as
    ``## section`` of BENCHMARKS.md."""
    print(machine())
    print(body)
    if save:
        record(section, body)
