"""`python -m taskring ...` with a timestamp at every hop and step, for latency_trace.py.

    python bench/traced.py broker --endpoint ... (the arguments of `python -m taskring`)

The stamps come from patching taskring in this process only; nothing in
src/ knows about them. Every message a process sends or receives, the
broker's commit and the sync of that commit, and a task thread's start and
end are stamped with CLOCK_MONOTONIC, which all processes on the machine
share, and written at exit to $TASKRING_TRACE_DIR/<role>-<pid>.txt, one
"nanoseconds label" line each. A stamp costs about a microsecond.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EVENTS: list[tuple[int, str]] = []


def mark(label: str) -> None:
    EVENTS.append((time.monotonic_ns(), label))


def command_of(parts: Sequence[bytes]) -> str:
    """The command frame of a message, whichever side of the ROUTER it is on."""
    for frame in parts[:3]:
        if frame.isalpha() and frame.isupper() and 3 <= len(frame) <= 10:
            return frame.decode()
    return "?"


def stamped(label: str, fn: Callable[..., Any], *, after: bool = False) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not after:
            mark(label)
        try:
            return fn(*args, **kwargs)
        finally:
            if after:
                mark(label)

    return wrapper


def install(role: str, out_dir: Path | None) -> None:
    """Stamp the messages of this process, and its role's own steps."""
    from taskring import protocol

    send, recv = protocol.send_frames, protocol.recv_frames

    def send_frames(socket: Any, parts: Sequence[bytes], flags: int = 0) -> None:
        mark(f"{role} sends {command_of(parts)}")
        send(socket, parts, flags)

    def recv_frames(socket: Any, flags: int = 0) -> list[bytes]:
        parts: list[bytes] = recv(socket, flags)
        mark(f"{role} receives {command_of(parts)}")
        return parts

    protocol.send_frames = send_frames
    protocol.recv_frames = recv_frames
    if role == "broker":
        from taskring.broker import durability
        from taskring.broker.server import Broker

        # _seal_turn runs right after the turn's COMMIT returned.
        Broker._seal_turn = stamped("broker committed", Broker._seal_turn)
        durability._datasync = stamped("broker synced", durability._datasync, after=True)
    elif role == "worker":
        from taskring.workers import pools

        ends = stamped("task thread ends", pools.run_assignment, after=True)
        pools.run_assignment = stamped("task thread starts", ends)
    if out_dir is not None:
        atexit.register(dump, out_dir / f"{role}-{os.getpid()}.txt")


def dump(path: Path) -> None:
    path.write_text("".join(f"{ns} {label}\n" for ns, label in EVENTS))


def read(out_dir: Path) -> list[tuple[int, str]]:
    """Every stamp of every process, in time order."""
    events = []
    for path in out_dir.glob("*.txt"):
        for line in path.read_text().splitlines():
            ns, label = line.split(" ", 1)
            events.append((int(ns), label))
    return sorted(events)


def main() -> None:
    role = sys.argv[1]
    install(role, Path(os.environ["TASKRING_TRACE_DIR"]))
    from taskring.cli import main as taskring_main

    taskring_main()  # reads its arguments from sys.argv[1:], as `python -m taskring` does


if __name__ == "__main__":
    main()
