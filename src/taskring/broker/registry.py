"""Live workers: who they are, what they hold, when they were last heard."""

from __future__ import annotations

import dataclasses

from taskring.broker.jobs import Lease


@dataclasses.dataclass(slots=True, eq=False)
class WorkerState:
    name: str
    identity: bytes
    capacity: int
    concurrency: int  # of its capacity, how many it runs at once
    tasks: dict[str, int]  # registered names -> default max_attempts
    host: str
    pid: int
    pool: str
    incarnation: str
    last_heard: float
    last_sent: float
    registered_at: float
    dseq: int = 0  # TASK messages sent in this registration
    leases: dict[int, Lease] = dataclasses.field(default_factory=dict)
    # [id, attempt] pairs the worker reports in `held` that are not its leases here: a
    # superseded attempt it still runs, or a result it has not had acknowledged yet.
    # They fill its slots as much as leases do: without counting them, a worker back
    # from a freeze was sent tasks it had to refuse, and each refusal cost an attempt,
    # so queued tasks were dead-lettered within milliseconds (tests/chaos/test_crashes.py).
    foreign: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    # Results acknowledged to this registration that its heartbeats may still report: a
    # HEARTBEAT sent before the worker read our ACK lists them as held. They are not
    # foreign: every TASK we send after the ACK reaches the worker behind it, when the
    # slot is free again. Counting them stalled dispatch for a whole heartbeat interval
    # (bench/throughput.py showed 0.8 s without a single completion).
    acked: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    # Leases cancelled while the worker may still run them, with the dseq of the TASK
    # that carried each. One whose TASK is still in flight is not in `held` yet, but the
    # worker will run it: its slot stays taken until the worker has seen the TASK and
    # no longer holds it, or the task's stale RESULT is answered.
    cancelled: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)

    # Stopping: gets nothing new, finishes what it runs, hands back what it has not started.
    draining: bool = False

    @property
    def held(self) -> int:
        return len(self.leases) + len(self.foreign)

    @property
    def credit(self) -> int:
        if self.draining:
            return 0
        return self.capacity - self.held

    def may_hold(self, key: tuple[int, int]) -> bool:
        """Whether the worker may still hold this (id, attempt) as something not leased
        to it: reported foreign, or a result ACKed that it may not have heard of yet."""
        return key in self.foreign or key in self.acked

    def update_foreign(self, held: set[tuple[int, int]], dseq: int) -> None:
        """From a READY's or HEARTBEAT's `held` and `dseq`, once the leases it claims are
        settled."""
        self.acked &= held  # a result no longer reported: the worker has read its ACK
        self.cancelled = {k: d for k, d in self.cancelled.items() if k in held or d > dseq}
        leased = {(lease.job.id, lease.job.attempt) for lease in self.leases.values()}
        self.foreign = (held | self.cancelled.keys()) - leased - self.acked

    def lease_cancelled(self, key: tuple[int, int], dseq: int) -> None:
        """A lease ended by a CANCEL: the worker runs the task until it hears."""
        self.cancelled[key] = dseq
        self.foreign.add(key)

    def results_acked(self, keys: set[tuple[int, int]]) -> None:
        """Outcomes of one RESULT, answered by an ACK that goes out this turn."""
        self.foreign -= keys
        self.acked |= keys
        for key in keys & self.cancelled.keys():
            del self.cancelled[key]
