"""The worker against a fake broker: registration, results, checkpoints, heartbeats, reconnects.

Thread pool throughout; the process pool has its own file.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from tests.unit import worker_tasks
from tests.unit.worker_fakes import FakeBroker, WorkerThread, assignment, settings

from taskring import protocol
from taskring.errors import RequestRejected
from taskring.protocol import TaskOutcome
from taskring.workers.inbox import CheckpointRequest, Waiter
from taskring.workers.io import IOLoop, _outcome_bytes

Start = Callable[..., WorkerThread]


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    fake = FakeBroker(heartbeat_s=0.1, liveness=3)
    yield fake
    fake.close()


@pytest.fixture
def start(broker: FakeBroker) -> Iterator[Start]:
    started: list[WorkerThread] = []

    def start_worker(**overrides: Any) -> WorkerThread:
        overrides.setdefault("endpoint", broker.endpoint)
        thread = WorkerThread(settings(**overrides))
        started.append(thread)
        return thread

    yield start_worker
    worker_tasks.release_all()
    for thread in started:
        thread.stop(drain=False)


def test_ready_carries_capacity_tasks_and_held_and_is_resent_until_welcome(
    broker: FakeBroker, start: Start
) -> None:
    # Given a worker with three slots, and by default as many tasks waiting to start
    w = start(concurrency=3)
    # When the broker does not answer its READY
    first = broker.recv(protocol.READY)
    second = broker.recv(protocol.READY)
    # Then it announces itself, and says it again
    assert (first["capacity"], first["concurrency"]) == (6, 3)
    assert first["tasks"]["wt.add"] == 3  # the task's default max_attempts
    assert first["held"] == []
    assert (first["pid"], first["pool"]) == (os.getpid(), "thread")
    assert second["seq"] > first["seq"]
    # When the broker welcomes the latest READY
    broker.welcome(second["seq"])
    # Then READY stops and heartbeats start
    later = [command for command, _ in broker.pump(0.5)]
    assert protocol.READY not in later
    assert broker.heartbeats, "no heartbeat after WELCOME"
    assert w.worker.io is not None and w.worker.io.welcomed


def test_a_task_runs_and_its_result_comes_back(broker: FakeBroker, start: Start) -> None:
    start()
    broker.register()
    broker.dispatch(assignment(7, "wt.add", 2, 3, attempt=2))
    _, results = broker.result()
    assert results[7]["attempt"] == 2
    assert results[7]["ok"] is True
    assert protocol.unpack(results[7]["value"]) == 5
    assert results[7]["error"] is None


def test_a_result_leaves_at_once_not_at_the_next_poll_timeout(start: Start) -> None:
    # Long heartbeats mean long poll timeouts: only the wake-up pipe makes this fast.
    slow = FakeBroker(heartbeat_s=2.0, liveness=3)
    try:
        start(endpoint=slow.endpoint, heartbeat_s=2.0)
        slow.register()
        slow.dispatch(assignment(1, "wt.add", 1, 1))
        began = time.monotonic()
        slow.result()
        assert time.monotonic() - began < 0.5
    finally:
        slow.close()


def test_a_result_is_resent_with_the_same_seq_until_acked(broker: FakeBroker, start: Start) -> None:
    start()
    broker.register()
    broker.dispatch(assignment(1, "wt.add", 1, 2))
    seq, first = broker.result()
    again_seq, again = broker.result()  # no ACK: the same message again
    assert (again_seq, again) == (seq, first)
    assert broker.last_held(after=time.monotonic()) == [[1, 1]]
    # When the broker ACKs
    broker.ack(seq)
    # Then no resend follows (one already on the wire may still land), and the lease is released
    broker.pump(0.1)
    later = broker.pump(0.8)
    assert all(command != protocol.RESULT for command, _ in later), later
    assert broker.last_held(after=time.monotonic()) == []


def test_the_worker_never_holds_more_than_its_capacity(broker: FakeBroker, start: Start) -> None:
    # Given a worker that holds two tasks, both running
    start(concurrency=2, prefetch=0)
    broker.register()
    # When the broker oversteps the credit with a third task
    broker.dispatch(*(assignment(i, "wt.wait", "cap") for i in (1, 2, 3)))
    # Then the third is refused at once, for another worker or attempt
    seq, results = broker.result()
    assert list(results) == [3]
    assert results[3]["ok"] is False and results[3]["retry"] is True
    assert "at capacity" in results[3]["error"]
    broker.ack(seq)
    assert broker.last_held(after=time.monotonic()) == [[1, 1], [2, 1]]
    # When the two running tasks finish and their results are ACKed
    worker_tasks.gate("cap").set()
    done = broker.results_acked(2)
    assert sorted(done) == [1, 2]
    # Then held shrinks to nothing
    assert broker.last_held(after=time.monotonic() + 0.05) == []


def test_prefetched_tasks_wait_in_the_worker_and_count_against_its_capacity(
    broker: FakeBroker, start: Start
) -> None:
    # Given a worker that runs one task at a time and holds two more
    start(concurrency=1, prefetch=2)
    assert broker.recv(protocol.READY)["capacity"] == 3
    broker.register()
    # When the broker sends four
    broker.dispatch(*(assignment(i, "wt.wait", "prefetch") for i in (1, 2, 3, 4)))
    # Then three are held (one running, two waiting) and only the fourth is refused
    seq, results = broker.result()
    assert list(results) == [4] and "at capacity" in results[4]["error"]
    broker.ack(seq)
    assert broker.last_held(after=time.monotonic()) == [[1, 1], [2, 1], [3, 1]]
    # And once the gate opens, the waiting ones run too
    worker_tasks.gate("prefetch").set()
    done = broker.results_acked(3)
    assert sorted(done) == [1, 2, 3] and all(r["ok"] for r in done.values())


def test_checkpoint_blocks_until_the_broker_acks(broker: FakeBroker, start: Start) -> None:
    start()
    broker.register()
    broker.dispatch(assignment(4, "wt.checkpoint", "after-ckpt", attempt=1))
    seq, checkpoint = broker.checkpoint()
    assert (checkpoint["id"], checkpoint["attempt"], checkpoint["number"]) == (4, 1, 1)
    assert protocol.unpack(checkpoint["state"]) == {"step": 1}
    # While unacknowledged, the task waits inside ctx.checkpoint() (resends may come)
    for command, body in broker.pump(0.4):
        assert command == protocol.CHECKPOINT and body["seq"] == seq
    assert not worker_tasks.gate("after-ckpt").is_set(), "the task went on before the ACK"
    # When the broker ACKs, the task continues
    broker.ack(seq)
    assert worker_tasks.gate("after-ckpt").wait(5)
    # (a resend of the CHECKPOINT may still be on the wire)
    (outcome,) = broker.skip_to(protocol.RESULT, timeout_s=5)["results"]
    assert protocol.unpack(outcome["value"]) == [{"step": 1}, 1, False]


def test_a_resumed_task_sees_its_state_and_numbers_on(broker: FakeBroker, start: Start) -> None:
    start()
    broker.register()
    broker.dispatch(assignment(9, "wt.resume", attempt=2, state={"i": 5}, number=5))
    seq, checkpoint = broker.checkpoint()
    assert (checkpoint["attempt"], checkpoint["number"]) == (2, 6)
    assert protocol.unpack(checkpoint["state"]) == {"i": 6}
    # The broker says the attempt is superseded: the task is told, not killed
    broker.ack(seq, stale=[9])
    _, results = broker.result()
    assert protocol.unpack(results[9]["value"]) == {
        "seen": {"i": 5},
        "state": {"i": 6},
        "lease_lost": True,
    }


def test_unpackable_checkpoint_state_fails_the_task_clearly(
    broker: FakeBroker, start: Start
) -> None:
    start()
    broker.register()
    broker.dispatch(assignment(1, "wt.bad_state"))
    _, results = broker.result()
    assert results[1]["ok"] is False
    assert results[1]["error"].startswith("TypeError: checkpoint state must be msgpack data")


def test_unknown_task_name_is_not_retried(broker: FakeBroker, start: Start) -> None:
    start()
    broker.register()
    broker.dispatch(assignment(1, "wt.nope"))
    _, results = broker.result()
    assert results[1]["ok"] is False and results[1]["retry"] is False
    assert "'wt.nope'" in results[1]["error"] and "wt.add" in results[1]["error"]


@pytest.mark.timeout(30)
def test_heartbeats_flow_while_a_task_busy_loops(broker: FakeBroker, start: Start) -> None:
    start()
    broker.register()
    window_s = broker.heartbeat_s * broker.liveness
    broker.dispatch(assignment(1, "wt.busy", 3 * window_s))
    began = time.monotonic()
    _, results = broker.result(timeout_s=10)
    ended = time.monotonic()
    assert results[1]["ok"] is True
    beats = [at for at, _ in broker.heartbeats if began <= at <= ended]
    # One heartbeat per interval, give or take scheduling: never a silent window
    assert len(beats) >= 5, f"only {len(beats)} heartbeats in {ended - began:.2f} s"
    gaps = [b - a for a, b in zip([began, *beats], [*beats, ended], strict=True)]
    assert max(gaps) < window_s, f"a {max(gaps):.2f} s gap in heartbeats"
    assert broker.pump(0.05) == [], "the worker re-registered: it thought the broker was dead"


def test_silent_broker_gets_a_new_ready_with_held_then_the_unacked_result(
    broker: FakeBroker, start: Start
) -> None:
    start()
    broker.register()
    broker.dispatch(assignment(1, "wt.add", 1, 1), assignment(2, "wt.wait", "silent"))
    seq, results = broker.result()
    assert list(results) == [1]
    # When the broker goes silent (no heartbeats, no ACK)
    broker.beating = False
    deadline = time.monotonic() + 5
    while True:
        got = broker._next(deadline)
        assert got is not None, "the worker never re-registered after the broker went silent"
        if got[0] == protocol.READY:
            break
        assert got[0] == protocol.RESULT and got[1]["seq"] == seq
    # Then the worker reconnects and says what it still holds
    assert sorted(got[1]["held"]) == [[1, 1], [2, 1]]
    broker.beating = True
    # ... and the unacknowledged result follows the WELCOME on the new connection (not
    # before it: the WELCOME says the broker's limits, which a restart may have changed)
    broker.welcome(got[1]["seq"])
    assert broker.recv(protocol.RESULT)["seq"] == seq
    broker.ack(seq)
    assert broker.last_held(after=time.monotonic() + 0.05) == [[2, 1]]


def test_disconnect_from_the_broker_gets_a_new_ready(broker: FakeBroker, start: Start) -> None:
    start()
    broker.register()
    broker.dispatch(assignment(5, "wt.wait", "disc"))
    assert broker.last_held(after=time.monotonic()) == [[5, 1]]
    broker.send(protocol.DISCONNECT, {"reason": "unknown worker"})
    ready = broker.recv(protocol.READY)
    assert ready["held"] == [[5, 1]]
    broker.welcome(ready["seq"])
    worker_tasks.gate("disc").set()
    _, results = broker.result()
    assert protocol.unpack(results[5]["value"]) == "disc"


def stop_with_two_waiting(
    broker: FakeBroker, start: Start, gate: str
) -> tuple[WorkerThread, int, dict[int, dict[str, Any]]]:
    """A worker running task 1, with 2 and 3 waiting for its one slot, asked to stop:
    the worker, and the seq and outcomes of its next RESULT."""
    w = start(concurrency=1, prefetch=2)
    broker.register()
    broker.dispatch(*(assignment(i, "wt.wait", gate) for i in (1, 2, 3)))
    assert worker_tasks.gate(f"{gate}:started").wait(5)
    w.worker.stop()
    return (w, *broker.result())


def admit_again(broker: FakeBroker, *before_welcome: dict[str, Any], **welcome: Any) -> float:
    """Forget the worker, send `before_welcome` TASKs once it asks to register again,
    then welcome it (with `welcome` fields); the time of the WELCOME."""
    broker.send(protocol.DISCONNECT, {"reason": "unknown worker"})
    ready = broker.skip_to(protocol.READY)  # a resend of a hand-back may come first
    if before_welcome:
        broker.dispatch(*before_welcome)
    welcomed_at = time.monotonic()
    broker.welcome(ready["seq"], **welcome)
    return welcomed_at


def finish_and_leave(broker: FakeBroker, w: WorkerThread, gate: str) -> dict[str, Any]:
    """Let task 1 finish: its outcome, ACKed (past any resend of another), once the
    worker has said goodbye and returned."""
    worker_tasks.gate(gate).set()
    while 1 not in (done := broker.results_acked(1)):
        pass
    assert broker.skip_to(protocol.DISCONNECT)["reason"] == "shutdown"
    w.join(5)
    return done[1]


def test_a_stopping_worker_hands_back_the_tasks_waiting_for_a_slot(
    broker: FakeBroker, start: Start
) -> None:
    # Given a worker that runs one task and holds two more waiting behind it, When asked
    # to stop, Then the two waiting ones go back at once, unstarted, so no attempt is
    # used, and only after the broker was told that the worker drains: else it could
    # lease them straight back to this worker
    w, seq, results = stop_with_two_waiting(broker, start, "handback")
    assert [body.get("draining") for _, body in broker.heartbeats][-1] is True
    assert sorted(results) == [2, 3]
    for outcome in results.values():
        assert (outcome["ok"], outcome["retry"], outcome["started"]) == (False, True, False)
        assert "stopped before it started the task" in outcome["error"]
    broker.ack(seq)
    # And a TASK that arrives now is refused unstarted, and held until its outcome is
    # ACKed, as every task is: a HEARTBEAT without it would say the TASK never came
    broker.dispatch(assignment(7, "wt.add", 1, 1))
    seq, results = broker.result()
    assert list(results) == [7] and results[7]["started"] is False
    assert [7, 1] in broker.last_held(after=time.monotonic())
    broker.ack(seq)
    # And the running one finishes, its result flushed before the worker leaves
    outcome = finish_and_leave(broker, w, "handback")
    assert outcome["ok"] and "started" not in outcome


def test_after_registering_again_a_stopping_worker_says_it_drains_before_handing_back(
    broker: FakeBroker, start: Start
) -> None:
    # Given a stopping worker that has handed back what waited, its one slot busy
    w, seq, results = stop_with_two_waiting(broker, start, "again")
    assert sorted(results) == [2, 3]
    broker.ack(seq)
    # When the broker forgets it, and sends a task before it welcomes it back
    welcomed_at = admit_again(broker, assignment(4, "wt.wait", "again"))
    # Then it hands that task back only after a HEARTBEAT that says it drains: the
    # broker takes a worker that registers as one that serves, and would lease the
    # task straight back to it
    seq, results = broker.result()
    assert list(results) == [4] and results[4]["started"] is False
    assert [body.get("draining") for at, body in broker.heartbeats if at > welcomed_at] == [True]
    broker.ack(seq)
    assert finish_and_leave(broker, w, "again")["ok"]


def stop_while_away(
    broker: FakeBroker, start: Start, gate: str, **settings: Any
) -> tuple[WorkerThread, dict[str, Any]]:
    """A worker running task 1 behind `gate`, with 2 and 3 waiting behind `gate`-later,
    that the broker forgets and that is asked to stop before it is welcomed back: the
    worker and its READY. A long liveness window: it must not reconnect meanwhile."""
    w = start(concurrency=1, prefetch=2, liveness=30, **settings)
    broker.register(liveness=30)
    later = [assignment(i, "wt.wait", f"{gate}-later") for i in (2, 3)]
    broker.dispatch(assignment(1, "wt.wait", gate), *later)
    assert worker_tasks.gate(f"{gate}:started").wait(5)
    broker.send(protocol.DISCONNECT, {"reason": "unknown worker"})
    ready = broker.skip_to(protocol.READY)
    w.worker.stop()
    return w, ready


def test_a_stopping_worker_that_cannot_tell_the_broker_starts_none_of_its_waiting_tasks(
    broker: FakeBroker, start: Start
) -> None:
    # Given a worker running task 1, with 2 and 3 waiting for its one slot, that is asked
    # to stop while the broker has forgotten it (a long flush timeout, within which
    # unstarted tasks wait for a broker to hear)
    w, ready = stop_while_away(broker, start, "away", flush_timeout_s=10)
    # When task 1 finishes while the broker cannot be told that the worker drains
    worker_tasks.gate("away").set()
    # Then the freed slot starts neither waiting task: the broker may lease them to
    # another worker meanwhile, and both would run them
    assert not worker_tasks.gate("away-later:started").wait(0.5)
    # And, welcomed back, it says it drains, then hands them back unstarted
    welcomed_at = time.monotonic()
    broker.welcome(ready["seq"], liveness=30)
    done = broker.results_acked(3, skipping=True, timeout_s=10)
    assert done[1]["ok"] and "started" not in done[1]
    for task_id in (2, 3):
        assert (done[task_id]["ok"], done[task_id]["started"]) == (False, False)
    assert [b.get("draining") for at, b in broker.heartbeats if at > welcomed_at][:1] == [True]
    assert broker.skip_to(protocol.DISCONNECT)["reason"] == "shutdown"
    w.join(5)
    assert not worker_tasks.gate("away-later:started").is_set()


def test_a_stopping_worker_whose_broker_stays_away_leaves_once_its_running_task_is_done(
    broker: FakeBroker, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker running task 1, with 2 and 3 waiting, and a long drain timeout,
    # asked to stop while the broker has forgotten it (and never welcomes it back)
    w, _ = stop_while_away(broker, start, "gone", drain_timeout_s=30, flush_timeout_s=0.5)
    # When task 1 finishes
    worker_tasks.gate("gone").set()
    # Then it does not wait out the drain timeout for tasks it never started: it
    # leaves after the flush timeout, having started neither, and says so
    w.join(10)
    assert not w.thread.is_alive()
    assert not worker_tasks.gate("gone-later:started").is_set()
    assert "2 task(s) not started and not handed back" in caplog.text
    assert "still running at stop" not in caplog.text


def test_a_stopping_worker_welcomed_with_smaller_limits_says_it_drains_before_resending(
    broker: FakeBroker, start: Start
) -> None:
    # Given a stopping worker whose hand-back of two waiting tasks is not ACKed yet
    w, _, results = stop_with_two_waiting(broker, start, "cut")
    assert sorted(results) == [2, 3]
    # When the broker forgets it, and welcomes it back with a batch of one (so the
    # hand-back is cut again and resent at once)
    limits = {"max_message_bytes": 1_048_576, "max_batch": 1}
    welcomed_at = admit_again(broker, limits=limits)
    # Then the HEARTBEAT that says it drains goes before the resent hand-backs
    body = broker.skip_to(protocol.RESULT)
    assert [b.get("draining") for at, b in broker.heartbeats if at > welcomed_at][:1] == [True]
    done = {item["id"] for item in body["results"]}
    broker.ack(body["seq"])
    while done != {2, 3}:
        body = broker.skip_to(protocol.RESULT)
        done |= {item["id"] for item in body["results"]}
        broker.ack(body["seq"])
    assert finish_and_leave(broker, w, "cut")["ok"]


def test_a_waiting_task_whose_lease_ended_is_never_started(
    broker: FakeBroker, start: Start
) -> None:
    # Given a worker running one task, with a second one waiting for the slot
    start(concurrency=1, prefetch=1)
    broker.register()
    broker.dispatch(*(assignment(i, "wt.wait", "first") for i in (1, 2)))
    assert worker_tasks.gate("first:started").wait(5)
    # When the broker's heartbeat says the waiting one's lease is gone, and the slot frees
    broker.send(protocol.HEARTBEAT, {"stale": [[2, 1]]})
    time.sleep(0.2)
    worker_tasks.gate("first").set()
    # Then it is reported unstarted instead of run a second time somewhere
    done = broker.results_acked(2)
    assert done[1]["ok"] and "started" not in done[1]
    assert (done[2]["ok"], done[2]["started"]) == (False, False)
    assert done[2]["error"] == "the lease ended before the task started"


def test_graceful_stop_drains_flushes_and_says_disconnect(broker: FakeBroker, start: Start) -> None:
    # Given a worker told to beat once a second (so "at once" and "at the next beat"
    # differ by more than a loaded machine's scheduling delays), running a task
    w = start()
    broker.register(heartbeat_ms=1000)
    broker.dispatch(assignment(1, "wt.wait", "drain"))
    assert broker.last_held(after=time.monotonic()) == [[1, 1]]
    # When asked to stop while a task runs
    asked = time.monotonic()
    w.worker.stop()
    # Then it tells the broker at once, without waiting for the next beat
    broker.pump(0.5)
    told = [at for at, body in broker.heartbeats if at > asked and body.get("draining")]
    assert told and told[0] - asked < 0.5
    # ... a task the broker sent before it heard goes back unstarted, costing no attempt
    broker.dispatch(assignment(2, "wt.add", 1, 1))
    seq, results = broker.result()
    assert (results[2]["ok"], results[2]["retry"], results[2]["started"]) == (False, True, False)
    broker.ack(seq)
    # ... the running one finishes and its result is flushed
    threading.Timer(0.2, worker_tasks.gate("drain").set).start()
    seq, results = broker.result()
    assert protocol.unpack(results[1]["value"]) == "drain"
    broker.ack(seq)
    # ... and the worker says goodbye and returns
    assert broker.recv(protocol.DISCONNECT)["reason"] == "shutdown"
    w.join(5)


def test_stop_returns_promptly_with_no_broker_at_all(start: Start) -> None:
    w = start(endpoint="tcp://127.0.0.1:9")  # nothing listens on the discard port
    time.sleep(0.2)  # let it try to register
    began = time.monotonic()
    w.stop(drain=True)
    assert time.monotonic() - began < 2.0


def test_the_loop_steps_on_a_fake_clock_and_backs_off_reconnects() -> None:
    # Given an I/O loop whose broker never answers, stepped by hand
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = settings(endpoint="tcp://127.0.0.1:9", heartbeat_s=0.1, liveness=3, reconnect_max_s=0.3)
    io = IOLoop(context, s, "stepped", {"wt.add": 3}, lambda a: None)
    try:
        io.poll_once(now=100.0, timeout_s=0)
        assert io.connected
        # When the liveness window (0.3 s) passes in silence
        io.poll_once(now=100.29, timeout_s=0)
        assert io.connected
        io.poll_once(now=100.31, timeout_s=0)
        # Then it drops the socket and reconnects after the first delay (one heartbeat)
        assert not io.connected and io.reconnect_at == pytest.approx(100.41)
        io.poll_once(now=100.40, timeout_s=0)
        assert not io.connected
        io.poll_once(now=100.41, timeout_s=0)
        assert io.connected
        # ... doubling the delay each time, up to reconnect_max_s
        delays = []
        now = 100.41
        for _ in range(3):
            now += 0.31
            io.poll_once(now=now, timeout_s=0)
            delays.append(round(io.reconnect_at - now, 3))
            now = io.reconnect_at
            io.poll_once(now=now, timeout_s=0)
        assert delays == [0.2, 0.3, 0.3]
    finally:
        io.close(disconnect=False)
        context.destroy(linger=0)


# ---------------------------------------------------------------- batches, stepped by hand


Stepped = tuple[FakeBroker, IOLoop]


@pytest.fixture
def stepped() -> Iterator[Stepped]:
    """A fake broker, and an I/O loop registered with it whose tasks never run (items are
    injected). A 2 s heartbeat: nothing is resent, and no beat arrives, while a test runs."""
    broker = FakeBroker(heartbeat_s=2.0, liveness=5)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    io = IOLoop(
        context, settings(endpoint=broker.endpoint), "stepped", {"wt.add": 3}, lambda a: None
    )
    try:
        io.poll_once(timeout_s=0)  # connects and sends READY
        broker.register()
        step_until(io, lambda: io.welcomed)
        yield broker, io
    finally:
        io.close(disconnect=False)
        context.destroy(linger=0)
        broker.close()


def step_until(io: IOLoop, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not done():
        assert time.monotonic() < deadline, "the stepped loop did not get there in 5 s"
        io.poll_once(timeout_s=0.05)


def checkpoint_request(task_id: int, attempt: int) -> CheckpointRequest:
    return CheckpointRequest(task_id, attempt, 1, protocol.pack(attempt), Waiter())


def outcome(task_id: int, attempt: int) -> TaskOutcome:
    return TaskOutcome(task_id, attempt, True, protocol.pack(None), None, True)


def items_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The checkpoints of a CHECKPOINT, or the outcomes of a RESULT."""
    items: list[dict[str, Any]] = body.get("checkpoints", body.get("results", []))
    return items


def test_two_attempts_of_one_task_never_share_a_message(stepped: Stepped) -> None:
    broker, io = stepped
    # Given a worker that holds attempts 1 and 2 of task 7 (its lease of attempt 1
    # was lost and the task came back to it), both checkpointing at once
    first, second, other = (
        checkpoint_request(7, 1),
        checkpoint_request(7, 2),
        checkpoint_request(8, 1),
    )
    for item in (first, second, other):
        io.inbox.put(item)
    for item in (outcome(7, 1), outcome(7, 2), outcome(8, 1)):
        io.inbox.put(item)
    # When the loop sends them
    io.poll_once(timeout_s=0)
    messages = broker.pump(0.3)
    # Then no CHECKPOINT or RESULT names one task twice, since an ACK's stale list names ids
    sent: dict[bytes, list[list[tuple[int, int]]]] = {protocol.CHECKPOINT: [], protocol.RESULT: []}
    for command, body in messages:
        sent[command].append([(i["id"], i["attempt"]) for i in items_of(body)])
    for command, batches in sent.items():
        assert sorted(p for batch in batches for p in batch) == [(7, 1), (7, 2), (8, 1)], command
        assert all(len({i for i, _ in batch}) == len(batch) for batch in batches), command
    # And an ACK calling task 7 stale in attempt 1's message leaves attempt 2 current
    for command, body in messages:
        if command == protocol.CHECKPOINT:
            broker.ack(body["seq"], stale=[7] if items_of(body)[0]["attempt"] == 1 else [])
    step_until(io, lambda: not io._waiters)
    assert (first.waiter.wait(), second.waiter.wait(), other.waiter.wait()) == (True, False, False)


def test_a_rejected_batch_goes_again_item_by_item_so_only_the_bad_item_fails(
    stepped: Stepped,
) -> None:
    broker, io = stepped
    # Given two checkpoints and two results in one message each
    good, bad = checkpoint_request(1, 1), checkpoint_request(2, 1)
    io.inbox.put(good)
    io.inbox.put(bad)
    io.inbox.put(outcome(3, 1))
    io.inbox.put(outcome(4, 1))
    io.poll_once(timeout_s=0)
    messages = broker.pump(0.3)
    assert [c for c, _ in messages] == [protocol.CHECKPOINT, protocol.RESULT]
    # When the broker rejects both messages for good (one item over its limits)
    for _, body in messages:
        broker.send(protocol.ERROR, {"seq": body["seq"], "code": "too-large", "message": "big"})
    step_until(io, lambda: io.unacked == 4)
    # Then each item goes again in a message of its own
    again = broker.pump(0.3)
    singles = sorted((c, *[i["id"] for i in items_of(body)]) for c, body in again)
    assert singles == [
        (protocol.CHECKPOINT, 1),
        (protocol.CHECKPOINT, 2),
        (protocol.RESULT, 3),
        (protocol.RESULT, 4),
    ]
    # And when only task 2's checkpoint is rejected again, only its task hears of it
    for command, body in again:
        if command == protocol.CHECKPOINT and items_of(body)[0]["id"] == 2:
            broker.send(protocol.ERROR, {"seq": body["seq"], "code": "too-large", "message": "big"})
        else:
            broker.ack(body["seq"])
    step_until(io, lambda: io.unacked == 0)  # every message answered
    assert good.waiter.wait() is False
    with pytest.raises(RequestRejected, match="too-large"):
        bad.waiter.wait()


def test_a_result_the_broker_refuses_alone_is_reported_as_the_failure_it_is(
    stepped: Stepped,
) -> None:
    broker, io = stepped
    # Given a task's result, sent alone
    io.inbox.put(outcome(5, 1))
    io.poll_once(timeout_s=0)
    (command, body), *_ = broker.pump(0.3)
    assert command == protocol.RESULT and items_of(body)[0]["ok"] is True
    # When the broker refuses it for good (its value is over the broker's own limit)
    broker.send(protocol.ERROR, {"seq": body["seq"], "code": "too-large", "message": "big"})
    # Then the worker reports the task failed, for good, instead of letting it go: a
    # task dropped from `held` would be run again, to the same refusal
    first_seq = body["seq"]
    step_until(io, lambda: io.unacked == 1 and first_seq not in io._results)
    again = [b for c, b in broker.pump(0.3) if c == protocol.RESULT]
    (failed,) = items_of(again[0])
    assert (failed["id"], failed["ok"], failed["retry"], failed["value"]) == (5, False, False, None)
    assert failed["error"] == "the broker refused the result (too-large): big"


def test_an_outcome_is_sized_in_bytes_so_a_result_of_emoji_errors_stays_under_the_limit() -> None:
    # Given outcomes whose errors are 2,000 emoji: 8,000 bytes each, 2,000 characters
    outcomes = [TaskOutcome(i, 1, False, None, "\U0001f600" * 2000, True) for i in range(12)]
    limits = dataclasses.replace(protocol.DEFAULT_LIMITS, max_message_bytes=65_536)
    # When they are cut into RESULTs as the I/O loop cuts them
    batches = protocol.split_by_size(outcomes, _outcome_bytes, limits)
    # Then each RESULT body fits the limit
    sizes = [len(protocol.pack({"results": [o._asdict() for o in b]})) for b in batches]
    assert len(batches) >= 2 and max(sizes) < limits.max_message_bytes


SMALL_BROKER = dataclasses.asdict(protocol.DEFAULT_LIMITS) | {"max_message_bytes": 65_536}


def welcomed_by_small_broker(stepped: Stepped, limits: dict[str, int] = SMALL_BROKER) -> None:
    """The broker says DISCONNECT, and WELCOMEs the new READY announcing `limits`
    (by default 64 KiB messages)."""
    broker, io = stepped
    broker.send(protocol.DISCONNECT, {"reason": "unknown worker"})
    step_until(io, lambda: not io.welcomed)
    broker.welcome(broker.recv(protocol.READY)["seq"], limits=limits)
    step_until(io, lambda: io.welcomed)


def test_results_keep_to_the_broker_s_limit_when_it_is_smaller_than_the_worker_s(
    stepped: Stepped,
) -> None:
    # Given a worker welcomed by a broker that takes 64 KiB
    broker, io = stepped
    welcomed_by_small_broker(stepped)
    # When twelve tasks finish with 10 KB results each
    for task_id in range(1, 13):
        io.inbox.put(TaskOutcome(task_id, 1, True, b"v" * 10_000, None, True))
    io.poll_once(timeout_s=0)
    # Then they leave in RESULTs each under the broker's limit
    bodies = [body for command, body in broker.pump(0.3) if command == protocol.RESULT]
    assert sorted(i["id"] for body in bodies for i in items_of(body)) == list(range(1, 13))
    assert len(bodies) >= 2 and max(len(protocol.pack(b)) for b in bodies) < 65_536


def test_results_cut_for_a_larger_broker_are_cut_again_when_it_comes_back_smaller(
    stepped: Stepped,
) -> None:
    # Given twelve 10 KB results sent in one RESULT that no ACK answered
    broker, io = stepped
    for task_id in range(1, 13):
        io.inbox.put(TaskOutcome(task_id, 1, True, b"v" * 10_000, None, True))
    io.poll_once(timeout_s=0)
    (first,) = [body for command, body in broker.pump(0.3) if command == protocol.RESULT]
    # When the broker comes back taking 64 KiB
    welcomed_by_small_broker(stepped)
    io.poll_once(timeout_s=0)
    # Then the results go again in new RESULTs under it, and the old one never again
    bodies = [body for command, body in broker.pump(0.3) if command == protocol.RESULT]
    assert first["seq"] not in {b["seq"] for b in bodies}
    assert sorted(i["id"] for body in bodies for i in items_of(body)) == list(range(1, 13))
    assert max(len(protocol.pack(b)) for b in bodies) < 65_536


def test_a_result_or_state_too_large_for_the_broker_s_messages_fails_at_once(
    stepped: Stepped,
) -> None:
    # Given a worker welcomed by a broker that takes 64 KiB
    broker, io = stepped
    welcomed_by_small_broker(stepped)
    # When a task returns 100 KB, and another checkpoints 100 KB
    io.inbox.put(TaskOutcome(1, 1, True, b"v" * 100_000, None, True))
    big = CheckpointRequest(2, 1, 1, b"s" * 100_000, Waiter())
    io.inbox.put(big)
    io.poll_once(timeout_s=0)
    # Then the task is reported failed, for good, saying why
    (body,) = [body for command, body in broker.pump(0.3) if command == protocol.RESULT]
    (item,) = items_of(body)
    assert (item["ok"], item["retry"]) == (False, False)
    assert "max_message_bytes (65536)" in item["error"]
    # And the checkpoint fails in its task at once, instead of being sent without end
    with pytest.raises(RequestRejected, match="too-large"):
        big.waiter.wait()


def test_a_result_over_the_broker_s_max_result_bytes_fails_at_once(stepped: Stepped) -> None:
    # Given a worker welcomed by a broker that takes results of 1,000 bytes at most
    broker, io = stepped
    limits = dataclasses.asdict(protocol.DEFAULT_LIMITS) | {"max_result_bytes": 1000}
    welcomed_by_small_broker(stepped, limits)
    # When one task returns 2,000 bytes and another 10, finishing in the same turn
    io.inbox.put(TaskOutcome(1, 1, True, b"v" * 2000, None, True))
    io.inbox.put(TaskOutcome(2, 1, True, b"v" * 10, None, True))
    io.poll_once(timeout_s=0)
    # Then the first RESULT already reports the large one failed, for good, saying
    # why, beside the small one's value: the broker never sees the value it would refuse
    (body, *_) = [body for command, body in broker.pump(0.3) if command == protocol.RESULT]
    items = {item["id"]: item for item in items_of(body)}
    assert (items[1]["ok"], items[1]["retry"], items[1]["value"]) == (False, False, None)
    assert items[1]["error"] == "result of 2000 bytes exceeds the broker's max_result_bytes (1000)"
    assert (items[2]["ok"], items[2]["value"]) == (True, b"v" * 10)


def test_an_attempt_called_stale_then_leased_again_starts_with_its_lease(stepped: Stepped) -> None:
    # Given a worker holding attempt 1 of task 1, which the broker's heartbeat calls
    # stale (its log went back, say, and the lease is not there)
    broker, io = stepped
    broker.dispatch(assignment(1, "wt.add", 1, 2))
    step_until(io, lambda: (1, 1) in io.held)
    broker.send(protocol.HEARTBEAT, {"stale": [[1, 1]]})
    step_until(io, lambda: io.is_stale(1, 1))
    # And whose result the broker then refused as stale, so the worker let go of it
    io.inbox.put(outcome(1, 1))
    io.poll_once(timeout_s=0)
    seq, _ = broker.result()
    broker.ack(seq, stale=[1])
    step_until(io, lambda: (1, 1) not in io.held)
    # When the broker leases the task as attempt 1 again, with no heartbeat between
    broker.dispatch(assignment(1, "wt.add", 1, 2))
    step_until(io, lambda: (1, 1) in io.held)
    # Then this lease, current, is not taken for the stale one
    assert not io.is_stale(1, 1)


def test_name_taken_stops_the_process_it_names_and_no_other(stepped: Stepped) -> None:
    broker, io = stepped
    # Given a broker that answers another process of this name: its ERROR, which the
    # shared routing id led here, names that process's incarnation
    error = {"seq": None, "code": protocol.E_NAME_TAKEN, "message": "name taken"}
    broker.send(protocol.ERROR, {**error, "incarnation": "another-process"})
    io.poll_once(timeout_s=0.2)
    # Then this process goes on
    assert io.name_taken is None
    # When the ERROR names this process, Then it is told to stop, with the reason
    broker.send(protocol.ERROR, {**error, "incarnation": io.incarnation})
    step_until(io, lambda: io.name_taken is not None)
    assert io.name_taken == "name taken"


def test_a_draining_worker_told_its_name_is_taken_stops_draining_and_exits_cleanly(
    broker: FakeBroker, start: Start
) -> None:
    # Given a worker draining (asked to stop) with a task that would run for 30 s
    w = start()
    ready = broker.register()
    broker.dispatch(assignment(1, "wt.wait", "name-taken-drain"))
    assert worker_tasks.gate("name-taken-drain:started").wait(5)
    w.worker.stop(drain=True)
    # When the broker says another live process took the name (a rolling restart
    # under one name, say)
    error = {"seq": None, "code": protocol.E_NAME_TAKEN, "message": "taken"}
    broker.send(protocol.ERROR, {**error, "incarnation": ready["incarnation"]})
    # Then it stops within a second, without the 30 s drain, and without an error:
    # it was stopping anyway
    began = time.monotonic()
    w.join(timeout_s=5)
    assert time.monotonic() - began < 2
    assert [c for c, _ in broker.pump(0.2)] == []  # no DISCONNECT in the other's name


def test_a_heartbeat_names_the_process_as_its_ready_did(broker: FakeBroker, start: Start) -> None:
    start()
    ready = broker.register()
    broker.last_held(after=time.monotonic())
    incarnations = {body.get("incarnation") for _, body in broker.heartbeats}
    assert incarnations == {ready["incarnation"]} and len(ready["incarnation"]) == 32


def test_a_broker_heartbeat_naming_a_held_attempt_stale_reaches_its_task(
    broker: FakeBroker, start: Start
) -> None:
    # Given a task that polls ctx.lease_lost and never checkpoints
    start()
    broker.register()
    broker.dispatch(assignment(1, "wt.until_stale", 10.0), assignment(2, "wt.until_stale", 0.5))
    assert broker.last_held(after=time.monotonic()) == [[1, 1], [2, 1]]
    # When the broker's heartbeat says attempt 1 of task 1 is stale (cancelled, say)
    broker.send(protocol.HEARTBEAT, {"stale": [[1, 1], [99, 1]]})
    # Then that task sees it at once and ends; the other one never does
    results = broker.results_acked(2)
    assert protocol.unpack(results[1]["value"]) is True
    assert protocol.unpack(results[2]["value"]) is False
