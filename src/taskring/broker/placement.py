"""Which worker gets which queued job: the hash ring, credit, task names and key affinity.

A job goes only to a worker that registered its task name. A job with a key
goes to the key's owner among those workers and waits for it when the owner
is busy: the key is a promise of affinity (warm caches, local state). A job
without a key is placed by bounded loads: from the owner of its id,
clockwise to the first worker with credit that runs its name, so no worker
ever holds more than it announced and an idle worker never waits behind a
busy one. A job whose name no live worker runs is let go (it stays queued
in the log), and so is a job past the backlog kept in memory for one busy
owner or one busy name; the queue is read again from the log when the
workers change or such a backlog drains, so a long backlog of one kind
never holds up the others.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping

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
        # Jobs set aside in memory: keyed ones awaiting their busy owner, by worker,
        # and keyless ones whose name only busy workers run, by task name.
        self.parked: dict[str, collections.deque[Job]] = {}
        self.waiting: dict[str, collections.deque[Job]] = {}
        self.parked_limit = parked_limit  # jobs set aside in all; a quarter of it per group
        self._names: dict[str, frozenset[str]] = {}  # worker -> the task names it runs
        self._everywhere: frozenset[str] = frozenset()  # names every worker on the ring runs
        self._anywhere: frozenset[str] = frozenset()
        # ("owner", worker) or ("name", task name) of jobs let go: they stay queued in the
        # log, and are read again when that group's backlog drains or the workers change.
        self._let_go: set[tuple[str, str]] = set()
        self._reread_due = False
        # Ids of cancelled jobs that may still be in memory: skipped when they come up.
        self._forgotten: set[int] = set()

    def join(self, name: str, capacity: int, tasks: Iterable[str]) -> None:
        if name in self.ring:
            self.ring.remove(name)
        self.ring.add(name, weight=min(capacity, MAX_RING_WEIGHT))
        self._names[name] = frozenset(tasks)
        self._membership_changed()

    def leave(self, name: str) -> None:
        if name in self.ring:
            self.ring.remove(name)
        self._names.pop(name, None)
        self._membership_changed()

    def requeue(self, job: Job) -> None:
        self.queue.add_back(job)

    def forget(self, task_id: int) -> None:
        """A queued job left the queue in the log (cancelled): never place it."""
        if not self.queue.only_in_log(task_id):
            self._forgotten.add(task_id)
        if len(self._forgotten) > max(1, self.parked_limit // 4):
            # Mostly jobs let go, which never come up to be skipped: a read of the
            # queue from the log, where they are cancelled, forgets them all.
            self._reread_due = True

    def _membership_changed(self) -> None:
        names = list(self._names.values())
        self._everywhere = frozenset.intersection(*names) if names else frozenset()
        self._anywhere = frozenset().union(*names)
        # Keyed jobs may have a new owner, and waiting ones new workers.
        for held in (self.parked, self.waiting):
            for jobs in held.values():
                while jobs:
                    self.queue.add_back(jobs.pop())
            held.clear()
        if self._let_go:
            # Jobs were let go unplaced (the log still has them): read the queue again
            # at the next placement, when a new worker may run them or own their keys.
            self._reread_due = True

    def place(self, workers: Mapping[str, WorkerState]) -> list[tuple[Job, WorkerState]]:
        """Jobs to lease now, at most one per unit of credit."""
        if self._reread_due:
            self._reread()
        credit = sum(max(0, w.credit) for w in workers.values())
        if credit <= 0:
            return []
        if not self.queue and not any(self.parked.values()) and not any(self.waiting.values()):
            return []  # most turns of a quiet broker: a result, a heartbeat
        placed: list[tuple[Job, WorkerState]] = []
        spare = {name: w.credit for name, w in workers.items()}
        # Jobs set aside go first: they have waited longest.
        for kind, groups in (("owner", self.parked), ("name", self.waiting)):
            for group, jobs in groups.items():
                pick = self._picker(kind, group, spare)
                while jobs:
                    if jobs[0].id in self._forgotten:
                        self._forgotten.discard(jobs.popleft().id)
                        continue
                    if (owner := pick(jobs[0])) is None:
                        break
                    placed.append((jobs.popleft(), workers[owner]))
                    spare[owner] -= 1
                    credit -= 1
                if not jobs and (kind, group) in self._let_go:
                    # Its backlog drained: read the jobs let go again, next turn, once
                    # this turn's leases are in the log.
                    self._reread_due = True
        aside = sum(map(len, self.parked.values())) + sum(map(len, self.waiting.values()))
        cap = max(1, self.parked_limit // 4)
        full: set[str] = set()  # names whose runners all lack room this turn
        let_go = 0  # bounds this turn's work, as `aside` bounds memory
        has_room: Callable[[str], bool] = lambda name: spare[name] > 0  # noqa: E731
        while credit > 0 and let_go < self.parked_limit:
            job = self.queue.pop()
            if job is None:
                break
            if job.id in self._forgotten:
                self._forgotten.discard(job.id)
                continue
            if job.name in self._everywhere:  # the common case: any worker runs it
                if job.key is not None:
                    owner = self.ring.owner(job.key)
                else:
                    owner = self.ring.assign_point(job.ring_point, has_room)
                if owner is None:  # no workers, or none with room
                    self.queue.add_back(job)
                    break
            elif job.name not in self._anywhere or (job.key is None and job.name in full):
                owner = None
            else:
                owner = self._runner(job, spare)
                if owner is None:
                    full.add(job.name)
            if owner is not None and spare[owner] > 0:
                placed.append((job, workers[owner]))
                spare[owner] -= 1
                credit -= 1
                continue
            # Set aside: a keyed job for its busy owner, a keyless one by its name.
            kind, group = ("owner", owner) if owner is not None else ("name", job.name)
            groups = self.parked if owner is not None else self.waiting
            if job.name in self._anywhere and aside < self.parked_limit:
                jobs = groups.setdefault(group, collections.deque())
                if len(jobs) < cap:
                    jobs.append(job)
                    aside += 1
                    continue
            # Nobody runs it, or its backlog is long: it stays queued in the log.
            self._let_go.add((kind, group))
            let_go += 1
        return placed

    def _picker(
        self, kind: str, group: str, spare: Mapping[str, int]
    ) -> Callable[[Job], str | None]:
        """Where a job set aside in this group can go now, if anywhere."""
        if kind == "owner":
            return lambda job: group if spare[group] > 0 else None
        room = self._room_for(group, spare)
        return lambda job: self.ring.assign_point(job.ring_point, room)

    def _reread(self) -> None:
        """Read the queue again from the log, jobs set aside and let go included.

        Only at the start of a turn's placement: a lease granted earlier in the
        same turn is not in the log yet, and its job would be read as queued.
        """
        self._reread_due = False
        self._forgotten.clear()  # the log has them cancelled: the read skips them
        self._let_go.clear()
        self.parked.clear()
        self.waiting.clear()
        self.queue.rewind()

    def _room_for(self, task_name: str, spare: Mapping[str, int]) -> Callable[[str], bool]:
        names = self._names
        return lambda worker: spare[worker] > 0 and task_name in names[worker]

    def _runner(self, job: Job, spare: Mapping[str, int]) -> str | None:
        """For a job whose name only some workers run: its key's owner among them, or
        the first of them clockwise with room; None when all of those are busy."""
        if job.key is not None:
            return self.ring.assign(job.key, lambda worker: job.name in self._names[worker])
        return self.ring.assign_point(job.ring_point, self._room_for(job.name, spare))
