"""The tasks taskring's workers run in the benchmarks (workers get PYTHONPATH=bench)."""

from __future__ import annotations

import time
from typing import Any

from taskring import task


@task(name="bench.noop")
def noop(i: int) -> int:
    """Nothing but the round trip: returns its argument."""
    return i


@task(name="bench.checkpoints")
def checkpoints(ctx: Any, n: int) -> list[float]:
    """`n` checkpoints, one after another; returns [start, end] in time.monotonic().

    CLOCK_MONOTONIC is one clock for every process on the machine, so the
    benchmark can compare these times across tasks and workers.
    """
    start = time.monotonic()
    for i in range(int(ctx.state or 0), n):
        ctx.checkpoint(i + 1)
    return [start, time.monotonic()]
