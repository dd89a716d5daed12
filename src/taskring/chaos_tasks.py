"""Tasks the workers of `taskring chaos` run (and the chaos test suite).

chaos.short is a few milliseconds of work. chaos.long runs for `steps` steps of
`step_s` seconds and checkpoints after each one. As each attempt of it
begins, it appends `{"id", "attempt", "number", "step"}` to the start log
named by its caller, one os.write on an O_APPEND file (whole lines, also with
several workers writing), so the checker can tell where every attempt
resumed, including attempts killed before their first checkpoint.

Both allow many attempts: under chaos a task may lose several leases, and
running out of attempts is not what the run is testing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from taskring.registry import task

MAX_ATTEMPTS = 100


@task(name="chaos.short", max_attempts=MAX_ATTEMPTS)
def short(n: int, sleep_ms: float = 0.0) -> int:
    if sleep_ms > 0:
        time.sleep(sleep_ms / 1000)
    return n


@task(name="chaos.long", max_attempts=MAX_ATTEMPTS)
def long(ctx: Any, steps: int, step_s: float, start_log: str | None = None) -> dict[str, Any]:
    """Count to `steps`, one checkpoint a step; a resumed attempt goes on from ctx.state."""
    step = int((ctx.state or {}).get("step", 0))
    if start_log:
        _append(
            start_log,
            {"id": ctx.task_id, "attempt": ctx.attempt, "number": ctx.number, "step": step},
        )
    resumed_from = step
    while step < steps:
        time.sleep(step_s)
        step += 1
        ctx.checkpoint({"step": step})
        if ctx.lease_lost:  # superseded: the result would be refused anyway
            break
    return {"steps": step, "resumed_from": resumed_from, "attempt": ctx.attempt}


def _append(path: str, record: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)
