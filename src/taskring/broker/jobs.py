"""Tasks as the broker holds them in memory, and the queue of tasks waiting for a worker.

Only a window of the queued tasks lives in Python objects; the rest stay in
SQLite and are read in pages as the window drains, so a broker with a
million queued tasks needs memory for ten thousand.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator


@dataclasses.dataclass(slots=True, eq=False)
class Job:
    """A queued or running task: what dispatch and requeue need, no more."""

    id: int
    name: str
    payload: bytes
    key: str | None
    attempt: int  # leases granted so far
    max_attempts: int
    checkpoint: bytes | None
    checkpoint_no: int
    created_at: float
    spared: int  # attempts not counted against max_attempts: they never started

    @property
    def ring_point(self) -> int:
        """Where a job without a key starts its walk around the ring: its id, spread.

        Multiplying by 2**64 / golden ratio (Fibonacci hashing) scatters
        consecutive ids evenly over the ring, for a fraction of a hash's cost.
        """
        return (self.id * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF


@dataclasses.dataclass(slots=True, eq=False)
class Lease:
    """One attempt of a job held by a worker; `attempt` is the fencing token."""

    job: Job
    worker: str
    dseq: int  # TASK message that carried it; 0 for a lease adopted or loaded at start


class TaskQueue:
    """FIFO of jobs in memory, backed by SQLite beyond `window` jobs.

    Invariant: while not `spilled`, every queued job is in memory; while
    spilled, the jobs with id above `cursor` are only in SQLite and are
    loaded in id order by `refill`.
    """

    def __init__(self, window: int, load: Callable[[int, int], Iterable[Job]]) -> None:
        self.window = window
        self._load = load
        self._jobs: collections.deque[Job] = collections.deque()
        self.cursor = 0
        self.spilled = True  # unknown until the first refill looks

    def __len__(self) -> int:
        return len(self._jobs)

    def __bool__(self) -> bool:
        return bool(self._jobs) or self.spilled

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs)

    def add_new(self, job: Job) -> None:
        """A freshly submitted job (ids only grow)."""
        if self.spilled or len(self._jobs) >= self.window:
            self.spilled = True  # it is in SQLite; refill reads it in order
            return
        self._jobs.append(job)
        self.cursor = job.id

    def only_in_log(self, job_id: int) -> bool:
        """True if this queued job is not in memory: refill will read it from SQLite."""
        return self.spilled and job_id > self.cursor

    def add_back(self, job: Job) -> None:
        """A job returning from a worker: it goes first, it has waited longest."""
        if self.only_in_log(job.id):
            return  # still unread in SQLite (a lease loaded at start): refill brings it once
        self._jobs.appendleft(job)
        # Every job in memory must be at or below the cursor, or a refill after the
        # queue spills would read it from SQLite again, where a lease granted this
        # turn is not written yet: one task leased twice. A job above it comes back
        # from a lease newer than the last read (loaded at start, or after a rewind).
        self.cursor = max(self.cursor, job.id)

    def pop(self) -> Job | None:
        if not self._jobs and self.spilled:
            self.refill()
        return self._jobs.popleft() if self._jobs else None

    def rewind(self) -> None:
        """Forget the jobs in memory and read the queue again from SQLite, from the start.

        For jobs that were let go unplaced (no live worker ran their name): the
        log still has them queued, in id order with everything else.
        """
        self._jobs.clear()
        self.cursor = 0
        self.spilled = True

    def refill(self) -> None:
        room = self.window - len(self._jobs)
        if not self.spilled or room <= 0:
            return
        loaded = list(self._load(self.cursor, room))
        self._jobs.extend(loaded)
        if loaded:
            self.cursor = loaded[-1].id
        if len(loaded) < room:
            self.spilled = False
