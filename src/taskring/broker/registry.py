"""Live workers: who they are, what they hold, when they were last heard."""

from __future__ import annotations

import dataclasses

from taskring.broker.jobs import Lease


@dataclasses.dataclass(slots=True, eq=False)
class WorkerState:
    name: str
    identity: bytes
    capacity: int
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

    @property
    def credit(self) -> int:
        return self.capacity - len(self.leases)
