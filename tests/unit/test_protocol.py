"""The wire codec: good messages round-trip, bad ones raise ProtocolError and nothing else.

Each test reads Given / When / Then. Bodies are built fresh per test from the
good examples below, so one test's mutation cannot leak into another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskring import protocol as p

PEER = b"c-0123456789abcdef0123456789abcdef"  # a client's routing id, as the ROUTER sees it
CODES = frozenset(v for k, v in vars(p).items() if k.startswith("E_"))
PAYLOAD = p.pack([["img/42.png"], {"width": 640}])
VALUE = p.pack({"width": 640, "height": 480})
STATE = p.pack({"rows_done": 500})
INCARNATION = "9b1f5c2e7a4d4e0f8c3b6a1d2e5f7a90"  # uuid4().hex, as the reference worker sends

Decoder = Callable[..., object]


def submit_body() -> dict[str, Any]:
    return {
        "seq": 1,
        "tasks": [
            {
                "name": "shop.resize",
                "payload": PAYLOAD,
                "key": "img/42.png",
                "idem": "order-7",
                "max_attempts": 5,
            },
            {"name": "shop.crop", "payload": PAYLOAD},
        ],
        "watch": True,
        "strict": False,
    }


def ready_body() -> dict[str, Any]:
    return {
        "seq": 1,
        "capacity": 4,
        "concurrency": 2,
        "tasks": {"shop.resize": 3, "shop.crop": 1},
        "held": [[42, 2]],
        "pid": 4242,
        "host": "web-1",
        "pool": "process",
        "incarnation": INCARNATION,
        "dseq": 6,
    }


def result_body() -> dict[str, Any]:
    return {
        "seq": 3,
        "results": [
            {"id": 42, "attempt": 2, "ok": True, "value": VALUE, "error": None, "retry": True},
            {"id": 43, "attempt": 1, "ok": False, "error": "ValueError: bad", "retry": False},
        ],
    }


def checkpoint_body() -> dict[str, Any]:
    return {
        "seq": 2,
        "checkpoints": [
            {"id": 42, "attempt": 2, "number": 4, "state": STATE},
            {"id": 43, "attempt": 1, "number": 1, "state": p.pack(None)},
        ],
    }


def dispatch_body() -> dict[str, Any]:
    return {
        "dseq": 7,
        "tasks": [
            p.assignment_body(42, 2, "shop.resize", PAYLOAD, STATE, 3),
            {"id": 43, "attempt": 1, "name": "shop.crop", "payload": PAYLOAD},
        ],
    }


# name -> (decoder, protocol id, command or None for broker -> worker, a good body)
GOOD: dict[str, tuple[Decoder, bytes, Callable[[], dict[str, Any]]]] = {
    "submit": (p.decode_submit, p.PROTOCOL_CLIENT, submit_body),
    "get": (p.decode_get, p.PROTOCOL_CLIENT, lambda: {"seq": 2, "ids": [42, 7], "watch": True}),
    "status": (p.decode_status, p.PROTOCOL_CLIENT, lambda: {"seq": 3}),
    "tasks": (
        p.decode_tasks,
        p.PROTOCOL_CLIENT,
        lambda: {"seq": 4, "state": "failed", "name": "shop.crop", "limit": 20, "before_id": 99},
    ),
    "history": (p.decode_history, p.PROTOCOL_CLIENT, lambda: {"seq": 5, "id": 42}),
    "cancel": (p.decode_cancel, p.PROTOCOL_CLIENT, lambda: {"seq": 6, "ids": [42, 43]}),
    "prune": (
        p.decode_prune,
        p.PROTOCOL_CLIENT,
        lambda: {"seq": 7, "before": 1.7e9, "states": ["succeeded"], "after_id": 2000},
    ),
    "ready": (p.decode_ready, p.PROTOCOL_WORKER, ready_body),
    "heartbeat": (
        p.decode_worker_heartbeat,
        p.PROTOCOL_WORKER,
        lambda: {"dseq": 7, "held": [[42, 2], [43, 1]]},
    ),
    "result": (p.decode_result, p.PROTOCOL_WORKER, result_body),
    "checkpoint": (p.decode_checkpoint, p.PROTOCOL_WORKER, checkpoint_body),
    "disconnect": (p.decode_worker_disconnect, p.PROTOCOL_WORKER, lambda: {"reason": "shutdown"}),
    "dispatch": (p.decode_dispatch, p.PROTOCOL_WORKER, dispatch_body),
    "welcome": (
        p.decode_welcome,
        p.PROTOCOL_WORKER,
        lambda: {"seq": 1, "heartbeat_ms": 250, "liveness": 5, "dseq": 6},
    ),
    "ack": (p.decode_ack, p.PROTOCOL_WORKER, lambda: {"seq": 3, "stale": [43]}),
}
COMMAND_OF = {
    "submit": p.SUBMIT,
    "get": p.GET,
    "status": p.STATUS,
    "tasks": p.TASKS,
    "history": p.HISTORY,
    "cancel": p.CANCEL,
    "prune": p.PRUNE,
    "ready": p.READY,
    "heartbeat": p.HEARTBEAT,
    "result": p.RESULT,
    "checkpoint": p.CHECKPOINT,
    "disconnect": p.DISCONNECT,
}


def received(protocol: bytes, command: bytes, body: Mapping[str, Any]) -> p.Envelope:
    """A message as the broker's ROUTER hands it over: routing id, then the three frames."""
    return p.open_envelope([PEER, *p.frames(protocol, command, body)])


@contextlib.contextmanager
def rejected(code: str, fragment: str = "") -> Iterator[None]:
    """Expect ProtocolError with `code` whose message contains `fragment`."""
    with pytest.raises(p.ProtocolError) as info:
        yield
    error = info.value
    assert error.code == code, f"code {error.code!r} ({error.message}), expected {code!r}"
    assert fragment in error.message, f"{fragment!r} not in {error.message!r}"
    assert str(error) == error.message


def only_protocol_errors(fn: Callable[..., object], *args: Any) -> None:
    """Call fn; a ProtocolError with a known code is fine, any other exception fails the test."""
    try:
        fn(*args)
    except p.ProtocolError as e:
        assert e.code in CODES
        assert isinstance(e.message, str) and e.message


# ---------------------------------------------------------------- round trips


def test_submit_round_trip() -> None:
    # Given a SUBMIT with one task using every field and one using none of the optional ones
    # When it travels as frames and is decoded at the broker
    envelope = received(p.PROTOCOL_CLIENT, p.SUBMIT, submit_body())
    request = p.decode_submit(envelope.body)
    # Then the envelope and every field come out as they went in, defaults filled
    assert (envelope.identity, envelope.protocol, envelope.command) == (
        PEER,
        p.PROTOCOL_CLIENT,
        p.SUBMIT,
    )
    assert request == p.Submit(
        seq=1,
        tasks=(
            p.NewTask("shop.resize", PAYLOAD, "img/42.png", "order-7", 5),
            p.NewTask("shop.crop", PAYLOAD, None, None, None),
        ),
        watch=True,
        strict=False,
    )


def test_submit_defaults_watch_and_strict_to_false() -> None:
    # Given a SUBMIT without watch and strict, and one where they are nil
    for extra in ({}, {"watch": None, "strict": None}):
        body = {"seq": 9, "tasks": [{"name": "t", "payload": b""}], **extra}
        # When decoded, Then both are false
        request = p.decode_submit(received(p.PROTOCOL_CLIENT, p.SUBMIT, body).body)
        assert (request.watch, request.strict) == (False, False)


def test_get_status_history_round_trip() -> None:
    get = p.decode_get(received(p.PROTOCOL_CLIENT, p.GET, GOOD["get"][2]()).body)
    assert get == p.Get(seq=2, ids=(42, 7), watch=True)
    empty = p.decode_get({"seq": 3, "ids": []})
    assert empty == p.Get(seq=3, ids=(), watch=False)
    status = p.decode_status(received(p.PROTOCOL_CLIENT, p.STATUS, {"seq": 3}).body)
    assert status == p.Status(seq=3)
    history = p.decode_history(received(p.PROTOCOL_CLIENT, p.HISTORY, {"seq": 5, "id": 42}).body)
    assert history == p.History(seq=5, id=42, after=0)
    paged = {"seq": 6, "id": 42, "after": 17}
    assert p.decode_history(paged) == p.History(seq=6, id=42, after=17)


def test_prune_round_trip_defaults_and_refusals() -> None:
    # Given a PRUNE with every field, and one with only the required ones
    full = p.decode_prune(received(p.PROTOCOL_CLIENT, p.PRUNE, GOOD["prune"][2]()).body)
    bare = p.decode_prune({"seq": 8, "before": 1_700_000_000})
    # Then the fields come through, and the defaults are every final state from the start
    assert full == p.Prune(seq=7, before=1.7e9, states=frozenset({"succeeded"}), after_id=2000)
    assert bare == p.Prune(seq=8, before=1.7e9, states=p.FINAL_STATES, after_id=0)
    assert isinstance(bare.before, float)
    # And a live or unknown state, no state, a non-number or endless time are refused
    for states in (["running"], ["queued", "failed"], [], ["nope"], [["succeeded"]]):
        with rejected(p.E_BAD_BODY, "final states"):
            p.decode_prune({"seq": 1, "before": 1.0, "states": states})
    for before in (float("inf"), float("nan"), True, "1700000000"):
        with rejected(p.E_BAD_BODY, "before"):
            p.decode_prune({"seq": 1, "before": before})
    with rejected(p.E_BAD_BODY, "after_id"):
        p.decode_prune({"seq": 1, "before": 1.0, "after_id": -1})


def test_tasks_round_trip_and_defaults() -> None:
    # Given a TASKS with every filter, and one with none
    full = p.decode_tasks(received(p.PROTOCOL_CLIENT, p.TASKS, GOOD["tasks"][2]()).body)
    bare = p.decode_tasks(received(p.PROTOCOL_CLIENT, p.TASKS, {"seq": 6}).body)
    # Then the filters come through, and the defaults are no filter and 50 tasks
    assert full == p.ListTasks(
        seq=4, state="failed", name="shop.crop", limit=20, before_id=99, results=True
    )
    assert bare == p.ListTasks(seq=6, state=None, name=None, limit=50, before_id=None, results=True)
    # And results can be left out, with a bool only
    assert p.decode_tasks({"seq": 7, "results": False}).results is False
    with rejected(p.E_BAD_BODY, "results"):
        p.decode_tasks({"seq": 7, "results": 0})


@pytest.mark.parametrize("state", p.ALL_STATES)
def test_tasks_accepts_every_state(state: str) -> None:
    assert p.decode_tasks({"seq": 1, "state": state}).state == state


def test_ready_round_trip_and_defaults() -> None:
    # Given a READY with every field
    ready = p.decode_ready(received(p.PROTOCOL_WORKER, p.READY, ready_body()).body)
    # Then held becomes (id, attempt) tuples and the rest comes through
    assert ready == p.Ready(
        seq=1,
        capacity=4,
        concurrency=2,
        tasks={"shop.resize": 3, "shop.crop": 1},
        held=((42, 2),),
        pid=4242,
        host="web-1",
        pool="process",
        incarnation=INCARNATION,
        dseq=6,
    )
    # Given a READY with only the required fields, Then the optional ones get defaults:
    # no incarnation (a new process to the broker), no TASK received, and it runs
    # every task it holds at once
    bare = p.decode_ready({"seq": 2, "capacity": 3, "tasks": {}})
    assert bare.concurrency == 3
    assert (bare.held, bare.pid, bare.host, bare.pool) == ((), 0, "", "thread")
    assert (bare.incarnation, bare.dseq) == ("", 0)
    # And nil means the default as well
    nil = p.decode_ready({**ready_body(), "incarnation": None, "dseq": None})
    assert (nil.incarnation, nil.dseq) == ("", 0)


def test_ready_cuts_informational_strings() -> None:
    long = {"host": "h" * 300, "pool": "p" * 40, "incarnation": "i" * 100}
    ready = p.decode_ready({**ready_body(), **long})
    assert (len(ready.host), len(ready.pool), len(ready.incarnation)) == (255, 32, 64)


def test_ready_capacity_is_bounded_by_max_batch() -> None:
    # Given limits whose max_batch is 2 (held travels in one READY, so capacity fits a batch)
    limits = p.Limits(max_batch=2)
    # When a READY asks for exactly max_batch, Then it is accepted
    assert p.decode_ready({**ready_body(), "capacity": 2}, limits).capacity == 2
    # When it asks for one more, Then bad-body names the bound
    with rejected(p.E_BAD_BODY, "capacity must be 1..2"):
        p.decode_ready({**ready_body(), "capacity": 3}, limits)
    # And the default bound is the default max_batch
    assert p.decode_ready({**ready_body(), "capacity": 1000}).capacity == 1000


@pytest.mark.parametrize("concurrency", [0, 5, -1, "2", 1.5])
def test_ready_concurrency_is_within_capacity(concurrency: object) -> None:
    # Given a READY of capacity 4, When it says it runs none, more than it holds, or not a
    # count, Then it is a bad body
    with rejected(p.E_BAD_BODY, "concurrency"):
        p.decode_ready({**ready_body(), "capacity": 4, "concurrency": concurrency})


def test_worker_heartbeat_round_trip_and_defaults() -> None:
    body = GOOD["heartbeat"][2]()
    beat = p.decode_worker_heartbeat(received(p.PROTOCOL_WORKER, p.HEARTBEAT, body).body)
    assert beat == p.WorkerHeartbeat(dseq=7, held=((42, 2), (43, 1)), draining=False)
    # Given the empty body a broker HEARTBEAT has, Then dseq 0 and nothing held
    assert p.decode_worker_heartbeat({}) == p.WorkerHeartbeat(dseq=0, held=(), draining=False)


def test_result_round_trip() -> None:
    result = p.decode_result(received(p.PROTOCOL_WORKER, p.RESULT, result_body()).body)
    assert result == p.Result(
        seq=3,
        results=(
            p.TaskOutcome(42, 2, True, VALUE, None, True),
            p.TaskOutcome(43, 1, False, None, "ValueError: bad", False),
        ),
    )


def test_result_retry_defaults_to_true_and_long_errors_are_cut() -> None:
    # Given an outcome without retry and with an error longer than max_error_len
    limits = p.Limits(max_error_len=10)
    body = {"seq": 1, "results": [{"id": 1, "attempt": 1, "ok": False, "error": "x" * 50}]}
    # When decoded
    (outcome,) = p.decode_result(body, limits).results
    # Then retry is true and the error is cut, not rejected
    assert outcome.retry is True
    assert outcome.error == "x" * 10
    # And the attempt counts as started
    assert outcome.started is True


def test_a_result_says_when_its_attempt_never_started() -> None:
    item = {"id": 1, "attempt": 1, "ok": False, "error": "stopping", "started": False}
    (outcome,) = p.decode_result({"seq": 1, "results": [item]}).results
    assert (outcome.retry, outcome.started) == (True, False)
    with rejected(p.E_BAD_BODY, "started"):
        p.decode_result({"seq": 1, "results": [{**item, "started": "no"}]})


def test_checkpoint_round_trip() -> None:
    body = checkpoint_body()
    checkpoints = p.decode_checkpoint(received(p.PROTOCOL_WORKER, p.CHECKPOINT, body).body)
    assert checkpoints == p.Checkpoints(
        seq=2,
        checkpoints=(
            p.Checkpoint(id=42, attempt=2, number=4, state=STATE),
            p.Checkpoint(id=43, attempt=1, number=1, state=p.pack(None)),
        ),
    )


def test_disconnect_round_trip_and_defaults() -> None:
    body = {"reason": "shutdown"}
    assert p.decode_worker_disconnect(received(p.PROTOCOL_WORKER, p.DISCONNECT, body).body) == (
        p.WorkerDisconnect("shutdown")
    )
    assert p.decode_worker_disconnect({}) == p.WorkerDisconnect("")
    assert p.decode_worker_disconnect({"reason": "r" * 500}).reason == "r" * 200


def test_broker_to_worker_round_trips() -> None:
    # Given the broker's TASK, WELCOME and ACK frames, When a worker decodes them
    def at_worker(command: bytes, body: Mapping[str, Any]) -> dict[str, Any]:
        got, decoded = p.decode_reply(p.frames(p.PROTOCOL_WORKER, command, body), p.PROTOCOL_WORKER)
        assert got == command
        return decoded

    dispatch = p.decode_dispatch(at_worker(p.TASK, dispatch_body()))
    welcome = p.decode_welcome(at_worker(p.WELCOME, GOOD["welcome"][2]()))
    ack = p.decode_ack(at_worker(p.ACK, {"seq": 3, "stale": [43]}))
    # Then they carry what the broker put in, with defaults for the optional fields
    assert dispatch == p.Dispatch(
        dseq=7,
        tasks=(
            p.Assignment(42, 2, "shop.resize", PAYLOAD, STATE, 3),
            p.Assignment(43, 1, "shop.crop", PAYLOAD, None, 0),
        ),
    )
    assert welcome == p.Welcome(seq=1, heartbeat_s=0.25, liveness=5, dseq=6, limits={})
    announced = {"max_message_bytes": 65_536, "max_batch": True, "unknown": 1, "max_frames": -4}
    welcome_body = {"seq": 1, "heartbeat_ms": 250, "liveness": 5, "limits": announced}
    assert p.decode_welcome(welcome_body).limits == {"max_message_bytes": 65_536}
    assert ack == p.Ack(seq=3, stale=(43,))
    assert p.decode_ack({"seq": 4}) == p.Ack(seq=4, stale=())


def test_welcome_dseq_defaults_to_zero() -> None:
    # Given a WELCOME without dseq (or with nil), as a broker of a new registration may send it
    for extra in ({}, {"dseq": None}):
        welcome = p.decode_welcome({"seq": 1, "heartbeat_ms": 1000, "liveness": 3, **extra})
        # Then the worker counts TASK messages from 0
        assert welcome.dseq == 0
    # And the largest uint is accepted
    top = p.decode_welcome({"seq": 1, "heartbeat_ms": 1000, "liveness": 3, "dseq": 2**63 - 1})
    assert top.dseq == 2**63 - 1


def test_error_body_round_trip_at_a_client() -> None:
    # Given an ERROR the broker sends with and without a seq
    for seq in (6, None):
        frames = p.frames(p.PROTOCOL_CLIENT, p.ERROR, p.error_body(seq, p.E_BAD_BODY, "why"))
        # When the client decodes it, Then seq, code and message survive
        command, body = p.decode_reply(frames, p.PROTOCOL_CLIENT)
        assert (command, body) == (p.ERROR, {"seq": seq, "code": "bad-body", "message": "why"})


def test_user_data_round_trips_as_nested_msgpack() -> None:
    # Given user data packed on its own, When it travels inside a bin field
    body = p.unpack(p.frames(p.PROTOCOL_CLIENT, p.SUBMIT, submit_body())[2])
    # Then it is still bin, and unpacks to [args, kwargs] (tuples come back as lists)
    payload = body["tasks"][0]["payload"]
    assert isinstance(payload, bytes)
    assert p.unpack(payload) == [["img/42.png"], {"width": 640}]


def test_task_view_keeps_only_the_public_fields() -> None:
    # Given a stored row with internal columns
    row = {
        "id": 42,
        "name": "shop.resize",
        "state": "succeeded",
        "key": None,
        "attempt": 1,
        "max_attempts": 3,
        "spared": 0,
        "worker": "web-1",
        "result": VALUE,
        "error": None,
        "created_at": 1.5,
        "updated_at": 2.5,
        "payload": PAYLOAD,
        "client": "c-1",
        "checkpoint": STATE,
    }
    # When it becomes a view, Then the internal columns are gone
    view = p.task_view(row)
    assert set(view) == set(row) - {"payload", "client", "checkpoint"}
    assert p.unpack(p.pack(view)) == view


def test_frames_and_an_empty_body() -> None:
    # Given frames without a body, Then the body frame is the empty map
    assert p.frames(p.PROTOCOL_WORKER, p.HEARTBEAT) == [b"TRW01", b"HEARTBEAT", b"\x80"]
    # Given a message whose body frame has zero bytes, Then it reads as the empty map
    envelope = p.open_envelope([PEER, p.PROTOCOL_WORKER, p.HEARTBEAT, b""])
    assert envelope.body == {}
    assert p.decode_reply([p.PROTOCOL_WORKER, p.HEARTBEAT, b""], p.PROTOCOL_WORKER) == (
        p.HEARTBEAT,
        {},
    )


def test_open_envelope_accepts_exactly_the_commands_of_each_peer_kind() -> None:
    for protocol, allowed in (
        (p.PROTOCOL_CLIENT, p.CLIENT_TO_BROKER),
        (p.PROTOCOL_WORKER, p.WORKER_TO_BROKER),
    ):
        for command in p.ALL_COMMANDS:
            parts = [PEER, protocol, command, p.pack({})]
            if command in allowed:
                assert p.open_envelope(parts).command == command
            else:
                with rejected(p.E_UNKNOWN_COMMAND):
                    p.open_envelope(parts)


def test_limits_at_the_boundary_are_accepted() -> None:
    # Given values exactly at each limit
    limits = p.Limits(max_payload_bytes=8, max_result_bytes=8, max_checkpoint_bytes=8, max_batch=2)
    task = {"name": "n" * limits.max_name_len, "payload": b"p" * 8, "key": "k" * 256}
    ok = {"id": 1, "attempt": 1, "ok": True, "value": b"v" * 8}
    # When decoded, Then nothing is rejected
    assert len(p.decode_submit({"seq": 1, "tasks": [task, task]}, limits).tasks) == 2
    assert len(p.decode_result({"seq": 1, "results": [ok, ok]}, limits).results) == 2
    assert len(p.decode_checkpoint(checkpoint_with(state=b"s" * 8)(), limits).checkpoints) == 2
    assert p.decode_history({"seq": 2**63 - 1, "id": 0}).seq == 2**63 - 1
    total = sum(map(len, [PEER, *p.frames(p.PROTOCOL_CLIENT, p.STATUS, {"seq": 1})]))
    p.open_envelope([PEER, *p.frames(p.PROTOCOL_CLIENT, p.STATUS, {"seq": 1})], p.Limits(total))


def test_unpack_checks_max_bytes_before_decoding() -> None:
    with rejected(p.E_TOO_LARGE, "exceeds 3"):
        p.unpack(p.pack("four"), max_bytes=3)
    assert p.unpack(p.pack("ab"), max_bytes=3) == "ab"


# ---------------------------------------------------------------- frames and envelopes


def good_frames() -> list[bytes]:
    return [PEER, *p.frames(p.PROTOCOL_CLIENT, p.STATUS, {"seq": 1})]


@pytest.mark.parametrize(
    ("parts", "code"),
    [
        pytest.param([*good_frames(), b"extra"], p.E_BAD_FRAMES, id="too-many-frames"),
        pytest.param(good_frames()[:3], p.E_BAD_FRAMES, id="three-frames"),
        pytest.param(good_frames()[:2], p.E_BAD_FRAMES, id="two-frames"),
        pytest.param(good_frames()[:1], p.E_BAD_FRAMES, id="routing-id-only"),
        pytest.param([], p.E_BAD_FRAMES, id="no-frames"),
        pytest.param([PEER, b"TRC02", p.STATUS, b"\x80"], p.E_BAD_PROTOCOL, id="other-version"),
        pytest.param([PEER, b"MDPC01", p.STATUS, b"\x80"], p.E_BAD_PROTOCOL, id="mdp"),
        pytest.param([PEER, b"trc01", p.STATUS, b"\x80"], p.E_BAD_PROTOCOL, id="lowercase-id"),
        pytest.param([PEER, b"", p.STATUS, b"\x80"], p.E_BAD_PROTOCOL, id="empty-id"),
        pytest.param([PEER, b"TRC01", b"FROB", b"\x80"], p.E_UNKNOWN_COMMAND, id="unknown"),
        pytest.param([PEER, b"TRC01", b"status", b"\x80"], p.E_UNKNOWN_COMMAND, id="lowercase"),
        pytest.param([PEER, b"TRC01", p.READY, b"\x80"], p.E_UNKNOWN_COMMAND, id="worker-cmd"),
        pytest.param([PEER, b"TRW01", p.SUBMIT, b"\x80"], p.E_UNKNOWN_COMMAND, id="client-cmd"),
        pytest.param([PEER, b"TRW01", p.WELCOME, b"\x80"], p.E_UNKNOWN_COMMAND, id="to-worker"),
        pytest.param([PEER, b"TRC01", p.REPLY, b"\x80"], p.E_UNKNOWN_COMMAND, id="to-client"),
        pytest.param([PEER, b"TRC01", b"", b"\x80"], p.E_UNKNOWN_COMMAND, id="empty-command"),
    ],
)
def test_open_envelope_rejects_bad_frames(parts: list[bytes], code: str) -> None:
    # Given frames that break the framing rules, When the broker opens them
    with rejected(code):
        p.open_envelope(parts)


def test_oversize_message_is_too_large_and_names_the_limit() -> None:
    # Given a message larger than max_message_bytes in all, though each frame is small
    limits = p.Limits(max_message_bytes=64)
    parts = [PEER, *p.frames(p.PROTOCOL_CLIENT, p.GET, {"seq": 1, "ids": list(range(20))})]
    assert sum(map(len, parts)) > 64 and all(len(f) <= 64 for f in parts)
    # Then it is rejected before its body is decoded
    with rejected(p.E_TOO_LARGE, "max_message_bytes"):
        p.open_envelope(parts, limits)


def test_too_many_frames_is_checked_before_the_size() -> None:
    limits = p.Limits(max_message_bytes=10)
    with rejected(p.E_BAD_FRAMES, "at most 4"):
        p.open_envelope([b"x" * 20] * 5, limits)


def ext(code: int, data: bytes) -> bytes:
    """A msgpack ext value by hand: ExtType refuses the negative codes msgpack reserves."""
    fixext = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    head = bytes([fixext[len(data)]]) if len(data) in fixext else bytes([0xC7, len(data)])
    return head + (code & 0xFF).to_bytes(1, "big") + data


BAD_BODIES = [
    pytest.param(p.pack([1, 2]), "map", id="array"),
    pytest.param(p.pack(1), "map", id="int"),
    pytest.param(p.pack("seq"), "map", id="str"),
    pytest.param(p.pack(None), "map", id="nil"),
    pytest.param(p.pack(b"\x81"), "map", id="bin"),
    pytest.param(b"\xc1", "msgpack", id="never-used-byte"),
    pytest.param(b"\x81\xa3seq", "msgpack", id="truncated-map"),
    pytest.param(p.pack(submit_body())[:-3], "msgpack", id="truncated-submit"),
    pytest.param(b"\xdd\xff\xff\xff\xff", "msgpack", id="huge-array-header"),
    pytest.param(p.pack({"seq": 1}) + b"\x00", "msgpack", id="trailing-bytes"),
    pytest.param(b"\x81\x01\x01", "map key", id="int-key"),
    pytest.param(b"\x81\x91\x01\x01", "map key", id="array-key"),
    pytest.param(b"\x81\xa3seq\xa2\xff\xfe", "msgpack", id="invalid-utf8"),
    pytest.param(b"\x91" * 100_000, "msgpack", id="deep-nesting"),
    pytest.param(b"\x81\xa3seq" + ext(5, b"abc"), "extension", id="ext-type-5"),
    pytest.param(b"\x81\xa3seq" + ext(127, b""), "extension", id="ext-type-127"),
    pytest.param(b"\x81\xa3seq" + ext(-2, b"x"), "extension", id="ext-type-minus-2"),
    # A valid msgpack timestamp (ext type -1, 4 bytes of seconds): "no ext types" covers it too.
    pytest.param(b"\x81\xa3seq" + ext(-1, b"\x00\x00\x00\x01"), "extension", id="timestamp"),
    pytest.param(b"\x81\xa3seq" + ext(-1, b"\x00"), "msgpack", id="bad-timestamp"),
]


@pytest.mark.parametrize(("body", "fragment"), BAD_BODIES)
def test_open_envelope_rejects_bad_bodies(body: bytes, fragment: str) -> None:
    # Given a body frame that is not one valid msgpack map, When the broker opens it
    # Then it is bad-body and the reason says what was wrong
    with rejected(p.E_BAD_BODY, fragment):
        p.open_envelope([PEER, p.PROTOCOL_CLIENT, p.STATUS, body])


@pytest.mark.parametrize(("body", "fragment"), BAD_BODIES)
def test_decode_reply_rejects_bad_bodies(body: bytes, fragment: str) -> None:
    with rejected(p.E_BAD_BODY, fragment):
        p.decode_reply([p.PROTOCOL_WORKER, p.TASK, body], p.PROTOCOL_WORKER)


# msgpack decodes ext type -1 (timestamp) itself, without calling ext_hook, so a
# timestamp anywhere in the envelope needs its own check; each of its three formats.
TIMESTAMPS = [
    pytest.param(msgpack.Timestamp(1, 0), id="timestamp-32"),
    pytest.param(msgpack.Timestamp(2**33, 5), id="timestamp-64"),
    pytest.param(msgpack.Timestamp(-1, 0), id="timestamp-96"),
]


def timestamp_in(where: str, stamp: msgpack.Timestamp) -> bytes:
    """A SUBMIT body frame with a timestamp at the given place."""
    body = submit_body()
    if where == "field":
        body["seq"] = stamp
    elif where == "list":
        body["tasks"].append(stamp)
    elif where == "item":
        body["tasks"][1]["key"] = stamp
    elif where == "deep":
        body["extra"] = {"a": [[{"b": [stamp]}]]}
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


@pytest.mark.parametrize("where", ["field", "list", "item", "deep"])
@pytest.mark.parametrize("stamp", TIMESTAMPS)
def test_timestamps_anywhere_in_the_body_are_bad_body(where: str, stamp: msgpack.Timestamp) -> None:
    # Given a body with a msgpack timestamp in a field, a list, an item or an unknown field
    frame = timestamp_in(where, stamp)
    assert isinstance(msgpack.unpackb(frame, ext_hook=lambda c, d: 1 / 0), dict)  # no hook call
    # When it is unpacked, opened at the broker or received by a peer, Then bad-body, ext -1
    with rejected(p.E_BAD_BODY, "extension type -1"):
        p.unpack(frame)
    with rejected(p.E_BAD_BODY, "extension type -1"):
        p.open_envelope([PEER, p.PROTOCOL_CLIENT, p.SUBMIT, frame])
    with rejected(p.E_BAD_BODY, "extension type -1"):
        p.decode_reply([p.PROTOCOL_CLIENT, p.REPLY, frame], p.PROTOCOL_CLIENT)


def test_user_data_is_not_searched_for_timestamps() -> None:
    # Given a payload (user data, opaque to the broker) that holds a timestamp
    payload = msgpack.packb([[msgpack.Timestamp(1, 0)], {}], use_bin_type=True)
    body = {"seq": 1, "tasks": [{"name": "t", "payload": payload}]}
    # When the SUBMIT is opened and decoded, Then the bin is carried untouched
    envelope = received(p.PROTOCOL_CLIENT, p.SUBMIT, body)
    assert p.decode_submit(envelope.body).tasks[0].payload == payload


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param([p.PROTOCOL_CLIENT, p.REPLY, b"\x80"], id="other-protocol"),
        pytest.param([b"TRW02", p.REPLY, b"\x80"], id="other-version"),
        pytest.param([p.PROTOCOL_WORKER, p.ACK], id="two-frames"),
        pytest.param([PEER, p.PROTOCOL_WORKER, p.ACK, b"\x80"], id="four-frames"),
        pytest.param([], id="no-frames"),
    ],
)
def test_decode_reply_rejects_bad_frames(parts: list[bytes]) -> None:
    # Given a message at a worker that is not [TRW01, command, body]
    with rejected(p.E_BAD_FRAMES):
        p.decode_reply(parts, p.PROTOCOL_WORKER)


# ---------------------------------------------------------------- bad fields


def with_(make: Callable[[], dict[str, Any]], **changes: Any) -> Callable[[], dict[str, Any]]:
    """A body factory: the good body with fields replaced (or removed, for the value ...)."""

    def build() -> dict[str, Any]:
        body = make()
        for name, value in changes.items():
            if value is ...:
                body.pop(name, None)
            else:
                body[name] = value
        return body

    return build


def first_item_with(
    make: Callable[[], dict[str, Any]], items: str, **changes: Any
) -> Callable[[], dict[str, Any]]:
    """A body factory: the good body with fields of its first `items` entry replaced or removed."""

    def build() -> dict[str, Any]:
        body = make()
        item = body[items][0]
        for name, value in changes.items():
            if value is ...:
                item.pop(name)
            else:
                item[name] = value
        return body

    return build


def task_with(**changes: Any) -> Callable[[], dict[str, Any]]:
    return first_item_with(submit_body, "tasks", **changes)


def outcome_with(**changes: Any) -> Callable[[], dict[str, Any]]:
    return first_item_with(result_body, "results", **changes)


def checkpoint_with(**changes: Any) -> Callable[[], dict[str, Any]]:
    return first_item_with(checkpoint_body, "checkpoints", **changes)


def assignment_with(**changes: Any) -> Callable[[], dict[str, Any]]:
    return first_item_with(dispatch_body, "tasks", **changes)


B = p.E_BAD_BODY
SUBMIT, GET, TASKS, READY, RESULT = (
    GOOD[k][2] for k in ("submit", "get", "tasks", "ready", "result")
)
BAD_FIELDS = [
    # (decoder, body factory, code, fragment of the message)
    ("submit", with_(SUBMIT, seq=True), B, "'seq' has the wrong type"),
    ("submit", with_(SUBMIT, seq=-1), B, "'seq' is out of range"),
    ("submit", with_(SUBMIT, seq=2**63), B, "'seq' is out of range"),
    ("submit", with_(SUBMIT, seq="1"), B, "'seq' has the wrong type"),
    ("submit", with_(SUBMIT, seq=1.0), B, "'seq' has the wrong type"),
    ("submit", with_(SUBMIT, seq=None), B, "'seq' has the wrong type"),
    ("submit", with_(SUBMIT, seq=...), B, "'seq' is missing"),
    ("submit", with_(SUBMIT, tasks=...), B, "'tasks' is missing"),
    ("submit", with_(SUBMIT, tasks=[]), B, "at least one task"),
    ("submit", with_(SUBMIT, tasks={"name": "t"}), B, "'tasks' has the wrong type"),
    ("submit", with_(SUBMIT, tasks=["shop.resize"]), B, "each task must be a map"),
    ("submit", with_(SUBMIT, watch=1), B, "'watch' has the wrong type"),
    ("submit", with_(SUBMIT, strict="yes"), B, "'strict' has the wrong type"),
    ("submit", task_with(name=...), B, "'name' is missing"),
    ("submit", task_with(name=b"shop.resize"), B, "'name' has the wrong type"),
    ("submit", task_with(name=""), B, "'name' must be 1..200"),
    ("submit", task_with(name="n" * 201), B, "'name' must be 1..200"),
    ("submit", task_with(payload=...), B, "'payload' is missing"),
    ("submit", task_with(payload=None), B, "'payload' is missing"),
    ("submit", task_with(payload="[[], {}]"), B, "'payload' has the wrong type"),
    ("submit", task_with(key=""), B, "'key' must be 1..256"),
    ("submit", task_with(key="k" * 257), B, "'key' must be 1..256"),
    ("submit", task_with(key=42), B, "'key' has the wrong type"),
    ("submit", task_with(idem="i" * 257), B, "'idem' must be 1..256"),
    ("submit", task_with(idem=b"order-7"), B, "'idem' has the wrong type"),
    ("submit", task_with(max_attempts=0), B, "max_attempts must be 1..1000"),
    ("submit", task_with(max_attempts=1001), B, "max_attempts must be 1..1000"),
    ("submit", task_with(max_attempts=True), B, "'max_attempts' has the wrong type"),
    ("submit", task_with(max_attempts="3"), B, "'max_attempts' has the wrong type"),
    ("get", with_(GET, ids=...), B, "'ids' is missing"),
    ("get", with_(GET, ids=[-1]), B, "ids must be non-negative integers"),
    ("get", with_(GET, ids=[True]), B, "ids must be non-negative integers"),
    ("get", with_(GET, ids=["42"]), B, "ids must be non-negative integers"),
    ("get", with_(GET, ids=42), B, "'ids' has the wrong type"),
    ("get", with_(GET, watch="no"), B, "'watch' has the wrong type"),
    ("status", lambda: {}, B, "'seq' is missing"),
    ("status", lambda: {"seq": False}, B, "'seq' has the wrong type"),
    ("tasks", with_(TASKS, state="done"), B, "state must be one of queued"),
    ("tasks", with_(TASKS, state=b"queued"), B, "'state' has the wrong type"),
    ("tasks", with_(TASKS, limit=0), B, "limit must be 1..1000"),
    ("tasks", with_(TASKS, limit=1001), B, "limit must be 1..1000"),
    ("tasks", with_(TASKS, limit=True), B, "'limit' has the wrong type"),
    ("tasks", with_(TASKS, name=""), B, "'name' must be 1..200"),
    ("tasks", with_(TASKS, before_id="99"), B, "'before_id' has the wrong type"),
    ("tasks", with_(TASKS, before_id=True), B, "'before_id' has the wrong type"),
    ("history", lambda: {"seq": 1}, B, "'id' is missing"),
    ("history", lambda: {"seq": 1, "id": -42}, B, "'id' is out of range"),
    ("history", lambda: {"seq": 1, "id": b"42"}, B, "'id' has the wrong type"),
    ("history", lambda: {"seq": 1, "id": 42, "after": -1}, B, "'after' is out of range"),
    ("cancel", lambda: {"seq": 1}, B, "'ids' is missing"),
    ("cancel", lambda: {"seq": 1, "ids": [42, -1]}, B, "ids must be non-negative integers"),
    ("cancel", lambda: {"seq": 1, "ids": list(range(1001))}, p.E_TOO_LARGE, "max_batch"),
    ("ready", with_(READY, capacity=0), B, "capacity must be 1..1000"),
    ("ready", with_(READY, capacity=1001), B, "capacity must be 1..1000"),
    ("ready", with_(READY, capacity=True), B, "'capacity' has the wrong type"),
    ("ready", with_(READY, capacity=...), B, "'capacity' is missing"),
    ("ready", with_(READY, tasks=["shop.resize"]), B, "'tasks' has the wrong type"),
    ("ready", with_(READY, tasks={"shop.resize": 0}), B, "tasks must map task names"),
    ("ready", with_(READY, tasks={"shop.resize": True}), B, "tasks must map task names"),
    ("ready", with_(READY, tasks={"": 3}), B, "tasks must map task names"),
    ("ready", with_(READY, tasks={"n" * 201: 3}), B, "tasks must map task names"),
    ("ready", with_(READY, tasks={b"shop.resize": 3}), B, "tasks must map task names"),
    ("ready", with_(READY, held=[[42]]), B, "held must be a list of [task id, attempt]"),
    ("ready", with_(READY, held=[[42, True]]), B, "held must be a list of [task id, attempt]"),
    ("ready", with_(READY, held=[["42", 1]]), B, "held must be a list of [task id, attempt]"),
    ("ready", with_(READY, held=[42, 1]), B, "held must be a list of [task id, attempt]"),
    ("ready", with_(READY, held={"42": 1}), B, "'held' has the wrong type"),
    ("ready", with_(READY, pid="4242"), B, "'pid' has the wrong type"),
    ("ready", with_(READY, host=b"web-1"), B, "'host' has the wrong type"),
    ("ready", with_(READY, incarnation=b"9b1f"), B, "'incarnation' has the wrong type"),
    ("ready", with_(READY, incarnation=42), B, "'incarnation' has the wrong type"),
    ("ready", with_(READY, dseq=-1), B, "'dseq' is out of range"),
    ("ready", with_(READY, dseq=True), B, "'dseq' has the wrong type"),
    ("ready", with_(READY, dseq="6"), B, "'dseq' has the wrong type"),
    ("heartbeat", lambda: {"dseq": "7"}, B, "'dseq' has the wrong type"),
    ("heartbeat", lambda: {"dseq": True}, B, "'dseq' has the wrong type"),
    ("heartbeat", lambda: {"dseq": -1}, B, "'dseq' is out of range"),
    ("heartbeat", lambda: {"held": [[1, 2, 3]]}, B, "held must be a list"),
    ("result", with_(RESULT, results=...), B, "'results' is missing"),
    ("result", with_(RESULT, results={}), B, "'results' has the wrong type"),
    ("result", with_(RESULT, results=[[42, 1, True]]), B, "each result must be a map"),
    ("result", outcome_with(ok=...), B, "'ok' is missing"),
    ("result", outcome_with(ok=1), B, "'ok' has the wrong type"),
    ("result", outcome_with(id=...), B, "'id' is missing"),
    ("result", outcome_with(attempt=-1), B, "'attempt' is out of range"),
    ("result", outcome_with(value="640x480"), B, "'value' has the wrong type"),
    ("result", outcome_with(error=b"boom"), B, "'error' has the wrong type"),
    ("result", outcome_with(retry=0), B, "'retry' has the wrong type"),
    ("checkpoint", with_(checkpoint_body, checkpoints=...), B, "'checkpoints' is missing"),
    ("checkpoint", with_(checkpoint_body, checkpoints={}), B, "'checkpoints' has the wrong type"),
    ("checkpoint", with_(checkpoint_body, checkpoints=[7]), B, "each checkpoint must be a map"),
    ("checkpoint", checkpoint_with(state=...), B, "'state' is missing"),
    ("checkpoint", checkpoint_with(state="{}"), B, "'state' has the wrong type"),
    ("checkpoint", checkpoint_with(number=-1), B, "'number' is out of range"),
    ("checkpoint", checkpoint_with(number=...), B, "'number' is missing"),
    ("checkpoint", checkpoint_with(number=True), B, "'number' has the wrong type"),
    ("checkpoint", checkpoint_with(id=True), B, "'id' has the wrong type"),
    ("checkpoint", checkpoint_with(attempt=None), B, "'attempt' has the wrong type"),
    ("disconnect", lambda: {"reason": 1}, B, "'reason' has the wrong type"),
    ("dispatch", with_(dispatch_body, dseq=...), B, "'dseq' is missing"),
    ("dispatch", with_(dispatch_body, tasks=None), B, "'tasks' has the wrong type"),
    ("dispatch", with_(dispatch_body, tasks=[7]), B, "each task must be a map"),
    ("dispatch", assignment_with(payload="x"), B, "'payload' has the wrong type"),
    ("dispatch", assignment_with(id=...), B, "'id' is missing"),
    ("dispatch", assignment_with(state="{}"), B, "'state' has the wrong type"),
    ("dispatch", assignment_with(number=True), B, "'number' has the wrong type"),
    ("welcome", lambda: {"seq": 1, "heartbeat_ms": 0, "liveness": 3}, B, "must be positive"),
    ("welcome", lambda: {"seq": 1, "heartbeat_ms": 1000, "liveness": 0}, B, "must be positive"),
    ("welcome", lambda: {"seq": 1, "liveness": 3}, B, "'heartbeat_ms' is missing"),
    ("welcome", with_(GOOD["welcome"][2], dseq=-1), B, "'dseq' is out of range"),
    ("welcome", with_(GOOD["welcome"][2], dseq=1.0), B, "'dseq' has the wrong type"),
    ("ack", lambda: {"stale": []}, B, "'seq' is missing"),
    ("ack", lambda: {"seq": 1, "stale": 43}, B, "'stale' has the wrong type"),
]


@pytest.mark.parametrize(
    ("decoder", "make", "code", "fragment"),
    BAD_FIELDS,
    ids=[re.sub(r"\W+", "-", f"{d} {frag}").strip("-") for d, _, _, frag in BAD_FIELDS],
)
def test_decoders_reject_bad_fields(
    decoder: str, make: Callable[[], dict[str, Any]], code: str, fragment: str
) -> None:
    # Given a good body with one field missing, of the wrong type or out of range
    body = make()
    # When it is decoded, Then ProtocolError says which field and why
    with rejected(code, fragment):
        GOOD[decoder][0](body)


# Integers that reach SQLite must fit a SQLite INTEGER (and ids are never negative):
# a larger one would raise OverflowError inside the broker's store, past every
# ProtocolError handler. Every uint of the protocol is 0..2**63-1.
OUT_OF_RANGE = [
    pytest.param("tasks", {"seq": 1, "before_id": 2**64 - 1}, id="before_id-2**64-1"),
    pytest.param("tasks", {"seq": 1, "before_id": 2**63}, id="before_id-2**63"),
    pytest.param("tasks", {"seq": 1, "before_id": -1}, id="before_id-negative"),
    pytest.param("get", {"seq": 1, "ids": [2**63]}, id="get-id-2**63"),
    pytest.param("get", {"seq": 1, "ids": [1, -1]}, id="get-id-negative"),
    pytest.param("ready", with_(READY, held=[[2**63, 1]])(), id="held-id-2**63"),
    pytest.param("ready", with_(READY, held=[[42, -1]])(), id="held-attempt-negative"),
    pytest.param("ready", with_(READY, dseq=2**63)(), id="ready-dseq-2**63"),
    pytest.param("heartbeat", {"held": [[42, 2**64 - 1]]}, id="held-attempt-2**64-1"),
    pytest.param("heartbeat", {"dseq": 2**63}, id="heartbeat-dseq-2**63"),
    pytest.param("welcome", with_(GOOD["welcome"][2], dseq=2**63)(), id="welcome-dseq-2**63"),
]


@pytest.mark.parametrize(("decoder", "body"), OUT_OF_RANGE)
def test_ids_outside_the_sqlite_integer_range_are_rejected(
    decoder: str, body: dict[str, Any]
) -> None:
    # Given an id outside 0..2**63-1, When it is decoded, Then it is bad-body
    with rejected(p.E_BAD_BODY):
        GOOD[decoder][0](body)


def test_ids_at_the_top_of_the_range_are_accepted() -> None:
    top = 2**63 - 1
    assert p.decode_get({"seq": 1, "ids": [0, top]}).ids == (0, top)
    assert p.decode_tasks({"seq": 1, "before_id": top}).before_id == top
    assert p.decode_tasks({"seq": 1, "before_id": 0}).before_id == 0
    beat = p.decode_worker_heartbeat({"dseq": top, "held": [[top, top]]})
    assert beat == p.WorkerHeartbeat(dseq=top, held=((top, top),), draining=False)
    ready = p.decode_ready({**ready_body(), "dseq": top, "held": [[0, 0]]})
    assert (ready.dseq, ready.held) == (top, ((0, 0),))


@pytest.mark.parametrize(
    ("decoder", "body", "limit"),
    [
        pytest.param(
            p.decode_submit,
            with_(SUBMIT, tasks=[{"name": "t", "payload": b"123456789"}])(),
            "max_payload_bytes",
            id="payload",
        ),
        pytest.param(
            p.decode_result,
            outcome_with(value=b"123456789")(),
            "max_result_bytes",
            id="result",
        ),
        pytest.param(
            p.decode_checkpoint,
            checkpoint_with(state=b"123456789")(),
            "max_checkpoint_bytes",
            id="checkpoint",
        ),
        pytest.param(
            p.decode_checkpoint,
            {"seq": 1, "checkpoints": checkpoint_body()["checkpoints"] * 2},
            "max_batch",
            id="checkpoint-batch",
        ),
        pytest.param(
            p.decode_submit,
            with_(SUBMIT, tasks=[{"name": "t", "payload": b""}] * 3)(),
            "max_batch",
            id="submit-batch",
        ),
        pytest.param(p.decode_get, {"seq": 1, "ids": [1, 2, 3]}, "max_batch", id="get-batch"),
        pytest.param(
            p.decode_result,
            {"seq": 1, "results": [{"id": 1, "attempt": 1, "ok": True}] * 3},
            "max_batch",
            id="result-batch",
        ),
        pytest.param(
            p.decode_ready,
            # capacity within max_batch, so it is held, not capacity, that is too large
            with_(READY, capacity=2, held=[[1, 1], [2, 1], [3, 1]])(),
            "max_batch",
            id="held-batch",
        ),
        pytest.param(
            p.decode_worker_heartbeat,
            {"dseq": 1, "held": [[1, 1], [2, 1], [3, 1]]},
            "max_batch",
            id="heartbeat-held-batch",
        ),
    ],
)
def test_oversize_fields_are_too_large_and_name_their_limit(
    decoder: Decoder, body: dict[str, Any], limit: str
) -> None:
    # Given limits of 8 bytes and 2 items, and a body one past one of them
    limits = p.Limits(max_payload_bytes=8, max_result_bytes=8, max_checkpoint_bytes=8, max_batch=2)
    # When decoded, Then too-large, and the message names the limit a user can look up
    with rejected(p.E_TOO_LARGE, limit):
        decoder(body, limits)


def test_default_limits_reject_one_byte_over_a_mebibyte() -> None:
    big = b"x" * (p.DEFAULT_LIMITS.max_payload_bytes + 1)
    with rejected(p.E_TOO_LARGE, "max_payload_bytes (1048576)"):
        p.decode_submit({"seq": 1, "tasks": [{"name": "t", "payload": big}]})


def test_protocol_error_is_an_exception_with_a_code() -> None:
    assert issubclass(p.ProtocolError, Exception)
    error = p.ProtocolError(p.E_BAD_BODY, "field 'seq' is missing")
    assert (error.code, error.message, str(error)) == (
        "bad-body",
        "field 'seq' is missing",
        "field 'seq' is missing",
    )


# ---------------------------------------------------------------- fuzzing

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the repository
    suppress_health_check=[HealthCheck.too_slow],
)
FIELD_NAMES = sorted(
    {k for _, _, make in GOOD.values() for k in make()}
    | {"name", "payload", "key", "idem", "max_attempts", "ok", "value", "error", "retry"}
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=4), values, max_size=8)
frame = st.binary(max_size=48) | st.sampled_from(
    [p.PROTOCOL_CLIENT, p.PROTOCOL_WORKER, b"", *sorted(p.ALL_COMMANDS)]
)
DECODERS = [decoder for decoder, _, _ in GOOD.values()]


@FUZZ
@given(st.lists(frame, max_size=6))
def test_random_frames_raise_only_protocol_errors(parts: list[bytes]) -> None:
    only_protocol_errors(p.open_envelope, parts)
    only_protocol_errors(p.decode_reply, parts, p.PROTOCOL_CLIENT)
    only_protocol_errors(p.decode_reply, parts[1:], p.PROTOCOL_WORKER)


@FUZZ
@given(st.sampled_from(sorted(COMMAND_OF)), st.binary(max_size=64))
def test_random_body_bytes_raise_only_protocol_errors(name: str, body: bytes) -> None:
    # Given a well-framed message whose body frame is random bytes
    decoder, protocol, _ = GOOD[name]

    def open_and_decode() -> None:
        envelope = p.open_envelope([PEER, protocol, COMMAND_OF[name], body])
        decoder(envelope.body)

    only_protocol_errors(open_and_decode)
    only_protocol_errors(p.unpack, body)


@FUZZ
@given(bodies)
def test_random_maps_raise_only_protocol_errors(body: dict[str, Any]) -> None:
    # Given any msgpack map, When every decoder reads it, Then only ProtocolError escapes
    for decoder in DECODERS:
        only_protocol_errors(decoder, body)


@FUZZ
@given(st.sampled_from(sorted(GOOD)), st.data())
def test_mutated_good_bodies_raise_only_protocol_errors(name: str, data: st.DataObject) -> None:
    # Given a good body with one field, or one field of one of its items, replaced
    decoder, _, make = GOOD[name]
    body = make()
    target = body
    nested = [k for k, v in body.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    dive = data.draw(st.booleans())
    if nested and dive:
        target = body[data.draw(st.sampled_from(nested))][0]
    key = data.draw(st.sampled_from(sorted(target)) | st.sampled_from(FIELD_NAMES))
    target[key] = data.draw(values)
    # When decoded, also after a trip through msgpack, Then only ProtocolError escapes
    only_protocol_errors(decoder, body)
    only_protocol_errors(decoder, p.unpack(p.pack(body)))


@FUZZ
@given(
    st.sampled_from(sorted(GOOD)),
    st.builds(
        msgpack.Timestamp,
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.integers(min_value=0, max_value=999_999_999),
    ),
    st.data(),
)
def test_a_timestamp_in_any_good_body_is_bad_body(
    name: str, stamp: msgpack.Timestamp, data: st.DataObject
) -> None:
    # Given a good body with one field, or one field of one of its items, set to a timestamp
    _, protocol, make = GOOD[name]
    body = make()
    nested = [k for k, v in body.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    target = body
    dive = data.draw(st.booleans())
    if nested and dive:
        target = body[data.draw(st.sampled_from(nested))][0]
    target[data.draw(st.sampled_from(sorted(target)) | st.sampled_from(FIELD_NAMES))] = stamp
    frame = msgpack.packb(body, use_bin_type=True)
    # When the broker or a peer reads it, Then bad-body: the codec allows no extension type
    with rejected(p.E_BAD_BODY, "extension type -1"):
        p.decode_reply([protocol, b"X", frame], protocol)
    if name in COMMAND_OF:
        with rejected(p.E_BAD_BODY, "extension type -1"):
            p.open_envelope([PEER, protocol, COMMAND_OF[name], frame])


def test_heartbeat_draining_flag_decodes_and_is_type_checked():
    assert p.decode_worker_heartbeat({"draining": True}).draining is True
    with pytest.raises(p.ProtocolError) as error:
        p.decode_worker_heartbeat({"draining": 1})
    assert error.value.code == p.E_BAD_BODY


@pytest.mark.parametrize("length", [4, 8, 12])
@pytest.mark.parametrize("header", [b"\xc7", b"\xc8\x00", b"\xc9\x00\x00\x00"])
def test_timestamps_in_every_ext_encoding_are_refused(header, length):
    # Given a map whose value is a timestamp in ext 8, 16 or 32 form
    body = b"\x81\xa3seq" + header + bytes([length]) + b"\xff" + b"\x00" * length
    # Then it is refused like any other extension type
    with pytest.raises(p.ProtocolError) as error:
        p.unpack(body)
    assert error.value.code == p.E_BAD_BODY


def test_split_by_size_bounds_count_and_bytes_and_lets_a_large_item_travel_alone() -> None:
    limits = dataclasses.replace(p.DEFAULT_LIMITS, max_message_bytes=1000, max_batch=3)
    sizes = [100, 100, 100, 100, 300, 300, 2000, 10]
    chunks = p.split_by_size(sizes, lambda n: n, limits)
    assert chunks == [[100, 100, 100], [100, 300], [300], [2000], [10]]
    assert p.split_by_size([], lambda n: n, limits) == []
    # The first message alone, as REPLY to GET and TASKS take it
    assert p.first_message(sizes, lambda n: n, limits) == [100, 100, 100]
    assert p.first_message([2000, 10], lambda n: n, limits) == [2000]
    assert p.first_message([], lambda n: n, limits) == []


def test_split_by_size_never_puts_two_items_of_one_task_in_a_message() -> None:
    # (task id, attempt): a worker may hold two attempts of one task, and an ACK's
    # stale list names task ids only
    items = [(7, 1), (8, 1), (7, 2), (9, 1), (9, 2), (9, 3)]
    chunks = p.split_by_size(items, lambda _: 10, task_id=lambda item: item[0])
    assert chunks == [[(7, 1), (8, 1)], [(7, 2), (9, 1)], [(9, 2)], [(9, 3)]]


def test_has_message_says_whether_a_read_would_find_one() -> None:
    context = zmq.Context()
    reader, writer = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        reader.bind("inproc://has-message")
        writer.connect("inproc://has-message")
        assert not p.has_message(reader)
        p.send_frames(writer, [b"one", b"two"])
        p.send_frames(writer, [b"three"])
        assert reader.poll(1000)
        assert p.has_message(reader)
        assert p.recv_frames(reader, p.NOBLOCK) == [b"one", b"two"]
        assert p.has_message(reader)
        assert p.recv_frames(reader, p.NOBLOCK) == [b"three"]
        assert not p.has_message(reader)
    finally:
        reader.close(linger=0)
        writer.close(linger=0)
        context.term()
