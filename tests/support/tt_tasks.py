"""Tasks the integration and chaos tests run in real worker processes."""

from __future__ import annotations

import os
import time
from typing import Any

from taskring import task


@task
def add(a: int, b: int) -> int:
    return a + b


@task
def echo(value: Any) -> Any:
    return value


@task
def pid() -> int:
    return os.getpid()


@task
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@task
def nap_started(ctx: Any, seconds: float) -> float:
    """nap, after a checkpoint that tells a test it has started in a worker thread.

    A task the broker shows as running may still wait in the worker for a slot.
    """
    ctx.checkpoint("started")
    time.sleep(seconds)
    return seconds


@task
def spin(seconds: float) -> int:
    """Busy-loop in pure Python, holding the GIL as much as the interpreter allows."""
    deadline = time.monotonic() + seconds
    loops = 0
    while time.monotonic() < deadline:
        loops += 1
    return loops


@task
def fail(message: str) -> None:
    raise ValueError(message)


@task(max_attempts=5)
def crunch(ctx: Any, n: int, every: int = 1000) -> int:
    i = ctx.state or 0
    while i < n:
        i += 1
        if i % every == 0:
            ctx.checkpoint(i)
    return i
