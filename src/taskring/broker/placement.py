"""Which worker gets which queued job: the hash ring, credit and key affinity.

A job with a key goes to the key's owner on the ring and waits for it when
the owner is busy: the key is a promise of affinity (warm caches, local
state). A job without a key is placed by bounded loads: from the owner of
its id, clockwise to the first worker with credit, so no worker ever holds
more than it announced and an idle worker never waits behind a busy one.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping

from taskring.broker.hashring import HashRing
from taskring.broker.jobs import Job, TaskQueue
from taskring.broker.registry import WorkerState

# Ring weight is capped: a worker of capacity 1000 would otherwise put 320,000
# points on the ring and stall the loop for a second on every READY (found by
# tests/integration/test_fuzz.py). Past the cap, credit still bounds its load.
MAX_RING_WEIGHT = 16


class Placement:
    def __init__(self, queue: TaskQueue, parked_limit: int) -> None:
        self.ring = HashRing()
        self.queue = queue
        self.parked: dict[str, collections.deque[Job]] = {}  # keyed jobs awaiting their owner
        self.parked_limit = parked_limit

    def join(self, name: str, capacity: int) -> None:
        if name in self.ring:
            self.ring.remove(name)
        self.ring.add(name, weight=min(capacity, MAX_RING_WEIGHT))
        self._unpark_all()

    def leave(self, name: str) -> None:
        if name in self.ring:
            self.ring.remove(name)
        self._unpark_all()

    def requeue(self, job: Job) -> None:
        self.queue.add_back(job)

    def _unpark_all(self) -> None:
        """Membership changed, so keyed jobs may have a new owner."""
        for jobs in self.parked.values():
            while jobs:
                self.queue.add_back(jobs.pop())
        self.parked.clear()

    def place(self, workers: Mapping[str, WorkerState]) -> list[tuple[Job, WorkerState]]:
        """Jobs to lease now, at most one per unit of credit."""
        credit = sum(max(0, w.credit) for w in workers.values())
        if credit <= 0:
            return []
        placed: list[tuple[Job, WorkerState]] = []
        spare = {name: w.credit for name, w in workers.items()}
        for name, parked in self.parked.items():
            while parked and spare[name] > 0:
                placed.append((parked.popleft(), workers[name]))
                spare[name] -= 1
                credit -= 1
        parked_total = sum(len(q) for q in self.parked.values())
        has_room: Callable[[str], bool] = lambda name: spare[name] > 0  # noqa: E731
        while credit > 0 and parked_total < self.parked_limit:
            job = self.queue.pop()
            if job is None:
                break
            if job.key is not None:
                owner = self.ring.owner(job.key)
                if owner is not None and spare[owner] <= 0:
                    self.parked.setdefault(owner, collections.deque()).append(job)
                    parked_total += 1
                    continue
            else:
                owner = self.ring.assign_point(job.ring_point, has_room)
            if owner is None:  # no workers, or none with room
                self.queue.add_back(job)
                break
            placed.append((job, workers[owner]))
            spare[owner] -= 1
            credit -= 1
        return placed
