"""The reference systems: Huey (SqliteHuey) and Dramatiq (Redis), started and waited on.

Each is optional: a reference whose package is not installed, or Dramatiq
without a redis-server on PATH, is skipped with one line in the report.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from common import READY_TIMEOUT_S, BenchError, Children, start_redis
from report import huey_durability

# Huey's consumer polls its queue every 1 ms when it is empty (its default
# starts at 0.1 s and backs off to 10 s), and results are polled every
# 0.5 ms (Result.get(blocking=True) sleeps 50 ms first): the best Huey can
# do on this machine, not a strawman.
HUEY_POLL = ["--delay", "0.001", "--max-delay", "0.001", "--backoff", "1"]
HUEY_RESULT_POLL_S = 0.0005
RESULT_TIMEOUT_S = 600.0


class References:
    """Which references run in this invocation, their durability lines and skip lines."""

    def __init__(self, wanted: set[str], work: Path, shared: Children) -> None:
        self.enabled = set(wanted)
        self.skipped: list[str] = []
        self.durability: list[str] = []
        for name in ("huey", "dramatiq"):
            if name in self.enabled and importlib.util.find_spec(name) is None:
                self.enabled.discard(name)
                self.skipped.append(
                    f"{name.capitalize()} skipped: not installed (pip install -e '.[bench]')"
                )
        if "huey" in self.enabled:
            # huey_tasks reads it at import, in this process and in the consumer.
            os.environ["BENCH_HUEY_DB"] = str(work / "huey.db")
            self.durability.append(huey_durability(work))
        if "dramatiq" in self.enabled:
            redis = start_redis(shared)
            if redis is None:
                self.enabled.discard("dramatiq")
                self.skipped.append("Dramatiq skipped: redis-server is not on PATH")
            else:
                os.environ["BENCH_REDIS_URL"] = redis[0]
                self.durability.append(
                    f"Dramatiq: Redis {redis[1]}, no fsync (appendonly no, save ''), "
                    "results in Redis"
                )


def _load(name: str, variable: str) -> ModuleType:
    """Import a reference's task module; again if its setting changed (run_all runs several)."""
    module = sys.modules.get(name)
    if module is None:
        return importlib.import_module(name)
    if os.environ[variable] != module.SETTING:
        module = importlib.reload(module)
    return module


@contextlib.contextmanager
def huey_consumer(children: Children, workers: int) -> Iterator[ModuleType]:
    """A Huey consumer with `workers` process workers, answering before this yields."""
    huey_tasks = _load("huey_tasks", "BENCH_HUEY_DB")
    huey_tasks.huey.flush()
    proc = children.start(
        "huey",
        [
            sys.executable,
            "-m",
            "huey.bin.huey_consumer",
            "huey_tasks.huey",
            "--workers",
            str(workers),
            "--worker-type",
            "process",
            *HUEY_POLL,
        ],
    )
    try:
        wait_huey(huey_tasks.noop(-1), children, READY_TIMEOUT_S)
        yield huey_tasks
    finally:
        children.stop(proc)


def wait_huey(result: Any, children: Children, timeout_s: float = RESULT_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while (value := result.get()) is None:
        if time.monotonic() > deadline:
            children.check()
            raise BenchError("Huey: a result did not arrive in time")
        time.sleep(HUEY_RESULT_POLL_S)
    return value


@contextlib.contextmanager
def dramatiq_workers(children: Children, processes: int, threads: int) -> Iterator[ModuleType]:
    """Dramatiq worker processes on the private Redis, answering before this yields."""
    dramatiq_tasks = _load("dramatiq_tasks", "BENCH_REDIS_URL")
    dramatiq_tasks.broker.client.flushall()
    proc = children.start(
        "dramatiq",
        [
            sys.executable,
            "-m",
            "dramatiq",
            "dramatiq_tasks",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--worker-shutdown-timeout",
            "5000",
        ],
    )
    try:
        dramatiq_tasks.noop.send(-1).get_result(block=True, timeout=int(READY_TIMEOUT_S * 1000))
        yield dramatiq_tasks
    finally:
        children.stop(proc)
