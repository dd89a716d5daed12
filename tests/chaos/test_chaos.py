"""SIGKILL, SIGSTOP and SIGTERM against a broker, three workers and two clients.

The run (taskring.chaos, the code behind `taskring chaos`) prints its seed and
schedule first; replay a failure with `pytest tests/chaos --chaos-seed N`.
The history checker (taskring.verify) then reads the clients' and workers'
journals and the task log, and every invariant must hold.

The tests after it replay, step by step on an in-process broker, the broker
faults chaos runs found, so each one fails on its own and quickly.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from taskring import protocol as p
from taskring.broker import Broker, BrokerSettings
from taskring.chaos import ChaosConfig, format_result, run_chaos
from taskring.chaos.processes import Supervisor
from taskring.chaos.runner import _Run


@pytest.mark.chaos
def test_a_chaos_run_loses_nothing_duplicates_nothing_and_never_goes_back(
    chaos_config: ChaosConfig, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Given a broker, 3 workers and 2 clients, and a schedule of kills drawn from the seed
    root = tmp_path_factory.mktemp("ch")
    # When the schedule runs, then the processes drain and stop
    result = run_chaos(chaos_config, root)
    summary = format_result(result)
    print(summary)
    report = result.report
    # Then the run itself went as planned: no process died on its own, the drain finished
    assert not result.problems, summary
    # And the history keeps every promise
    assert report.acknowledged and report.acknowledged > 100, summary
    assert report.lost == 0, summary
    assert report.duplicated == 0, summary
    assert report.regressions == 0, summary
    assert report.fencing == 0, summary
    assert report.inconsistent == 0, summary
    assert report.unfinished == 0, summary
    assert report.ok, summary
    # And every task succeeded, or was cancelled by its client: chaos tasks never fail, and
    # 100 attempts outlast any schedule (verify checked each answered cancel against the log)
    assert set(report.states) <= {"succeeded", "cancelled"}, summary
    assert report.states.get("succeeded", 0) > 100, summary


def test_the_end_of_a_run_lets_a_worker_still_starting_set_its_handler_first(
    tmp_path: Path,
) -> None:
    # Given a chaos run's broker and worker started an instant ago, as one restarted at
    # the end of the faults is when a short drain is over
    socket_dir = Path(tempfile.mkdtemp(prefix="trc-"))  # ipc paths are short
    (tmp_path / "workers").mkdir()
    config = ChaosConfig(seed=1, workers=1, clients=1)
    sup = Supervisor(tmp_path, tmp_path / "logs")
    run = _Run(config, tmp_path, f"ipc://{socket_dir}/broker.ipc", sup, lambda line: None)
    try:
        sup.start("broker", run._broker_args)
        sup.start("w1", run._worker_args("w1"))
        # When the run stops them at once
        run.stop()
        # Then both were given the time to set their SIGTERM handlers, and left cleanly,
        # rather than being ended by the signal (exit code -15, a problem of the run)
        assert run.problems == []
        assert run._handles_sigterm("w1")
    finally:
        sup.stop_all()
        shutil.rmtree(socket_dir, ignore_errors=True)


# ---------------------------------------------------------------- found by chaos runs


class Peer:
    """A DEALER speaking TRP to an in-process broker whose loop the test turns."""

    def __init__(self, ctx: zmq.Context[Any], broker: Broker, identity: bytes, proto: bytes):
        self.broker = broker
        self.proto = proto
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(broker.endpoint)

    def send(self, command: bytes, body: dict[str, Any]) -> None:
        self.sock.send_multipart(p.frames(self.proto, command, body))

    def expect(self, command: bytes, now: float, turns: int = 100) -> dict[str, Any]:
        """Turn the broker's loop (at time `now`) until `command` arrives; skip others."""
        for _ in range(turns):
            self.broker.poll_once(now=now, timeout_s=0.02)
            while self.sock.poll(0):
                got, body = p.decode_reply(self.sock.recv_multipart(), self.proto)
                if got == command:
                    return body
        raise AssertionError(f"no {command.decode()} within {turns} broker turns")


class Rig:
    """An in-process broker and the peers a test opens to it (all closed afterwards)."""

    def __init__(self, tmp_path: Path) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        settings = BrokerSettings(
            endpoint="tcp://127.0.0.1:*", db_path=str(tmp_path / "t.db"), heartbeat_s=0.2
        )
        self.broker = Broker(settings, context=self.ctx)
        self.peers: list[Peer] = []

    def peer(self, identity: bytes, proto: bytes) -> Peer:
        self.peers.append(Peer(self.ctx, self.broker, identity, proto))
        return self.peers[-1]

    def close(self) -> None:
        for peer in self.peers:
            peer.sock.close(linger=0)
        self.broker.close()
        self.ctx.term()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def _checkpoint(task_id: int, number: int, state: bytes) -> dict[str, object]:
    """One checkpoint of attempt 1, as an item of a CHECKPOINT body."""
    return {"id": task_id, "attempt": 1, "number": number, "state": state}


def _lease_one(rig: Rig, max_attempts: int, t: float) -> tuple[Peer, int]:
    """A worker w1 registered at time t, holding attempt 1 of one new task."""
    worker = rig.peer(b"w1", p.PROTOCOL_WORKER)
    ready = {"seq": 1, "capacity": 1, "tasks": {"t": 5}, "incarnation": "i1", "held": []}
    worker.send(p.READY, ready)
    worker.expect(p.WELCOME, t)
    client = rig.peer(b"c-" + b"0" * 32, p.PROTOCOL_CLIENT)
    item = {"name": "t", "payload": p.pack([[], {}]), "max_attempts": max_attempts}
    client.send(p.SUBMIT, {"seq": 1, "tasks": [item]})
    (task,) = worker.expect(p.TASK, t)["tasks"]
    assert task["attempt"] == 1
    return worker, task["id"]


def test_a_checkpoint_of_a_lost_lease_is_not_acknowledged_as_stored(rig: Rig) -> None:
    # Given attempt 1 of a task stored checkpoint 1, then its worker went silent
    # past the liveness window, so the lease was lost and the task queued again
    broker = rig.broker
    worker, task_id = _lease_one(rig, max_attempts=5, t=1000.0)
    worker.send(p.CHECKPOINT, {"seq": 2, "checkpoints": [_checkpoint(task_id, 1, b"1")]})
    assert worker.expect(p.ACK, 1000.0)["stale"] == []
    broker.poll_once(now=1001.0, timeout_s=0)
    assert broker.store.outcome(task_id)["state"] == p.QUEUED
    # When the worker's late checkpoint 2 of attempt 1 arrives (no worker leased it again)
    worker.send(p.CHECKPOINT, {"seq": 3, "checkpoints": [_checkpoint(task_id, 2, b"2")]})
    ack = worker.expect(p.ACK, 1001.0)
    # Then the ACK must not claim it durable: it is not in the log, and the next
    # attempt will start from checkpoint 1 (chaos seed 1, 15 s: task 1601)
    stored = broker.store.conn.execute(
        "SELECT checkpoint_no FROM tasks WHERE id = ?", (task_id,)
    ).fetchone()[0]
    assert stored == 1
    assert ack["stale"] == [task_id], "checkpoint 2 acknowledged as stored, but it was not"


def test_a_result_of_a_dead_lettered_attempt_is_not_acknowledged_as_applied(rig: Rig) -> None:
    # Given a task with one attempt, dead-lettered because its worker went silent
    broker = rig.broker
    worker, task_id = _lease_one(rig, max_attempts=1, t=1000.0)
    broker.poll_once(now=1001.0, timeout_s=0)
    assert broker.store.outcome(task_id)["state"] == p.DEAD
    # When the worker's late ok result of that attempt arrives
    outcome = {"id": task_id, "attempt": 1, "ok": True, "value": p.pack(42), "retry": False}
    worker.send(p.RESULT, {"seq": 2, "results": [outcome]})
    ack = worker.expect(p.ACK, 1001.0)
    # Then the ACK must say stale: the result was not applied, the task stays dead
    assert broker.store.outcome(task_id)["state"] == p.DEAD
    assert ack["stale"] == [task_id], "result acknowledged as applied to a dead task"


def test_a_worker_whose_held_tasks_fill_its_capacity_is_sent_no_more(rig: Rig) -> None:
    # Given worker w1 (capacity 1) runs attempt 1 of a task, and the broker lost
    # that lease (w1 was silent past the window) and queued the task again
    broker = rig.broker
    worker, task_id = _lease_one(rig, max_attempts=50, t=1000.0)
    broker.poll_once(now=1001.0, timeout_s=0)
    # When w1 registers again, saying it still holds attempt 1
    ready = {"seq": 2, "capacity": 1, "tasks": {"t": 50}, "incarnation": "i1"}
    worker.send(p.READY, {**ready, "held": [[task_id, 1]]})
    worker.expect(p.WELCOME, 1001.0)
    # Then it gets no TASK while its held list fills its capacity. (A regression test:
    # w1 used to get one, refuse it "at capacity" with retry, and get it again at once,
    # one attempt burnt per turn: 21 attempts in 55 ms in a chaos run, so with the
    # default max_attempts=3 a task was dead-lettered without ever running.)
    for _ in range(20):
        broker.poll_once(now=1001.0, timeout_s=0.01)
        while worker.sock.poll(0):
            command, body = p.decode_reply(worker.sock.recv_multipart(), p.PROTOCOL_WORKER)
            assert command != p.TASK, f"leased beyond capacity: {body['tasks']}"
