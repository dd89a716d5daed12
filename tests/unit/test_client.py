"""The client against a fake broker: a ROUTER socket the test drives by hand.

The client blocks until its request is answered, so each client call runs
in a one-thread executor while the test thread plays the broker.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import zmq

from taskring import protocol
from taskring.client import Client, TaskInfo
from taskring.errors import (
    BrokerUnavailable,
    RequestRejected,
    ResultTimeout,
    TaskFailed,
    TaskNotFound,
    TaskringError,
)
from taskring.reliable import Backoff

T = TypeVar("T")
FAST = Backoff(initial_s=0.05, factor=2.0, max_s=0.2)


class FakeBroker:
    def __init__(self, sock: zmq.Socket[bytes], endpoint: str) -> None:
        self.sock = sock
        self.endpoint = endpoint

    def recv_raw(self, timeout_s: float = 5.0) -> list[bytes]:
        if not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            pytest.fail(f"the fake broker received nothing from the client within {timeout_s} s")
        return self.sock.recv_multipart()

    def recv(self, timeout_s: float = 5.0) -> tuple[bytes, bytes, dict[str, Any]]:
        """(client identity, command, body) of the next message."""
        identity, proto, command, body = self.recv_raw(timeout_s)
        assert proto == protocol.PROTOCOL_CLIENT
        return identity, command, protocol.unpack(body)

    def quiet(self, timeout_s: float = 0.2) -> bool:
        """True if nothing arrives within timeout_s (a poll, not a sleep)."""
        return not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN)

    def send(self, identity: bytes, command: bytes, body: dict[str, Any]) -> None:
        self.sock.send_multipart(
            [identity, *protocol.frames(protocol.PROTOCOL_CLIENT, command, body)]
        )

    def reply(self, identity: bytes, seq: int, **fields: Any) -> None:
        self.send(identity, protocol.REPLY, {"seq": seq, **fields})


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def broker(context: zmq.Context[zmq.Socket[bytes]]) -> FakeBroker:
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return FakeBroker(sock, f"tcp://127.0.0.1:{port}")


@pytest.fixture
def client(broker: FakeBroker, context: zmq.Context[zmq.Socket[bytes]]) -> Iterator[Client]:
    with Client(
        broker.endpoint,
        timeout_s=5.0,
        backoff=FAST,
        repoll_s=0.2,
        context=context,
        limits=protocol.DEFAULT_LIMITS,
    ) as c:
        yield c


@pytest.fixture
def patient_client(broker: FakeBroker, context: zmq.Context[zmq.Socket[bytes]]) -> Iterator[Client]:
    """A client that does not resend within a test's run, so quiet periods are quiet."""
    slow = Backoff(initial_s=10.0)
    with Client(
        broker.endpoint,
        timeout_s=20.0,
        backoff=slow,
        context=context,
        limits=protocol.DEFAULT_LIMITS,
    ) as c:
        yield c


@pytest.fixture
def in_thread() -> Iterator[Callable[..., Future[Any]]]:
    with ThreadPoolExecutor(1) as pool:

        def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
            return pool.submit(fn, *args, **kwargs)

        yield run


def view(task_id: int, state: str = protocol.QUEUED, **fields: Any) -> dict[str, Any]:
    row = {
        "id": task_id,
        "name": "add",
        "state": state,
        "key": None,
        "attempt": 0,
        "max_attempts": 3,
        "spared": 0,
        "worker": None,
        "result": None,
        "error": None,
        "created_at": 1.0,
        "updated_at": 2.0,
    }
    row.update(fields)
    return protocol.task_view(row)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- submit


def test_submit_returns_the_id_from_the_reply(client, broker, in_thread):
    # Given a client submitting add(1, 2) with a key
    pending = in_thread(client.submit, "add", 1, 2, key="user-7", kwargs={"z": 3})
    # When the broker answers with id 41
    identity, command, body = broker.recv()
    broker.reply(identity, body["seq"], ids=[41], unknown=[])
    # Then the handle carries that id, and the SUBMIT carried the packed call
    handle = pending.result(timeout=5)
    assert handle.id == 41 and not handle.unknown_name
    assert command == protocol.SUBMIT
    (item,) = body["tasks"]
    assert item["name"] == "add" and item["key"] == "user-7"
    assert protocol.unpack(item["payload"]) == [[1, 2], {"z": 3}]
    assert identity.startswith(b"c-")


def test_a_dropped_submit_is_resent_with_the_same_seq_and_frames(client, broker, in_thread):
    # Given a broker that drops the first SUBMIT
    pending = in_thread(client.submit, "add", 1, 2)
    first = broker.recv_raw()
    # When the client's resend arrives and is answered
    second = broker.recv_raw()
    seq = protocol.unpack(second[3])["seq"]
    broker.reply(second[0], seq, ids=[5], unknown=[])
    # Then the resend is the very same message, and the submit succeeds once
    assert second == first
    assert pending.result(timeout=5).id == 5


def test_no_broker_raises_broker_unavailable(context):
    # Given an endpoint nobody listens on and a short timeout
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with (
        Client(endpoint, timeout_s=0.3, backoff=FAST, context=context) as client,
        # When submitting, Then the client gives up with a readable sentence
        pytest.raises(BrokerUnavailable, match=r"did not answer within 0.3 s"),
    ):
        client.submit("add", 1, 2)


def test_unencodable_arguments_raise_type_error_before_sending(client, broker):
    # Given arguments msgpack cannot carry (an object; a dict with int keys)
    # When submitting them, Then TypeError is raised and nothing reaches the broker
    with pytest.raises(TypeError, match="cannot be sent"):
        client.submit("add", object())
    with pytest.raises(TypeError, match="cannot be sent"):
        client.submit("add", {1: "one"})
    with pytest.raises(TypeError):
        client.submit_many("add", [[1], [object()]])
    assert broker.quiet(0.1)


def test_error_reply_raises_request_rejected(client, broker, in_thread):
    # Given a strict submit of a name no worker registered
    pending = in_thread(client.submit, "nope", strict=True)
    identity, _, body = broker.recv()
    assert body["strict"] is True
    # When the broker answers ERROR unknown-task
    broker.send(
        identity,
        protocol.ERROR,
        protocol.error_body(
            body["seq"], protocol.E_UNKNOWN_TASK, "unknown task 'nope'; known: add"
        ),
    )
    # Then the client raises RequestRejected with the code and message
    with pytest.raises(RequestRejected) as caught:
        pending.result(timeout=5)
    assert caught.value.code == protocol.E_UNKNOWN_TASK
    assert "known: add" in caught.value.message


def test_unknown_name_is_recorded_on_the_handle(client, broker, in_thread, caplog):
    # Given a non-strict submit of a name no worker registered
    pending = in_thread(client.submit, "nope")
    identity, _, body = broker.recv()
    # When the reply lists it as unknown
    broker.reply(identity, body["seq"], ids=[3], unknown=["nope"], known=["add", "mul"])
    # Then the handle says so and a warning is logged (not warnings.warn)
    handle = pending.result(timeout=5)
    assert handle.unknown_name and handle.known_names == ("add", "mul")
    assert "known tasks: add, mul" in caplog.text


def test_a_duplicate_reply_is_ignored(client, broker, in_thread):
    # Given a submit answered twice (as after a resend)
    pending = in_thread(client.submit, "add", 1)
    identity, _, body = broker.recv()
    broker.reply(identity, body["seq"], ids=[1], unknown=[])
    broker.reply(identity, body["seq"], ids=[1], unknown=[])
    assert pending.result(timeout=5).id == 1
    # When the next request is answered
    pending = in_thread(client.submit, "add", 2)
    identity, _, body = broker.recv()
    broker.reply(identity, body["seq"], ids=[2], unknown=[])
    # Then it gets its own answer, not the stale duplicate
    assert pending.result(timeout=5).id == 2


# ---------------------------------------------------------------- submit_many


def test_submit_many_keeps_at_most_window_in_flight_and_keeps_order(
    patient_client, broker, in_thread
):
    # Given 95 tasks in batches of 10 with a window of 3
    window, n = 3, 95
    pending = in_thread(
        patient_client.submit_many,
        "add",
        ([i, i] for i in range(n)),
        key=lambda args: f"user-{args[0] % 7}",
        batch=10,
        window=window,
    )
    # When the broker answers only once the client goes quiet, newest first
    in_flight: dict[int, tuple[bytes, list[Any]]] = {}
    most = answered = 0
    keys = set()
    while answered < 10:
        if not broker.quiet(0.2):
            identity, command, body = broker.recv()
            assert command == protocol.SUBMIT
            in_flight[body["seq"]] = (identity, body["tasks"])
            most = max(most, len(in_flight))
            assert len(in_flight) <= window
            continue
        assert in_flight, "the client went quiet with nothing in flight"
        for seq in sorted(in_flight, reverse=True):
            identity, items = in_flight.pop(seq)
            keys.update(item["key"] for item in items)
            ids = [1000 + protocol.unpack(item["payload"])[0][0] for item in items]
            broker.reply(identity, seq, ids=ids, unknown=[])
            answered += 1
    # Then the window was used but never exceeded, and ids come back in input order
    assert most == window
    assert pending.result(timeout=5) == [1000 + i for i in range(n)]
    assert keys == {f"user-{i}" for i in range(7)}


def test_submit_many_cuts_batches_that_would_outgrow_a_message(patient_client, broker, in_thread):
    # Given 20 tasks whose arguments pack to almost 1 MiB each: 20 MiB in all
    big = b"x" * (protocol.DEFAULT_LIMITS.max_payload_bytes - 100)
    pending = in_thread(patient_client.submit_many, "add", [[big] for _ in range(20)])
    # When the broker answers every SUBMIT it gets
    sizes, count = [], 0
    while count < 20:
        identity, _, body = broker.recv()
        sizes.append(len(protocol.pack(body)))
        ids = list(range(count + 1, count + len(body["tasks"]) + 1))
        count += len(ids)
        broker.reply(identity, body["seq"], ids=ids, unknown=[])
    # Then each SUBMIT stayed under the size limit, and every task was sent once
    assert pending.result(timeout=5) == list(range(1, 21))
    assert len(sizes) >= 3 and max(sizes) < protocol.DEFAULT_LIMITS.max_message_bytes


def test_submit_many_sizes_its_batches_by_the_limits_the_broker_announces(
    broker, context, in_thread
):
    # Given a client told no limits, and a broker whose messages may be 64 KiB
    with Client(broker.endpoint, timeout_s=5.0, context=context) as fresh:
        pending = in_thread(fresh.submit_many, "add", [[b"x" * 10_000] for _ in range(20)])
        # When it first asks the broker's limits
        identity, command, body = broker.recv()
        assert command == protocol.STATUS
        limits = dataclasses.asdict(protocol.DEFAULT_LIMITS) | {"max_message_bytes": 65_536}
        broker.reply(identity, body["seq"], workers=[], states={}, broker={"limits": limits})
        # Then every SUBMIT fits them
        count = 0
        while count < 20:
            identity, command, body = broker.recv()
            assert command == protocol.SUBMIT and len(protocol.pack(body)) < 65_536
            count += len(body["tasks"])
            broker.reply(identity, body["seq"], ids=list(range(count - len(body["tasks"]), count)))
        assert len(pending.result(timeout=5)) == 20
        # And it asks only once
        pending = in_thread(fresh.submit_many, "add", [[1]])
        identity, command, body = broker.recv()
        assert command == protocol.SUBMIT
        broker.reply(identity, body["seq"], ids=[99])
        assert pending.result(timeout=5) == [99]


def test_limits_are_asked_again_after_a_submit_went_unanswered(broker, context, in_thread):
    # Given a client that learnt the broker's limits, then got no answer to a SUBMIT
    with Client(broker.endpoint, timeout_s=0.5, backoff=FAST, context=context) as fresh:
        pending = in_thread(fresh.submit_many, "add", [[1]])
        identity, _, body = broker.recv()
        broker.reply(identity, body["seq"], workers=[], states={}, broker={})
        with pytest.raises(BrokerUnavailable):
            pending.result(timeout=5)
        while not broker.quiet(0.1):  # the unanswered SUBMIT and its resends
            broker.recv()
        # When it submits again, Then it asks the limits first: the broker may have
        # restarted with smaller ones, which would explain the silence
        pending = in_thread(fresh.submit_many, "add", [[2]])
        identity, command, body = broker.recv()
        assert command == protocol.STATUS
        broker.reply(identity, body["seq"], workers=[], states={}, broker={})
        identity, command, body = broker.recv()
        broker.reply(identity, body["seq"], ids=[7])
        assert pending.result(timeout=5) == [7]


def test_submit_many_counts_names_and_keys_in_bytes(patient_client, broker, in_thread):
    # Given a broker that takes 64 KiB, and tasks whose 256-character keys are 768 bytes
    patient_client._limits = dataclasses.replace(protocol.DEFAULT_LIMITS, max_message_bytes=65_536)
    pending = in_thread(
        patient_client.submit_many, "add", [[i] for i in range(200)], key=lambda a: "鍵" * 256
    )
    # Then no SUBMIT outgrows the limit
    count = 0
    while count < 200:
        identity, _, body = broker.recv()
        assert len(protocol.pack(body)) < 65_536
        broker.reply(identity, body["seq"], ids=list(range(count, count + len(body["tasks"]))))
        count += len(body["tasks"])
    assert len(pending.result(timeout=5)) == 200


def test_a_broker_that_announces_no_limits_has_the_defaults(broker, context, in_thread):
    with Client(broker.endpoint, timeout_s=5.0, context=context) as fresh:
        pending = in_thread(fresh.broker_limits)
        identity, _, body = broker.recv()
        broker.reply(identity, body["seq"], workers=[], states={}, broker={"version": "0.0.1"})
        assert pending.result(timeout=5) == protocol.DEFAULT_LIMITS
    with Client(broker.endpoint, timeout_s=5.0, context=context) as other:
        pending = in_thread(other.broker_limits)
        identity, _, body = broker.recv()
        broker.reply(identity, body["seq"], workers=[], states={}, broker=None)
        assert pending.result(timeout=5) == protocol.DEFAULT_LIMITS


def test_submit_many_sends_the_first_batch_alone(patient_client, broker, in_thread):
    # Given a strict submit_many of several batches
    pending = in_thread(
        patient_client.submit_many, "add", [[i] for i in range(30)], batch=10, strict=True
    )
    identity, _, body = broker.recv()
    # When the first batch is not answered yet
    # Then no other batch is sent (a strict rejection stores nothing)
    assert broker.quiet(0.2)
    broker.send(identity, protocol.ERROR, protocol.error_body(body["seq"], "unknown-task", "no"))
    with pytest.raises(RequestRejected):
        pending.result(timeout=5)


# ---------------------------------------------------------------- results


def test_result_returns_on_notify(client, broker, in_thread):
    # Given a client waiting for task 9, which is still running
    pending = in_thread(client.result, 9)
    identity, command, body = broker.recv()
    assert command == protocol.GET and body["ids"] == [9] and body["watch"] is True
    broker.reply(identity, body["seq"], tasks=[view(9, protocol.RUNNING)])
    # When the broker pushes a NOTIFY with its result
    done = view(9, protocol.SUCCEEDED, result=protocol.pack({"sum": 42}))
    broker.send(identity, protocol.NOTIFY, {"tasks": [done]})
    # Then result() returns the unpacked value
    assert pending.result(timeout=5) == {"sum": 42}


def test_a_state_this_client_does_not_know_is_final_and_ends_a_wait(client, broker, in_thread):
    # Given a client waiting for task 9, which is still running
    pending = in_thread(client.wait, [9])
    identity, _, body = broker.recv()
    broker.reply(identity, body["seq"], tasks=[view(9, protocol.RUNNING)])
    # When a newer broker reports it ended in a state added after this client
    broker.send(identity, protocol.NOTIFY, {"tasks": [view(9, "archived")]})
    # Then the wait ends with it, done but not ok (protocol.md, Versioning)
    info = pending.result(timeout=5)[9]
    assert (info.state, info.done, info.ok) == ("archived", True, False)


def test_result_returns_on_a_re_get_when_no_notify_comes(client, broker, in_thread):
    # Given a client waiting for task 9 and a broker that never sends NOTIFY
    pending = in_thread(client.result, 9)
    identity, _, body = broker.recv()
    broker.reply(identity, body["seq"], tasks=[view(9, protocol.RUNNING)])
    # When the client asks again (safety-net GET) and the task is done by then
    identity, command, body = broker.recv()
    assert command == protocol.GET and body["ids"] == [9]
    broker.reply(
        identity, body["seq"], tasks=[view(9, protocol.SUCCEEDED, result=protocol.pack(7))]
    )
    # Then result() returns
    assert pending.result(timeout=5) == 7


def test_notify_buffered_between_requests_is_used_by_result(client, broker, in_thread):
    # Given a NOTIFY that arrives while the client waits for something else
    pending = in_thread(client.submit, "add", 1)
    identity, _, body = broker.recv()
    broker.send(
        identity, protocol.NOTIFY, {"tasks": [view(4, protocol.SUCCEEDED, result=protocol.pack(5))]}
    )
    broker.reply(identity, body["seq"], ids=[4], unknown=[])
    handle = pending.result(timeout=5)
    # When asking for the task's result, Then it comes from the buffer without a GET
    assert handle.result(timeout=1) == 5
    assert broker.quiet(0.1)


def test_waiting_does_not_spin_while_tasks_keep_finishing(broker, context, in_thread, monkeypatch):
    # Given a client that asks again after 0.3 s without progress, waiting for 4 and 5
    with Client(broker.endpoint, backoff=FAST, repoll_s=0.3, context=context) as client:
        pumps = 0
        pump = client._pump

        def counted(until: float) -> None:
            nonlocal pumps
            pumps += 1
            pump(until)

        monkeypatch.setattr(client, "_pump", counted)
        pending = in_thread(client.wait, [4, 5])
        identity, _, body = broker.recv()
        broker.reply(identity, body["seq"], tasks=[view(4, "running"), view(5, "running")])
        # When task 4 finishes just before the re-poll is due, and 5 a while after it
        assert broker.quiet(0.2)
        broker.send(identity, protocol.NOTIFY, {"tasks": [view(4, protocol.SUCCEEDED)]})
        assert broker.quiet(0.25)  # past the first re-poll time, but progress was recent
        broker.send(identity, protocol.NOTIFY, {"tasks": [view(5, protocol.SUCCEEDED)]})
        assert all(info.done for info in pending.result(timeout=5).values())
    # Then the client slept between messages instead of polling in a loop
    assert pumps < 20


def test_a_timeout_on_a_task_this_client_submitted_is_kept(broker, context, in_thread):
    # Given a client that re-polls only every 5 s and a task it submitted itself
    # (so it waits on the NOTIFY and has never asked about its state)
    with Client(broker.endpoint, backoff=FAST, repoll_s=5.0, context=context) as client:
        pending = in_thread(client.submit, "add", 1)
        identity, _, body = broker.recv()
        broker.reply(identity, body["seq"], ids=[8], unknown=[])
        handle = pending.result(timeout=5)
        # When it waits with a 0.2 s timeout and no NOTIFY comes
        began = time.monotonic()
        waiting = in_thread(handle.result, 0.2)
        # Then at the deadline it asks once about the task it never saw
        identity, command, body = broker.recv()
        assert command == protocol.GET and body["ids"] == [8]
        broker.reply(identity, body["seq"], tasks=[view(8, protocol.RUNNING)])
        # And reports the timeout with the state, long before the next re-poll
        with pytest.raises(ResultTimeout, match="state: running"):
            waiting.result(timeout=5)
        assert time.monotonic() - began < 2.5


def test_failed_task_raises_task_failed(client, broker, in_thread):
    pending = in_thread(client.result, 2)
    identity, _, body = broker.recv()
    broker.reply(identity, body["seq"], tasks=[view(2, protocol.DEAD, error="worker lost 3 times")])
    with pytest.raises(TaskFailed, match="task 2 dead: worker lost 3 times"):
        pending.result(timeout=5)


def test_unknown_task_raises_task_not_found(client, broker, in_thread):
    pending = in_thread(client.status, 77)
    identity, _, body = broker.recv()
    broker.reply(identity, body["seq"], tasks=[None])
    with pytest.raises(TaskNotFound, match="no task with id 77"):
        pending.result(timeout=5)


def test_result_timeout(client, broker, in_thread):
    # Given a task that stays running
    pending = in_thread(client.result, 3, 0.3)
    # When the broker keeps answering "running"
    while not pending.done():
        if broker.sock.poll(100, zmq.POLLIN):
            identity, _, body = broker.recv()
            broker.reply(identity, body["seq"], tasks=[view(3, protocol.RUNNING)])
    # Then result() raises ResultTimeout naming the state
    with pytest.raises(ResultTimeout, match="state: running"):
        pending.result(timeout=5)


def test_wait_gets_many_in_batches_of_at_most_1000(client, broker, in_thread):
    # Given 2500 ids to wait for
    ids = list(range(1, 2501))
    pending = in_thread(client.wait, ids)
    # When each GET is answered with the tasks succeeded
    asked: list[int] = []
    while len(asked) < len(ids):
        identity, command, body = broker.recv()
        assert command == protocol.GET and len(body["ids"]) <= 1000
        asked.extend(body["ids"])
        broker.reply(
            identity, body["seq"], tasks=[view(i, protocol.SUCCEEDED) for i in body["ids"]]
        )
    # Then wait returns every id, in order, done
    infos = pending.result(timeout=5)
    assert list(infos) == ids
    assert all(isinstance(i, TaskInfo) and i.done for i in infos.values())


def test_a_get_answered_for_the_first_ids_only_is_asked_again_for_the_rest(
    client, broker, in_thread
):
    # Given a wait on 10 tasks this client did not submit
    ids = list(range(1, 11))
    pending = in_thread(client.wait, ids)
    # When the broker answers each GET for its first 3 ids only (their views filled a message)
    asked: list[list[int]] = []
    answered = 0
    while answered < len(ids):
        identity, command, body = broker.recv()
        assert command == protocol.GET
        asked.append(body["ids"])
        first = body["ids"][:3]
        broker.reply(identity, body["seq"], tasks=[view(i, protocol.SUCCEEDED) for i in first])
        answered += len(first)
    # Then the client asks again for what was left out, and has every task
    assert asked == [ids, ids[3:], ids[6:], ids[9:]]
    infos = pending.result(timeout=5)
    assert list(infos) == ids and all(i.done for i in infos.values())


def test_broker_status_history_and_list(client, broker, in_thread):
    pending = in_thread(client.broker_status)
    identity, command, body = broker.recv()
    assert command == protocol.STATUS
    broker.reply(identity, body["seq"], workers=[], states={"queued": 2}, broker={})
    assert pending.result(timeout=5)["states"] == {"queued": 2}

    pending = in_thread(client.list_tasks, state="queued", limit=2)
    identity, command, body = broker.recv()
    assert command == protocol.TASKS and body["state"] == "queued" and body["limit"] == 2
    broker.reply(identity, body["seq"], tasks=[view(2), view(1)])
    assert [t.id for t in pending.result(timeout=5)] == [2, 1]

    pending = in_thread(client.history, 1)
    identity, command, body = broker.recv()
    assert command == protocol.HISTORY and body["id"] == 1
    event = {"at": 1.5, "kind": "submitted", "attempt": 0, "worker": None, "detail": None}
    broker.reply(identity, body["seq"], task=view(1), events=[event])
    info, events = pending.result(timeout=5)
    assert info is not None and info.id == 1 and events == [event]


def test_list_tasks_asks_again_after_a_reply_cut_short_by_size(client, broker, in_thread):
    # Given a listing of 5 tasks without results that the broker cuts short after 2
    pending = in_thread(client.list_tasks, limit=5, results=False)
    identity, _, body = broker.recv()
    assert (body["limit"], body["before_id"], body["results"]) == (5, None, False)
    broker.reply(identity, body["seq"], tasks=[view(9), view(8)], more=True)
    # When the client asks again, it asks for the rest, below the last id it got
    identity, _, body = broker.recv()
    assert (body["limit"], body["before_id"], body["results"]) == (3, 8, False)
    broker.reply(identity, body["seq"], tasks=[view(6)], more=False)
    # Then a REPLY that was not cut short ends it, and it has every task in order
    assert [t.id for t in pending.result(timeout=5)] == [9, 8, 6]
    assert broker.quiet(0.2)


def test_list_tasks_asks_once_when_fewer_tasks_match(client, broker, in_thread):
    pending = in_thread(client.list_tasks, limit=5)
    identity, _, body = broker.recv()
    assert body["results"] is True  # by default the views carry results
    broker.reply(identity, body["seq"], tasks=[view(2)])  # no `more`, as older brokers
    assert [t.id for t in pending.result(timeout=5)] == [2]
    assert broker.quiet(0.2)
    with pytest.raises(ValueError, match=r"limit must be 1\.\.1000"):
        client.list_tasks(limit=0)


def test_list_tasks_refuses_a_page_that_goes_back(client, broker, in_thread):
    pending = in_thread(client.list_tasks, limit=5)
    identity, _, body = broker.recv()
    broker.reply(identity, body["seq"], tasks=[view(9), view(8)], more=True)
    identity, _, body = broker.recv()
    broker.reply(identity, body["seq"], tasks=[view(8)], more=True)
    with pytest.raises(TaskringError, match="went back"):
        pending.result(timeout=5)


def test_history_takes_each_event_once_from_a_page_out_of_order(client, broker, in_thread):
    pending = in_thread(client.history, 7)
    event = {"at": 1.0, "kind": "leased", "attempt": 1, "worker": "w1", "detail": None}
    identity, _, body = broker.recv()
    page = [event | {"n": 5}, event | {"n": 3}]
    broker.reply(identity, body["seq"], task=view(7), events=page, more=True)
    identity, _, body = broker.recv()
    assert body["after"] == 5  # the highest number it got, not the last
    page = [event | {"n": 5}, event | {"n": 6}]
    broker.reply(identity, body["seq"], task=view(7), events=page, more=False)
    _, events = pending.result(timeout=5)
    assert [e["n"] for e in events] == [5, 3, 6]


def test_cancel_asks_in_batches_and_maps_each_id_to_its_state(client, broker, in_thread):
    # Given 1,500 ids to cancel, one of them twice
    ids = [*range(1, 1501), 7]
    pending = in_thread(client.cancel, ids)
    # When the broker answers each CANCEL (it never sees more than max_batch ids)
    asked = []
    while len(asked) < 1500:
        identity, command, body = broker.recv()
        assert command == protocol.CANCEL and len(body["ids"]) <= protocol.DEFAULT_LIMITS.max_batch
        asked += body["ids"]
        states = ["succeeded" if i == 2 else None if i == 3 else "cancelled" for i in body["ids"]]
        broker.reply(identity, body["seq"], states=states)
    # Then every id was asked once, and each has its state
    result = pending.result(timeout=5)
    assert asked == list(range(1, 1501))
    assert (result[1], result[2], result[3], result[7]) == (
        "cancelled",
        "succeeded",
        None,
        "cancelled",
    )
    assert len(result) == 1500


def test_cancel_refuses_a_reply_without_a_state_for_each_id(client, broker, in_thread):
    pending = in_thread(client.cancel, [1, 2])
    identity, _, body = broker.recv()
    broker.reply(identity, body["seq"], states=["cancelled"])
    with pytest.raises(TaskringError, match="no state for each id"):
        pending.result(timeout=5)


def test_cancel_returns_a_state_this_client_does_not_know(client, broker, in_thread):
    # A newer broker's final state is a final state all the same (protocol.md, Versioning)
    pending = in_thread(client.cancel, [1])
    identity, _, body = broker.recv()
    broker.reply(identity, body["seq"], states=["archived"])
    assert pending.result(timeout=5) == {1: "archived"}


def test_history_asks_for_pages_until_the_broker_says_there_are_no_more(client, broker, in_thread):
    # Given a history the broker answers in two pages
    pending = in_thread(client.history, 7)
    first = {"n": 3, "at": 1.0, "kind": "submitted", "attempt": 0, "worker": None, "detail": None}
    second = {"n": 9, "at": 2.0, "kind": "leased", "attempt": 1, "worker": "w1", "detail": None}
    identity, _, body = broker.recv()
    assert (body["id"], body["after"]) == (7, 0)
    broker.reply(identity, body["seq"], task=view(7), events=[first], more=True)
    # When the client asks again, it asks for what follows the last event it got
    identity, _, body = broker.recv()
    assert (body["id"], body["after"]) == (7, 3)
    broker.reply(identity, body["seq"], task=view(7, protocol.RUNNING), events=[second], more=False)
    # Then it returns both pages in order, and the view of the last one
    info, events = pending.result(timeout=5)
    assert events == [first, second] and info is not None and info.state == protocol.RUNNING


def test_history_that_claims_more_without_a_later_event_is_refused(client, broker, in_thread):
    pending = in_thread(client.history, 7)
    identity, _, body = broker.recv()
    broker.reply(identity, body["seq"], task=view(7), events=[], more=True)
    with pytest.raises(TaskringError, match="no later event number"):
        pending.result(timeout=5)


def test_the_safety_net_get_takes_turns_when_many_tasks_are_pending(
    client, broker, in_thread, monkeypatch
):
    # Given a wait on 10 tasks and a safety net of 3 ids a round
    monkeypatch.setattr("taskring.client._REPOLL_IDS", 3)
    ids = list(range(1, 11))
    pending = in_thread(client.wait, ids)
    # When the first GET (all ten) says running, and each later GET is answered done
    identity, _, body = broker.recv()
    assert body["ids"] == ids
    broker.reply(identity, body["seq"], tasks=[view(i, protocol.RUNNING) for i in ids])
    rounds: list[list[int]] = []
    while not pending.done():
        if not broker.sock.poll(100, zmq.POLLIN):
            continue
        identity, _, body = broker.recv()
        rounds.append(body["ids"])
        tasks = [view(i, protocol.SUCCEEDED) for i in body["ids"]]
        broker.reply(identity, body["seq"], tasks=tasks)
    # Then each later round asked about at most 3 distinct ids, in turn, and all finished
    assert all(len(r) == len(set(r)) <= 3 for r in rounds)
    assert sorted(i for r in rounds for i in r) == ids
    assert all(info.done for info in pending.result(timeout=5).values())


def test_a_closed_client_says_so_instead_of_a_socket_error():
    client = Client("tcp://127.0.0.1:9", timeout_s=0.2)
    client.close()
    with pytest.raises(TaskringError, match="closed"):
        client.status(1)


def test_a_view_s_spared_attempts_are_read_and_checked() -> None:
    # Given views with spared attempts, without (an older broker), and with a bad one
    assert TaskInfo.from_view(view(1, attempt=3, spared=2)).spared == 2
    older = {k: v for k, v in view(1).items() if k != "spared"}
    assert TaskInfo.from_view(older).spared == 0
    # Then the bad one is refused, on the fast path and the checked one alike
    with pytest.raises(TaskringError, match="'spared' is str"):
        TaskInfo.from_view(view(1, spared="2"))
    with pytest.raises(TaskringError, match="'spared' is bool"):
        TaskInfo.from_view({**view(1, spared=True), "created_at": 1})
