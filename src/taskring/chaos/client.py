"""A chaos client process: submits a random mix of tasks and journals what was acknowledged.

Run as `python -m taskring.chaos client ...` by the chaos runner. Each
acknowledged submit appends one JSON line `{"ids": [...], "name": ...,
"client": ..., "at": ...}` to the journal, written and flushed before the
next submit, so the journal never claims an id the broker did not return.
Now and then it cancels one of its recent tasks instead, and journals the
answer as `{"cancel": id, "state": ...}`.

The broker is killed now and then. A request is resent while the broker is
away (the broker de-duplicates the resends); if the client's timeout passes
first, BrokerUnavailable ends that call and the next submit is a new
request: the task of the unanswered one may exist, unacknowledged, which is
correct (the checker requires only what was acknowledged).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import IO, Any

from taskring.client import Client
from taskring.errors import BrokerUnavailable

log = logging.getLogger(__name__)

CANCEL_SHARE = 0.05  # of the client's requests: enough to meet running and queued tasks


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClientPlan:
    name: str
    endpoint: str
    journal: str
    start_log: str
    seed: int
    duration_s: float
    keys: int
    timeout_s: float


class _Journal:
    def __init__(self, path: str, client: str) -> None:
        self.client = client
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file: IO[str] = os.fdopen(fd, "a", buffering=1)

    def acknowledged(self, name: str, ids: Sequence[int]) -> None:
        self._write({"ids": list(ids), "name": name})

    def cancelled(self, task_id: int, state: str | None) -> None:
        self._write({"cancel": task_id, "state": state})

    def _write(self, record: dict[str, Any]) -> None:
        record |= {"client": self.client, "at": time.time_ns() / 1e9}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def run_client(plan: ClientPlan, stop: threading.Event | None = None) -> int:
    """Submit until `duration_s` passes or `stop` is set; returns the tasks acknowledged."""
    stop = stop or threading.Event()
    rng = random.Random(plan.seed)
    journal = _Journal(plan.journal, plan.name)
    acknowledged = unavailable = 0
    # Ids it may cancel. The newest long task apart: most others have finished
    # by then, and cancels would meet few running tasks.
    recent: collections.deque[int] = collections.deque(maxlen=200)
    recent_long: collections.deque[int] = collections.deque(maxlen=1)
    deadline = time.monotonic() + plan.duration_s

    def key(n: int) -> str | None:
        return None if n % 5 == 0 else f"key-{n % plan.keys}"

    try:
        with Client(plan.endpoint, timeout_s=plan.timeout_s) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                n = rng.randrange(1_000_000)
                roll = rng.random()
                try:
                    if recent and rng.random() < CANCEL_SHARE:
                        # The newest long task is likely running still.
                        long_one = recent_long and roll < 0.5
                        victim = recent_long[-1] if long_one else rng.choice(recent)
                        journal.cancelled(victim, client.cancel([victim])[victim])
                        continue
                    if roll < 0.5:
                        name = "chaos.short"
                        ids = [client.submit(name, n, rng.uniform(0, 20), key=key(n)).id]
                    elif roll < 0.92:
                        name = "chaos.short"
                        batch = [[n + i, rng.uniform(0, 10)] for i in range(rng.randint(2, 40))]
                        ids = client.submit_many(name, batch, key=lambda args: key(args[0]))
                    else:
                        name = "chaos.long"
                        steps = rng.randint(10, 30)  # 1-3 s at 0.1 s a step
                        ids = [client.submit(name, steps, 0.1, plan.start_log, key=key(n)).id]
                except BrokerUnavailable as e:
                    unavailable += 1
                    log.warning("%s: %s; the next submit is a new request", plan.name, e)
                    continue
                journal.acknowledged(name, ids)
                acknowledged += len(ids)
                (recent_long if name == "chaos.long" else recent).extend(ids)
                stop.wait(rng.uniform(0.02, 0.15))
    finally:
        journal.close()
    log.info(
        "%s: %d tasks acknowledged, %d submits unanswered", plan.name, acknowledged, unavailable
    )
    return acknowledged


def main(plan: ClientPlan) -> None:
    """The process: stop on SIGTERM (the handler only sets a flag)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run_client(plan, stop)


def plan_args(plan: ClientPlan) -> list[str]:
    """The command line that runs `plan` in a child process."""
    fields: dict[str, Any] = dataclasses.asdict(plan)
    args = ["-m", "taskring.chaos", "client"]
    for field, value in fields.items():
        args += [f"--{field.replace('_', '-')}", str(value)]
    return args
