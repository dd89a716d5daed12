"""Worker settings: one frozen dataclass, passed in by the CLI or by the user's code."""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
from typing import Literal

from taskring.protocol import DEFAULT_LIMITS
from taskring.security import CurveClientConfig
from taskring.workers.errors import WorkerConfigError

# Tasks a worker holds at most, running and prefetched: every held lease must fit
# in one READY or HEARTBEAT, which carry at most max_batch pairs.
MAX_HELD = DEFAULT_LIMITS.max_batch


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a worker connects, what it runs and how it behaves when things go wrong.

    heartbeat_s and liveness apply until the broker's WELCOME, which carries
    the broker's own values; from then on the broker's values rule, because
    the broker is the peer that judges this worker dead.
    """

    endpoint: str = "tcp://127.0.0.1:5555"
    modules: tuple[str, ...] = ()
    concurrency: int = 4
    # Tasks held beyond those running, queued in this process: the next task is
    # here when a slot frees, instead of a broker round trip (and, with full
    # durability, a WAL sync) later. None: as many as `concurrency`, within the
    # limit of MAX_HELD (`prefetched`). An attempt lost with this worker while
    # its task likely waited here is spared, within a cap (broker/server.py,
    # _leases_lost and _retry).
    prefetch: int | None = None
    pool: Literal["thread", "process"] = "thread"
    name: str | None = None  # the ZeroMQ identity and ring key; default f"{host}-{pid}"
    heartbeat_s: float = 1.0
    liveness: int = 3
    reconnect_max_s: float = 8.0
    # On stop: how long running tasks may finish, then how long to wait for the
    # broker's ACKs. `taskring worker` repeats both defaults (tests/unit/test_cli.py).
    drain_timeout_s: float = 30.0
    flush_timeout_s: float = 5.0
    start_method: Literal["spawn", "forkserver"] = "spawn"  # process pool only
    journal: str | None = None  # append what the broker ACKed here (for taskring verify)
    curve: CurveClientConfig | None = None  # the broker's public key and this worker's keys

    def __post_init__(self) -> None:
        if self.pool not in ("thread", "process"):
            raise WorkerConfigError(f"pool must be 'thread' or 'process', not {self.pool!r}")
        if not 1 <= self.concurrency <= MAX_HELD:
            raise WorkerConfigError(f"concurrency must be 1..{MAX_HELD}, not {self.concurrency}")
        if not 0 <= self.prefetched <= MAX_HELD - self.concurrency:
            raise WorkerConfigError(
                f"prefetch must be 0..{MAX_HELD - self.concurrency} (concurrency + prefetch "
                f"at most {MAX_HELD}), not {self.prefetch}"
            )
        if not self.heartbeat_s > 0 or self.liveness < 1 or not self.reconnect_max_s > 0:
            raise WorkerConfigError("heartbeat_s and reconnect_max_s must be > 0, liveness >= 1")
        if self.drain_timeout_s < 0 or self.flush_timeout_s < 0:
            raise WorkerConfigError("drain_timeout_s and flush_timeout_s must be >= 0")
        if self.start_method not in ("spawn", "forkserver"):
            # fork would copy the parent's ZeroMQ context and sockets into the child.
            raise WorkerConfigError("start_method must be 'spawn' or 'forkserver'")
        if self.name is not None and not 0 < len(self.name.encode()) <= 200:
            raise WorkerConfigError("name must be 1..200 bytes of UTF-8")
        if isinstance(self.modules, str):
            raise WorkerConfigError("modules must be a tuple of module names, not a string")

    @property
    def prefetched(self) -> int:
        """Tasks held waiting beyond those running: `prefetch`, or its default."""
        if self.prefetch is None:
            return min(self.concurrency, MAX_HELD - self.concurrency)
        return self.prefetch

    @property
    def capacity(self) -> int:
        """Tasks this worker holds at most, as READY announces it: running plus prefetched."""
        return self.concurrency + self.prefetched

    def worker_name(self) -> str:
        """The name this worker registers under: `name`, or f"{host}-{pid}-{4 hex digits}".

        The random part keeps apart the workers of containers that share the
        host's name and all run as pid 1: of two live workers of one name, the
        broker would keep one and stop the other (name-taken).
        """
        return self.name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
