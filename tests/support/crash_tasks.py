"""Tasks for tests/chaos/test_crashes.py: they leave a trace of their work on disk.

Each line is written with one os.write on an O_APPEND descriptor, so a line
written before a SIGKILL is whole and in the file, whatever is killed when.
"""

from __future__ import annotations

import os
import time
from typing import Any

from lease_polling import lease_lost_within

from taskring import task


def append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@task(max_attempts=5)
def units(ctx: Any, log_path: str, n: int, per_checkpoint: int, unit_s: float) -> dict[str, Any]:
    """Do n units of work, checkpointing every per_checkpoint units.

    The log gets "start,<attempt>,<state>" when an attempt begins and
    "unit,<attempt>,<unit>" after each unit, so a test can count the work
    each attempt did. An attempt told that its lease is lost stops early.
    """
    done = ctx.state or 0
    append_line(log_path, f"start,{ctx.attempt},{done}")
    while done < n:
        time.sleep(unit_s)
        append_line(log_path, f"unit,{ctx.attempt},{done}")
        done += 1
        if done % per_checkpoint == 0 and done < n:
            ctx.checkpoint(done)
            if ctx.lease_lost:  # superseded: the result will be refused anyway
                break
    return {"attempt": ctx.attempt, "pid": os.getpid(), "done": done}


@task
def square(x: int) -> int:
    return x * x


@task
def whoami(seconds: float = 0.0) -> int:
    """The pid of the process that ran the task (a pool child under --pool process)."""
    time.sleep(seconds)
    return os.getpid()


@task(max_attempts=3)
def poison(log_path: str) -> None:
    """Kill the process that runs it, on every attempt, after noting its pid."""
    append_line(log_path, str(os.getpid()))
    os._exit(17)


@task
def until_lease_lost(ctx: Any, seconds: float) -> bool:
    """True if ctx.lease_lost turned within `seconds`, without a checkpoint."""
    return lease_lost_within(ctx, seconds)
