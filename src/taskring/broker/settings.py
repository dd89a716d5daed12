"""Broker settings: one frozen dataclass, filled in by the CLI or by tests."""

from __future__ import annotations

import dataclasses

from taskring.protocol import DEFAULT_LIMITS, Limits
from taskring.security import CurveServerConfig


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BrokerSettings:
    endpoint: str = "tcp://127.0.0.1:5555"
    db_path: str = "taskring.db"
    heartbeat_s: float = 1.0
    liveness: int = 3  # heartbeats a worker may miss before it is declared dead
    synchronous: str = "full"  # SQLite synchronous: "full" survives power loss, "normal" not
    limits: Limits = DEFAULT_LIMITS
    queue_window: int = 10_000  # queued tasks kept in memory; the rest wait in SQLite
    max_messages_per_turn: int = 2_000  # bounds a turn's latency under a flood
    # A SUBMIT carries up to max_batch tasks: 2,000 of them would be a turn of
    # millions of inserts, and no heartbeat would leave meanwhile.
    max_submits_per_turn: int = 4
    default_max_attempts: int = 3
    curve: CurveServerConfig | None = None  # encrypt, and admit only allowed keys

    @property
    def expiry_s(self) -> float:
        return self.heartbeat_s * self.liveness
