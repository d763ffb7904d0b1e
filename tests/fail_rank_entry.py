"""torchrun entry point for the tests: ``deconvis`` with one rank failing in its mining forward.

``FAIL_RANK=R`` (or ``R:B``) in the environment makes rank ``R`` raise in its ``B``-th mining
forward (default the first), so the tests can check that a failure on one rank ends every rank
with the same error; ``R:B:project`` makes it raise at its ``B``-th projected unit instead (a crash
during projection). It patches the pipeline from outside: production code has no test hook.
"""
from __future__ import annotations

import os
import sys

FAIL_ENV = "FAIL_RANK"


def install(spec: str) -> None:
    from deconvis.runs.phases import mine

    who, _, rest = spec.partition(":")
    batch, _, phase = rest.partition(":")
    fail_rank, fail_at = int(who), int(batch or 1)
    if phase == "project":
        _fail_in_projection(fail_rank, fail_at)
        return
    real = mine.mining_forward

    def failing_forward(ctx):
        forward, calls = real(ctx), [0]

        def wrapped(x):
            calls[0] += 1
            if ctx.info.rank == fail_rank and calls[0] >= fail_at:
                raise RuntimeError(f"DECONVIS_TEST_FAIL_RANK: simulated failure in the mining forward of batch "
                                   f"{calls[0]} on rank {ctx.info.rank}")
            return forward(x)

        return wrapped

    mine.mining_forward = failing_forward


def _fail_in_projection(fail_rank: int, fail_at: int) -> None:
    from deconvis.render import projection

    real = projection.project_jobs
    rank = int(os.environ.get("RANK", "0"))

    def failing_project_jobs(*args, sink, **kwargs):
        calls = [0]

        def failing_sink(*a):
            calls[0] += 1
            if rank == fail_rank and calls[0] >= fail_at:
                raise RuntimeError(f"DECONVIS_TEST_FAIL_RANK: simulated failure at projected unit {calls[0]} on "
                                   f"rank {rank}")
            return sink(*a)

        return real(*args, sink=failing_sink, **kwargs)

    projection.project_jobs = failing_project_jobs


if __name__ == "__main__":
    install(os.environ[FAIL_ENV])
    from deconvis.cli import main

    sys.exit(main())
