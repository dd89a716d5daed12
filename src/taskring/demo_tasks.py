"""Tasks for `taskring demo` (and for trying taskring by hand).

taskring worker taskring.demo_tasks
taskring submit demo.add 1 2 --wait
taskring submit demo.crunch 200000 --wait
"""

from __future__ import annotations

import hashlib
from typing import Any

from taskring.registry import task


@task(name="demo.add")
def add(a: int, b: int) -> int:
    return a + b


@task(name="demo.word_count")
def word_count(user: int, text: str) -> dict[str, int]:
    """Count words; the user id only makes a routing key."""
    return {"user": user, "words": len(text.split())}


@task(name="demo.digest")
def digest(user: int, data: str, rounds: int = 100) -> str:
    """blake2b applied `rounds` times: a little CPU per task."""
    value = data.encode()
    for _ in range(rounds):
        value = hashlib.blake2b(value, digest_size=16).digest()
    return value.hex()


@task(name="demo.crunch")
def crunch(ctx: Any, n: int, every: int = 10_000) -> int:
    """Sum of i*i for i < n, saving a checkpoint every `every` steps.

    Killed half way, the next attempt starts from the last checkpoint
    (ctx.state) instead of from zero.
    """
    state = ctx.state or {"i": 0, "total": 0}
    i, total = int(state["i"]), int(state["total"])
    while i < n:
        stop = min(n, i + every)
        total += sum(k * k for k in range(i, stop))
        i = stop
        if i < n:
            ctx.checkpoint({"i": i, "total": total})
    return total
