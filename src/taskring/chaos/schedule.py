"""What a chaos run does and when: its settings and a schedule drawn up front from the seed.

The schedule is a plain list made before anything starts, so a seed names a
run: print it, and `taskring chaos --seed N` (or `pytest --chaos-seed N`)
replays the same faults at the same moments (the processes' own timing still
varies, as it would in any replay).
"""

from __future__ import annotations

import dataclasses
import random

BROKER = "broker"
KILL = "kill"  # SIGKILL, then start again (same name, same database) after `pause_s`
STOP = "stop"  # SIGSTOP, then SIGCONT after `pause_s`
TERM = "term"  # SIGTERM a worker: it drains and leaves; start again `pause_s` after it exits
# Open the live log read-write, read it and close it, as a sqlite3 shell would.
# A broker that had dropped SQLite's lock on its database lost the WAL to such
# a reader, and with it every task acknowledged after (broker/durability.py).
READ = "read"
LOG = "log"  # the target of READ: the task log, not a process


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChaosConfig:
    seed: int
    duration_s: float = 45.0  # of faults and submits; the drain comes after
    workers: int = 3
    clients: int = 2
    concurrency: int = 4  # task threads per worker
    heartbeat_s: float = 0.2
    liveness: int = 3
    keys: int = 16  # placement keys the clients spread their tasks over
    client_timeout_s: float = 20.0  # a client's request timeout: it rides out broker outages
    drain_timeout_s: float = 90.0  # after the faults, how long tasks get to finish
    startup_timeout_s: float = 30.0
    synchronous: str = "full"  # the broker's --synchronous

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.workers < 1 or self.clients < 1 or self.keys < 1:
            raise ValueError("duration_s, workers, clients and keys must be positive")
        if self.synchronous not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")

    @property
    def worker_names(self) -> list[str]:
        return [f"w{i + 1}" for i in range(self.workers)]


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    at_s: float  # seconds after the clients started
    action: str  # KILL, STOP, TERM or READ
    target: str  # BROKER or a worker name (always a worker for TERM; LOG for READ)
    pause_s: float  # until the restart (KILL; TERM: after it exited) or the SIGCONT (STOP)

    def describe(self) -> str:
        if self.action == KILL:
            return f"kill -9 {self.target}, restart after {self.pause_s:.2f} s"
        if self.action == TERM:
            return f"SIGTERM {self.target} (it drains), restart {self.pause_s:.2f} s after it exits"
        if self.action == READ:
            return "another process opens the live log, reads it and closes it"
        return f"SIGSTOP {self.target} for {self.pause_s:.2f} s"


def make_schedule(config: ChaosConfig) -> list[Fault]:
    """Faults every 1-4 s: the broker killed (30%), a worker killed (50%) or paused (20%);
    every 6-12 s, from 5-10 s on, a worker stopped gracefully (SIGTERM); and every
    2-6 s, from 1-3 s on, the live log read by another process."""
    rng = random.Random(config.seed)
    faults: list[Fault] = []
    at = rng.uniform(1.0, 3.0)
    while at < config.duration_s - 1.0:
        roll = rng.random()
        if roll < 0.3:
            faults.append(Fault(round(at, 2), KILL, BROKER, round(rng.uniform(0.1, 1.5), 2)))
        else:
            action = KILL if roll < 0.8 else STOP
            worker = rng.choice(config.worker_names)
            faults.append(Fault(round(at, 2), action, worker, round(rng.uniform(0.1, 1.5), 2)))
        at += rng.uniform(1.0, 4.0)
    # Graceful stops come from a stream of their own, so that a seed's kills and
    # pauses stay the ones it drew before graceful stops were part of a run.
    drains = random.Random(f"{config.seed}:term")
    at = drains.uniform(5.0, 10.0)
    while at < config.duration_s - 1.0:
        worker = drains.choice(config.worker_names)
        faults.append(Fault(round(at, 2), TERM, worker, round(drains.uniform(0.1, 1.0), 2)))
        at += drains.uniform(6.0, 12.0)
    reads = random.Random(f"{config.seed}:read")  # a stream of their own, as above
    at = reads.uniform(1.0, 3.0)
    while at < config.duration_s - 1.0:
        faults.append(Fault(round(at, 2), READ, LOG, 0.0))
        at += reads.uniform(2.0, 6.0)
    faults.sort(key=lambda fault: fault.at_s)
    return faults


def client_seed(config: ChaosConfig, index: int) -> int:
    """Each client's own seed, derived from the run's."""
    return config.seed * 1000 + index
