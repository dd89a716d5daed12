"""The process pool against a fake broker: a child that dies is reported and replaced."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.unit.worker_fakes import FakeBroker, WorkerThread, assignment, settings

from cluster import wait_for
from taskring import protocol
from taskring.workers import WorkerConfigError, WorkerSettings
from taskring.workers.pools import ProcessPool

pytestmark = pytest.mark.timeout(60)  # spawned children import the package: seconds, not ms


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    # A longer liveness window: the worker's loop competes with children starting up.
    fake = FakeBroker(heartbeat_s=0.1, liveness=10)
    yield fake
    fake.close()


@pytest.fixture
def worker(broker: FakeBroker) -> Iterator[WorkerThread]:
    thread = WorkerThread(settings(endpoint=broker.endpoint, pool="process", concurrency=1))
    yield thread
    thread.stop(drain=False)


def test_a_task_runs_in_a_child_process(broker: FakeBroker, worker: WorkerThread) -> None:
    ready = broker.register()
    assert ready["pool"] == "process"
    broker.dispatch(assignment(1, "wt.add", 40, 2))
    _, results = broker.result(timeout_s=30)
    assert protocol.unpack(results[1]["value"]) == 42


def test_a_child_that_dies_is_reported_and_replaced(
    broker: FakeBroker, worker: WorkerThread
) -> None:
    broker.register()
    # When a task kills its process
    broker.dispatch(assignment(1, "wt.exit", 3))
    seq, results = broker.result(timeout_s=30)
    # Then it fails, worth another attempt
    assert results[1]["ok"] is False and results[1]["retry"] is True
    assert results[1]["error"] == "worker process died (exit code 3)"
    broker.ack(seq)
    # ... and the next task runs in a fresh child
    broker.dispatch(assignment(2, "wt.add", 2, 3))
    _, results = broker.result(timeout_s=30)
    assert protocol.unpack(results[2]["value"]) == 5


def test_checkpoints_travel_from_the_child_and_block_it(
    broker: FakeBroker, worker: WorkerThread
) -> None:
    broker.register()
    broker.dispatch(assignment(3, "wt.resume", state={"i": 1}, number=1))
    seq, checkpoint = broker.checkpoint(timeout_s=30)
    assert checkpoint["number"] == 2 and protocol.unpack(checkpoint["state"]) == {"i": 2}
    for command, _ in broker.pump(0.3):
        assert command == protocol.CHECKPOINT, "the child went on before the ACK"
    broker.ack(seq)
    (outcome,) = broker.skip_to(protocol.RESULT)["results"]
    assert protocol.unpack(outcome["value"]) == {
        "seen": {"i": 1},
        "state": {"i": 2},
        "lease_lost": False,
    }


def test_a_checkpoint_the_broker_rejects_fails_the_task_in_the_child(
    broker: FakeBroker, worker: WorkerThread
) -> None:
    broker.register()
    broker.dispatch(assignment(4, "wt.resume", state={"i": 1}, number=1))
    seq, _ = broker.checkpoint(timeout_s=30)
    # When the broker rejects the checkpoint for good
    broker.send(protocol.ERROR, {"seq": seq, "code": "too-large", "message": "state too big"})
    # Then ctx.checkpoint() raises in the child, as in a thread, and the task fails
    # (the relay thread used to die on it, leaving the child waiting forever)
    result = broker.skip_to(protocol.RESULT)
    (outcome,) = result["results"]
    assert outcome["ok"] is False
    assert "RequestRejected" in outcome["error"] and "too-large" in outcome["error"]
    # ... and the child runs the next task
    broker.ack(result["seq"])
    broker.dispatch(assignment(5, "wt.add", 2, 3))
    _, results = broker.result(timeout_s=30)
    assert protocol.unpack(results[5]["value"]) == 5


def test_a_stopping_worker_that_cannot_tell_the_broker_starts_no_child_task(
    broker: FakeBroker, tmp_path: Path
) -> None:
    # Given a process-pool worker running task 1 in its one child, 2 and 3 waiting
    w = WorkerThread(
        settings(
            endpoint=broker.endpoint,
            pool="process",
            concurrency=1,
            prefetch=2,
            liveness=30,
            flush_timeout_s=30,
        )
    )
    try:
        broker.register(liveness=30)
        first, later = str(tmp_path / "first"), str(tmp_path / "later")
        waiting = (assignment(i, "wt.file_gate", later) for i in (2, 3))
        broker.dispatch(assignment(1, "wt.file_gate", first), *waiting)
        wait_for(lambda: os.path.exists(first + ".started"), 30, "task 1 to start")
        # When the broker forgets it, and it is asked to stop before it is welcomed back
        broker.send(protocol.DISCONNECT, {"reason": "unknown worker"})
        ready = broker.skip_to(protocol.READY)
        w.worker.stop()
        # And task 1 finishes, freeing the child
        Path(first).touch()
        time.sleep(0.5)
        # Then the child starts neither waiting task
        assert not os.path.exists(later + ".started")
        # And, welcomed back, the worker hands them back unstarted
        broker.welcome(ready["seq"], liveness=30)
        done = broker.results_acked(3, skipping=True, timeout_s=20)
        assert done[1]["ok"] and "started" not in done[1]
        assert [done[i]["started"] for i in (2, 3)] == [False, False]
        assert not os.path.exists(later + ".started")
    finally:
        Path(later).touch()  # a task that did start must not outlive the test
        w.stop(drain=False)


def test_the_process_pool_needs_modules() -> None:
    with pytest.raises(WorkerConfigError, match=r"needs settings\.modules"):
        ProcessPool(1, (), protocol.DEFAULT_LIMITS)
    assert WorkerSettings(pool="process").pool == "process"


def test_a_task_in_a_child_process_learns_its_lease_is_gone(
    broker: FakeBroker, worker: WorkerThread
) -> None:
    # Given a task in a child process that polls ctx.lease_lost and never checkpoints
    broker.register()
    broker.dispatch(assignment(1, "wt.until_stale", 20.0))
    assert broker.last_held(after=time.monotonic() + 1) == [[1, 1]]
    # When the broker's heartbeat names its attempt stale, Then the child sees it and ends
    broker.send(protocol.HEARTBEAT, {"stale": [[1, 1]]})
    _, results = broker.result(timeout_s=15)
    assert protocol.unpack(results[1]["value"]) is True


def test_lease_lost_polled_from_another_thread_while_checkpointing_keeps_the_pipe_in_step(
    broker: FakeBroker, worker: WorkerThread
) -> None:
    # Given a task in a child process that checkpoints while a helper thread polls lease_lost
    broker.register()
    broker.dispatch(assignment(1, "wt.poll_while_checkpointing", 20))
    # When every checkpoint is acknowledged
    while True:
        got = broker._next(time.monotonic() + 15)
        assert got is not None, "the task neither checkpointed nor finished"
        command, body = got
        if command == protocol.CHECKPOINT:
            broker.ack(body["seq"])
        elif command == protocol.RESULT:
            break
    # Then no answer went to the wrong question: every checkpoint saw its own ACK
    assert protocol.unpack(body["results"][0]["value"]) == "ok"
