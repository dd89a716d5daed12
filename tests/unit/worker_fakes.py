"""A fake broker (one ROUTER socket) and a worker running in a thread, for worker tests.

Nothing here can hang a test: sockets have linger 0, every receive polls with
a timeout and fails the test with a sentence saying what never arrived.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from typing import Any

import pytest
import zmq

from taskring import protocol
from taskring.protocol import PROTOCOL_WORKER
from taskring.workers import Worker, WorkerSettings

TASKS_MODULE = "tests.unit.worker_tasks"


def assignment(
    task_id: int,
    name: str,
    *args: Any,
    attempt: int = 1,
    state: Any = None,
    number: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    packed_state = None if state is None else protocol.pack(state)
    payload = protocol.pack([list(args), kwargs])
    return protocol.assignment_body(task_id, attempt, name, payload, packed_state, number)


class FakeBroker:
    """Plays the broker's side of the worker protocol, one message at a time."""

    def __init__(self, heartbeat_s: float = 0.1, liveness: int = 3) -> None:
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker keeps its name
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.peer: bytes | None = None
        self.beating = True  # send HEARTBEAT to the worker while waiting for messages
        self.heartbeats: list[tuple[float, dict[str, Any]]] = []  # (monotonic time, body)
        self._next_beat = 0.0
        self.dseq = 0

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.destroy(linger=0)

    def send(self, command: bytes, body: dict[str, Any]) -> None:
        if self.peer is None:
            pytest.fail("the fake broker has heard from no worker yet, so it cannot send")
        self.socket.send_multipart([self.peer, PROTOCOL_WORKER, command, protocol.pack(body)])

    def _beat(self) -> None:
        now = time.monotonic()
        if self.beating and self.peer is not None and now >= self._next_beat:
            self.send(protocol.HEARTBEAT, {})
            self._next_beat = now + self.heartbeat_s

    def _next(self, deadline: float) -> tuple[bytes, dict[str, Any]] | None:
        """One message other than a worker heartbeat (those are recorded), or None."""
        while True:
            self._beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not self.socket.poll(math.ceil(min(left, self.heartbeat_s / 2) * 1000)):
                continue
            identity, proto, command, body = self.socket.recv_multipart()
            assert proto == PROTOCOL_WORKER, f"the worker sent protocol id {proto!r}"
            self.peer = identity
            decoded = protocol.unpack(body)
            if command == protocol.HEARTBEAT:
                self.heartbeats.append((time.monotonic(), decoded))
                continue
            return command, decoded

    def recv(self, command: bytes, timeout_s: float = 5.0) -> dict[str, Any]:
        """The next message, which must be `command`; fails the test otherwise."""
        got = self._next(time.monotonic() + timeout_s)
        if got is None:
            pytest.fail(f"the worker sent no {command.decode()} within {timeout_s} s")
        if got[0] != command:
            pytest.fail(
                f"expected {command.decode()} but the worker sent {got[0].decode()}: {got[1]}"
            )
        return got[1]

    def skip_to(self, command: bytes, timeout_s: float = 10.0) -> dict[str, Any]:
        """The next `command`, skipping anything else (resends still on the wire, say)."""
        deadline = time.monotonic() + timeout_s
        while (got := self._next(deadline)) is not None:
            if got[0] == command:
                return got[1]
        pytest.fail(f"the worker sent no {command.decode()} within {timeout_s} s")

    def pump(self, seconds: float) -> list[tuple[bytes, dict[str, Any]]]:
        """Everything (but heartbeats) the worker sends in the next `seconds`."""
        deadline = time.monotonic() + seconds
        messages = []
        while (got := self._next(deadline)) is not None:
            messages.append(got)
        return messages

    def welcome(self, seq: int, **extra: Any) -> None:
        heartbeat_ms = int(self.heartbeat_s * 1000)
        body = {"seq": seq, "heartbeat_ms": heartbeat_ms, "liveness": self.liveness}
        self.send(protocol.WELCOME, body | extra)

    def register(self, **extra: Any) -> dict[str, Any]:
        """Answer the next READY with a WELCOME; `extra` fields go into its body."""
        ready = self.recv(protocol.READY)
        self.welcome(ready["seq"], **extra)
        return ready

    def dispatch(self, *tasks: dict[str, Any]) -> None:
        self.dseq += 1
        self.send(protocol.TASK, {"dseq": self.dseq, "tasks": list(tasks)})

    def ack(self, seq: int, stale: list[int] | None = None) -> None:
        self.send(protocol.ACK, {"seq": seq, "stale": stale or []})

    def result(self, timeout_s: float = 5.0) -> tuple[int, dict[int, dict[str, Any]]]:
        """The next RESULT: its seq and its outcomes by task id."""
        body = self.recv(protocol.RESULT, timeout_s)
        return body["seq"], {r["id"]: r for r in body["results"]}

    def checkpoint(self, timeout_s: float = 5.0) -> tuple[int, dict[str, Any]]:
        """The next CHECKPOINT, which must carry one checkpoint: its seq and that item."""
        body = self.recv(protocol.CHECKPOINT, timeout_s)
        (item,) = body["checkpoints"]
        return body["seq"], item

    def results_acked(
        self, count: int, *, skipping: bool = False, timeout_s: float = 5.0
    ) -> dict[int, dict[str, Any]]:
        """Outcomes of `count` tasks, each RESULT ACKed as it arrives: task id -> outcome.
        With `skipping`, other messages before a RESULT (READY resends, say) are passed over."""
        done: dict[int, dict[str, Any]] = {}
        while len(done) < count:
            if skipping:
                body = self.skip_to(protocol.RESULT, timeout_s)
                seq, results = body["seq"], {r["id"]: r for r in body["results"]}
            else:
                seq, results = self.result(timeout_s)
            done.update(results)
            self.ack(seq)
        return done

    def last_held(self, after: float) -> list[list[int]]:
        """`held` of the first worker heartbeat received after monotonic time `after`."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            for at, body in self.heartbeats:
                if at > after:
                    return list(body["held"])
            self.pump(self.heartbeat_s)
        pytest.fail("the worker sent no heartbeat within 5 s")


def settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "modules": (TASKS_MODULE,),
        "concurrency": 2,
        "name": f"test-{uuid.uuid4().hex[:8]}",
        "heartbeat_s": 0.1,
        "liveness": 3,
        "reconnect_max_s": 0.4,
        "drain_timeout_s": 2.0,
        "flush_timeout_s": 0.5,
    }
    values.update(overrides)
    return WorkerSettings(**values)


class WorkerThread:
    """Worker.run() in a daemon thread; stop() joins it and re-raises what run() raised."""

    def __init__(self, worker_settings: WorkerSettings) -> None:
        self.worker = Worker(worker_settings)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as e:
            self.error = e

    def join(self, timeout_s: float = 10.0) -> None:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            pytest.fail(f"the worker did not stop within {timeout_s} s")
        if self.error is not None:
            raise self.error

    def stop(self, *, drain: bool = False, timeout_s: float = 10.0) -> None:
        self.worker.stop(drain=drain)
        self.join(timeout_s)
