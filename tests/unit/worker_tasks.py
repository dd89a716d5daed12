"""Tasks for the worker unit tests.

A module of its own so that process-pool children can import it by name
("tests.unit.worker_tasks"). Gates are threading.Events: they only work in
the thread pool, where the test and the task share a process.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from tests.support.lease_polling import lease_lost_within

from taskring.workers import TaskContext, task

MODULE = __name__
_gates: dict[str, threading.Event] = {}
_lock = threading.Lock()


def gate(name: str) -> threading.Event:
    with _lock:
        return _gates.setdefault(name, threading.Event())


def release_all() -> None:
    """Open every gate, so no test leaves a task thread blocked behind it."""
    with _lock:
        for event in _gates.values():
            event.set()
        _gates.clear()


@task(name="wt.add")
def add(a: int, b: int) -> int:
    return a + b


@task(name="wt.file_gate")
def file_gate(path: str) -> str:
    """A gate that works from a child process too: marks PATH.started, waits for PATH."""
    with open(path + ".started", "w"):
        pass
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return path


@task(name="wt.wait")
def wait_for(name: str) -> str:
    gate(f"{name}:started").set()
    gate(name).wait(30)
    return name


@task(name="wt.busy")
def busy(seconds: float) -> int:
    """Hold the GIL-bound interpreter in pure Python, never sleeping."""
    deadline = time.monotonic() + seconds
    turns = 0
    while time.monotonic() < deadline:
        turns += 1
    return turns


@task(name="wt.checkpoint")
def checkpoint_then_flag(ctx: TaskContext, flag: str) -> list[Any]:
    ctx.checkpoint({"step": 1})
    gate(flag).set()
    return [ctx.state, ctx.number, ctx.lease_lost]


@task(name="wt.resume")
def resume(ctx: TaskContext) -> dict[str, Any]:
    seen = ctx.state
    ctx.checkpoint({"i": seen["i"] + 1 if seen else 0})
    return {"seen": seen, "state": ctx.state, "lease_lost": ctx.lease_lost}


@task(name="wt.bad_state")
def bad_state(ctx: TaskContext) -> None:
    ctx.checkpoint({1, 2})


@task(name="wt.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@task(name="wt.unpackable")
def unpackable() -> object:
    return object()


@task(name="wt.async")
async def coroutine() -> int:
    return 1


@task(name="wt.exit")
def hard_exit(code: int) -> None:
    os._exit(code)


@task(name="wt.until_stale")
def until_stale(ctx: TaskContext, seconds: float) -> bool:
    """True if ctx.lease_lost turned within `seconds`, without a checkpoint."""
    return lease_lost_within(ctx, seconds)


@task(name="wt.poll_while_checkpointing")
def poll_while_checkpointing(ctx: TaskContext, n: int) -> str:
    """Checkpoint n times while a helper thread polls ctx.lease_lost all along."""
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            ctx.lease_lost  # noqa: B018 - the read is the point: it asks the worker
            time.sleep(0.001)

    helper = threading.Thread(target=poll)
    helper.start()
    try:
        for i in range(n):
            ctx.checkpoint(i)
            time.sleep(0.02)
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        done.set()
        helper.join(2)
