"""The taskring wire protocol: frames, commands, body codecs and limits.

This module mirrors protocol.md, which is the source of truth. Every message
is a ZeroMQ multipart message of three frames (the broker's ROUTER socket
sees the sender's routing id in front of them):

    frame 0  protocol id and version: PROTOCOL_CLIENT or PROTOCOL_WORKER
    frame 1  command, a short ASCII word
    frame 2  body, one msgpack map

User data (task arguments, results, checkpoint state) travels inside the body
as msgpack *bin* values that hold their own msgpack encoding. The broker
stores and forwards those bytes without decoding them: it never interprets
user data, and a task costs one copy, not a decode and an encode, on its way
through.

Wire input is never trusted. Decoders raise ProtocolError (never assert:
`python -O` strips asserts) and return frozen dataclasses, so code past the
decoder only sees well-typed values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar, cast

import msgpack
import zmq

PROTOCOL_CLIENT = b"TRC01"
PROTOCOL_WORKER = b"TRW01"

# Client -> broker
SUBMIT = b"SUBMIT"
GET = b"GET"
STATUS = b"STATUS"
TASKS = b"TASKS"
HISTORY = b"HISTORY"
CANCEL = b"CANCEL"
PRUNE = b"PRUNE"
# Broker -> client
REPLY = b"REPLY"
NOTIFY = b"NOTIFY"
# Worker -> broker
READY = b"READY"
RESULT = b"RESULT"
CHECKPOINT = b"CHECKPOINT"
# Broker -> worker
WELCOME = b"WELCOME"
TASK = b"TASK"
ACK = b"ACK"
# Both directions, worker <-> broker
HEARTBEAT = b"HEARTBEAT"
DISCONNECT = b"DISCONNECT"
# Broker -> client or worker
ERROR = b"ERROR"

CLIENT_TO_BROKER = frozenset({SUBMIT, GET, STATUS, TASKS, HISTORY, CANCEL, PRUNE})
BROKER_TO_CLIENT = frozenset({REPLY, NOTIFY, ERROR})
WORKER_TO_BROKER = frozenset({READY, HEARTBEAT, RESULT, CHECKPOINT, DISCONNECT})
BROKER_TO_WORKER = frozenset({WELCOME, TASK, ACK, HEARTBEAT, DISCONNECT, ERROR})
ALL_COMMANDS = CLIENT_TO_BROKER | BROKER_TO_CLIENT | WORKER_TO_BROKER | BROKER_TO_WORKER

# Task states as stored and reported.
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
DEAD = "dead"  # dead-lettered: max_attempts used up by lost or crashed attempts
CANCELLED = "cancelled"  # by a client's CANCEL, queued or running
FINAL_STATES = frozenset({SUCCEEDED, FAILED, DEAD, CANCELLED})
# The only states that change again. A receiver takes any other state, one a newer
# broker may add, as final (protocol.md, Versioning).
PENDING_STATES = frozenset({QUEUED, RUNNING})
ALL_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, DEAD, CANCELLED)

# Error codes carried by ERROR bodies. Stable strings: clients match on them.
E_BAD_FRAMES = "bad-frames"
E_BAD_PROTOCOL = "bad-protocol"
E_UNKNOWN_COMMAND = "unknown-command"
E_BAD_BODY = "bad-body"
E_TOO_LARGE = "too-large"
E_NOT_FOUND = "not-found"
E_UNKNOWN_WORKER = "unknown-worker"
E_UNKNOWN_TASK = "unknown-task"
E_FORBIDDEN = "forbidden"
E_NAME_TAKEN = "name-taken"
E_INTERNAL = "internal"


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Hard limits on what a peer may send. Each is documented in protocol.md."""

    max_message_bytes: int = 16 * 1024 * 1024  # all frames of one message together
    max_frames: int = 4  # routing id + the three protocol frames
    max_payload_bytes: int = 1024 * 1024  # packed args and kwargs of one task
    max_result_bytes: int = 1024 * 1024  # packed return value of one task
    max_checkpoint_bytes: int = 1024 * 1024  # packed checkpoint state
    # tasks in one SUBMIT, results in one RESULT, checkpoints in one CHECKPOINT, ids in one GET
    max_batch: int = 1000
    max_name_len: int = 200
    max_key_len: int = 256
    max_error_len: int = 8192


DEFAULT_LIMITS = Limits()

# Envelope, names, keys and a READY's `held` list (1000 pairs): what a message
# carries besides its one largest item.
MESSAGE_OVERHEAD_BYTES = 64 * 1024


def message_room_needed(limits: Limits) -> int:
    """The least max_message_bytes that carries one task at the other limits: a
    SUBMIT or TASK with its payload (and a TASK's checkpoint), a RESULT with its
    value and an error of max_error_len 4-byte characters."""
    task = limits.max_payload_bytes + limits.max_checkpoint_bytes
    result = limits.max_result_bytes + 4 * limits.max_error_len
    return max(task, result) + MESSAGE_OVERHEAD_BYTES


T = TypeVar("T")


class ProtocolError(Exception):
    """A message that breaks the protocol. `code` is one of the E_* strings."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------- msgpack


def pack(obj: Any) -> bytes:
    """Encode any msgpack-able value. Raises TypeError for other types."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(E_BAD_BODY, f"msgpack extension type {code} is not allowed")


def unpack(data: bytes, *, max_bytes: int | None = None) -> Any:
    """Decode msgpack from an untrusted peer.

    msgpack signals bad input with several unrelated exception types
    (ValueError, TypeError, and its own UnpackException family: BufferFull is
    not a ValueError), so all of them become one ProtocolError here.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError(E_TOO_LARGE, f"body of {len(data)} bytes exceeds {max_bytes}")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(E_BAD_BODY, f"body is not valid msgpack: {e}") from e
    # The walk only runs when the bytes could hold a timestamp at all: a C-speed
    # search for the headers of an extension of type -1 with 4, 8 or 12 bytes.
    # Every header holds the type byte 0xff, absent from most bodies: one search
    # then stands for eleven (0.3 against 3.4 us of the 4.8 us of a NOTIFY's unpack).
    if b"\xff" in data and any(marker in data for marker in _TIMESTAMP_MARKERS):
        _reject_timestamps(value)
    return value


# Headers of a msgpack extension of type -1 (a timestamp) of 4, 8 or 12 bytes:
# fixext 4 and 8, and ext 8, 16 and 32 with each length.
_TIMESTAMP_MARKERS = (
    b"\xd6\xff",
    b"\xd7\xff",
    *(
        header + n.to_bytes(size, "big") + b"\xff"
        for n in (4, 8, 12)
        for header, size in ((b"\xc7", 1), (b"\xc8", 2), (b"\xc9", 4))
    ),
)


def _reject_timestamps(value: Any) -> None:
    # msgpack decodes ext type -1 (timestamp) itself and never calls
    # ext_hook, so "no extension types" needs this walk. User data is nested
    # as bin, so the walk only covers the envelope's few containers.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, msgpack.Timestamp):
            raise ProtocolError(E_BAD_BODY, "msgpack extension type -1 is not allowed")


# ---------------------------------------------------------------- batching


def split_by_size(
    items: Sequence[T],
    size: Callable[[T], int],
    limits: Limits = DEFAULT_LIMITS,
    *,
    task_id: Callable[[T], int] | None = None,
) -> list[list[T]]:
    """Items in messages of at most max_batch of them and about half of max_message_bytes.

    `size` estimates an item's bytes on the wire. The other half of the limit
    is left for the envelope and msgpack's framing; an item larger than the
    budget travels alone. TASK, RESULT, CHECKPOINT and NOTIFY are split this
    way. With `task_id`, no message holds two items of one task: an ACK's
    `stale` names task ids, and a worker may hold two attempts of a task.
    """
    chunks = []
    start = 0
    while start < len(items):
        end = _message_end(items, start, size, limits, task_id)
        chunks.append(list(items[start:end]))
        start = end
    return chunks


def first_message(
    items: Sequence[T], size: Callable[[T], int], limits: Limits, *, reserved: int = 0
) -> list[T]:
    """The leading items that fit in one message, as split_by_size counts (at least one),
    with `reserved` bytes of the budget kept for what else the message carries."""
    return list(items[: _message_end(items, 0, size, limits, None, reserved)])


def _message_end(
    items: Sequence[T],
    start: int,
    size: Callable[[T], int],
    limits: Limits,
    task_id: Callable[[T], int] | None,
    reserved: int = 0,
) -> int:
    """Where the message that begins at `start` ends: past the last item that fits."""
    budget = limits.max_message_bytes // 2 - reserved
    end = min(len(items), start + limits.max_batch)
    used = 0
    ids: set[int] = set()
    for i in range(start, end):
        item = items[i]
        used += size(item)
        if task_id is not None:
            tid = task_id(item)
            if tid in ids:
                return i
            ids.add(tid)
        if used > budget and i > start:
            return i
    return end


# ---------------------------------------------------------------- framing


def frames(protocol: bytes, command: bytes, body: Mapping[str, Any] | None = None) -> list[bytes]:
    """The three frames of one message, as a DEALER sends them."""
    return [protocol, command, pack(body or {})]


# pyzmq's send_multipart and recv_multipart combine flags as enum members, which
# cost 3x the system calls they wrap for a four-frame message (8 us a message on
# the machines here). These do the same with plain ints.
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
NOBLOCK = int(zmq.NOBLOCK)


def send_frames(socket: zmq.Socket[bytes], parts: Sequence[bytes], flags: int = 0) -> None:
    """send_multipart: raises zmq.Again (with NOBLOCK) only before the first frame left."""
    send = socket.send
    for part in parts[:-1]:
        send(part, flags | _SNDMORE)
    send(parts[-1], flags)


_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def has_message(socket: zmq.Socket[bytes]) -> bool:
    """Whether a message waits to be read.

    Loops that read until empty ask this after each message rather than read
    until recv raises zmq.Again: building that exception took about 20 µs in a
    loop turn that follows a wait (bench/latency_trace.py), on the path of
    every one-at-a-time round trip, where this asks for a few.
    """
    return bool(cast(int, socket.get(_EVENTS)) & _POLLIN)


def recv_frames(socket: zmq.Socket[bytes], flags: int = 0) -> list[bytes]:
    """recv_multipart: every frame of the next message."""
    recv, more = socket.recv, socket.get
    parts = [recv(flags)]
    while more(_RCVMORE):
        parts.append(recv(flags))
    return parts


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """A message as the broker's ROUTER received it, split but not yet typed."""

    identity: bytes
    protocol: bytes
    command: bytes
    body: Mapping[str, Any]


def open_envelope(parts: Sequence[bytes], limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Check frame count, total size, protocol id and command; decode the body."""
    if len(parts) > limits.max_frames:
        raise ProtocolError(E_BAD_FRAMES, f"{len(parts)} frames, at most {limits.max_frames}")
    total = sum(len(p) for p in parts)
    if total > limits.max_message_bytes:
        raise ProtocolError(
            E_TOO_LARGE,
            f"message of {total} bytes exceeds max_message_bytes ({limits.max_message_bytes})",
        )
    if len(parts) != 4:
        raise ProtocolError(
            E_BAD_FRAMES, f"{len(parts) - 1} frames after the routing id, expected 3"
        )
    identity, protocol, command, body = parts
    if protocol == PROTOCOL_CLIENT:
        allowed = CLIENT_TO_BROKER
    elif protocol == PROTOCOL_WORKER:
        allowed = WORKER_TO_BROKER
    else:
        raise ProtocolError(E_BAD_PROTOCOL, f"unknown protocol id {bytes(protocol)[:16]!r}")
    if command not in allowed:
        raise ProtocolError(E_UNKNOWN_COMMAND, f"unknown command {bytes(command)[:16]!r}")
    decoded = unpack(body) if body else {}
    if not isinstance(decoded, dict):
        raise ProtocolError(E_BAD_BODY, "body must be a msgpack map")
    return Envelope(bytes(identity), bytes(protocol), bytes(command), decoded)


def decode_reply(parts: Sequence[bytes], protocol: bytes) -> tuple[bytes, dict[str, Any]]:
    """Decode a broker message at a client or worker: (command, body)."""
    if len(parts) != 3 or parts[0] != protocol:
        raise ProtocolError(E_BAD_FRAMES, "broker message is not [protocol, command, body]")
    body = unpack(parts[2]) if parts[2] else {}
    if not isinstance(body, dict):
        raise ProtocolError(E_BAD_BODY, "body must be a msgpack map")
    return bytes(parts[1]), body


# ---------------------------------------------------------------- field checks


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    try:
        value = body[name]
    except KeyError:
        raise ProtocolError(E_BAD_BODY, f"field {name!r} is missing") from None
    # bool is an int in Python; a counter must not accept True.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(E_BAD_BODY, f"field {name!r} has the wrong type")
    return value


def _optional(body: Mapping[str, Any], name: str, kind: type, default: Any = None) -> Any:
    if body.get(name) is None:
        return default
    return _field(body, name, kind)


def _count(body: Mapping[str, Any], name: str) -> int:
    value: int = _field(body, name, int)
    if not 0 <= value < 2**63:
        raise ProtocolError(E_BAD_BODY, f"field {name!r} is out of range")
    return value


def _text(body: Mapping[str, Any], name: str, max_len: int, *, optional: bool = False) -> Any:
    value = _optional(body, name, str) if optional else _field(body, name, str)
    if value is not None and not 0 < len(value) <= max_len:
        raise ProtocolError(E_BAD_BODY, f"field {name!r} must be 1..{max_len} characters")
    return value


def _blob(body: Mapping[str, Any], name: str, limit: int, what: str) -> bytes | None:
    value = _optional(body, name, bytes)
    if value is not None and len(value) > limit:
        raise ProtocolError(E_TOO_LARGE, f"{name} of {len(value)} bytes exceeds {what} ({limit})")
    return value  # type: ignore[no-any-return]


def _list(body: Mapping[str, Any], name: str, limits: Limits) -> list[Any]:
    value: list[Any] = _field(body, name, list)
    if len(value) > limits.max_batch:
        raise ProtocolError(
            E_TOO_LARGE, f"{len(value)} items in {name!r} exceed max_batch ({limits.max_batch})"
        )
    return value


def _pairs(
    body: Mapping[str, Any], limits: Limits, name: str = "held"
) -> tuple[tuple[int, int], ...]:
    """A list of [task id, attempt] pairs: `held` from a worker, `stale` from the broker."""
    pairs = _list(body, name, limits) if body.get(name) is not None else []
    out = []
    for pair in pairs:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63 for x in pair
            )
        ):
            raise ProtocolError(E_BAD_BODY, f"{name} must be a list of [task id, attempt] pairs")
        out.append((pair[0], pair[1]))
    return tuple(out)


def _ids(body: Mapping[str, Any], limits: Limits) -> tuple[int, ...]:
    ids = _list(body, "ids", limits)
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63 for i in ids):
        raise ProtocolError(E_BAD_BODY, "ids must be non-negative integers below 2**63")
    return tuple(ids)


# ---------------------------------------------------------------- client requests


# NewTask, TaskOutcome and Assignment are made once per task on the hot path:
# NamedTuples, because a frozen dataclass costs about 1.5 us to build, 3x more.
class NewTask(NamedTuple):
    name: str
    payload: bytes  # msgpack of [args, kwargs], opaque to the broker
    key: str | None
    idempotency_key: str | None
    max_attempts: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Submit:
    seq: int
    tasks: tuple[NewTask, ...]
    watch: bool  # push a NOTIFY to this client when each task reaches a final state
    strict: bool  # reject the whole submit if a name was never registered by a worker


@dataclasses.dataclass(frozen=True, slots=True)
class Get:
    seq: int
    ids: tuple[int, ...]
    watch: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class ListTasks:
    seq: int
    state: str | None
    name: str | None
    limit: int
    before_id: int | None
    results: bool  # False: views without their results, which may be 1 MiB each


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    seq: int
    ids: tuple[int, ...]


# PRUNE keeps what ended within the last hour: a client may still be resending
# the SUBMIT of such a task, and its record is what keeps the resend from
# making the task again.
PRUNE_MIN_AGE_S = 3600.0


@dataclasses.dataclass(frozen=True, slots=True)
class Prune:
    seq: int
    before: float  # wall clock, Unix seconds: tasks that ended before this go
    states: frozenset[str]  # final states only
    after_id: int  # the scan goes on after this task id: the `next` of the last REPLY


@dataclasses.dataclass(frozen=True, slots=True)
class History:
    seq: int
    id: int
    after: int  # only events numbered above this one: the `n` of the last event a page carried


def _new_task(item: Any, limits: Limits) -> NewTask:
    # The common, valid task in one pass of exact type checks; anything else
    # takes the field-by-field path below, which names what is wrong.
    if type(item) is dict:
        name, payload = item.get("name"), item.get("payload")
        key, idem, max_attempts = item.get("key"), item.get("idem"), item.get("max_attempts")
        if (
            type(name) is str
            and 0 < len(name) <= limits.max_name_len
            and type(payload) is bytes
            and len(payload) <= limits.max_payload_bytes
            and (key is None or (type(key) is str and 0 < len(key) <= limits.max_key_len))
            and (idem is None or (type(idem) is str and 0 < len(idem) <= limits.max_key_len))
            and (max_attempts is None or (type(max_attempts) is int and 1 <= max_attempts <= 1000))
        ):
            return NewTask(name, payload, key, idem, max_attempts)
    return _checked_new_task(item, limits)


def _checked_new_task(item: Any, limits: Limits) -> NewTask:
    if not isinstance(item, dict):
        raise ProtocolError(E_BAD_BODY, "each task must be a map")
    max_attempts = _optional(item, "max_attempts", int)
    if max_attempts is not None and not 1 <= max_attempts <= 1000:
        raise ProtocolError(E_BAD_BODY, "max_attempts must be 1..1000")
    payload = _blob(item, "payload", limits.max_payload_bytes, "max_payload_bytes")
    if payload is None:
        raise ProtocolError(E_BAD_BODY, "field 'payload' is missing")
    return NewTask(
        name=_text(item, "name", limits.max_name_len),
        payload=payload,
        key=_text(item, "key", limits.max_key_len, optional=True),
        idempotency_key=_text(item, "idem", limits.max_key_len, optional=True),
        max_attempts=max_attempts,
    )


def decode_submit(body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Submit:
    items = _list(body, "tasks", limits)
    if not items:
        raise ProtocolError(E_BAD_BODY, "a SUBMIT needs at least one task")
    return Submit(
        seq=_count(body, "seq"),
        tasks=tuple(_new_task(item, limits) for item in items),
        watch=bool(_optional(body, "watch", bool, False)),
        strict=bool(_optional(body, "strict", bool, False)),
    )


def decode_get(body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Get:
    return Get(
        seq=_count(body, "seq"),
        ids=_ids(body, limits),
        watch=bool(_optional(body, "watch", bool, False)),
    )


def decode_cancel(body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Cancel:
    return Cancel(seq=_count(body, "seq"), ids=_ids(body, limits))


def decode_prune(body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Prune:
    before = _field(body, "before", (float, int))
    if isinstance(before, bool) or not math.isfinite(before):
        raise ProtocolError(E_BAD_BODY, "field 'before' must be a finite number of seconds")
    states = _optional(body, "states", list)
    if states is not None and (
        not states or not all(isinstance(s, str) and s in FINAL_STATES for s in states)
    ):
        raise ProtocolError(
            E_BAD_BODY, f"states must name final states: {', '.join(sorted(FINAL_STATES))}"
        )
    after_id = 0 if body.get("after_id") is None else _count(body, "after_id")
    return Prune(
        seq=_count(body, "seq"),
        before=float(before),
        states=frozenset(states) if states is not None else FINAL_STATES,
        after_id=after_id,
    )


def decode_status(body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Status:
    return Status(seq=_count(body, "seq"))


def decode_tasks(body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> ListTasks:
    state = _optional(body, "state", str)
    if state is not None and state not in ALL_STATES:
        raise ProtocolError(E_BAD_BODY, f"state must be one of {', '.join(ALL_STATES)}")
    limit = _optional(body, "limit", int, 50)
    if not 1 <= limit <= limits.max_batch:
        raise ProtocolError(E_BAD_BODY, f"limit must be 1..{limits.max_batch}")
    return ListTasks(
        seq=_count(body, "seq"),
        state=state,
        name=_text(body, "name", limits.max_name_len, optional=True),
        limit=limit,
        before_id=_count(body, "before_id") if body.get("before_id") is not None else None,
        results=bool(_optional(body, "results", bool, True)),
    )


def decode_history(body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> History:
    after = 0 if body.get("after") is None else _count(body, "after")
    return History(seq=_count(body, "seq"), id=_count(body, "id"), after=after)


# ---------------------------------------------------------------- worker messages


@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    seq: int
    capacity: int
    concurrency: int  # of `capacity`, how many it runs at once; the rest wait in the worker
    tasks: dict[str, int]  # registered task name -> its default max_attempts
    held: tuple[tuple[int, int], ...]  # (task id, attempt) it still runs or must report
    pid: int
    host: str
    pool: str
    incarnation: str  # random per worker process: tells a restart from a reconnect
    dseq: int  # last TASK dseq this process received (0 if none)


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerHeartbeat:
    dseq: int  # last TASK dseq received
    held: tuple[tuple[int, int], ...]
    draining: bool  # stopping: finishes what it holds, wants no more tasks
    incarnation: str = ""  # as in its READY; "" from workers that do not send it


class TaskOutcome(NamedTuple):
    id: int
    attempt: int
    ok: bool
    value: bytes | None  # msgpack of the return value when ok
    error: str | None
    retry: bool  # False for errors that another attempt cannot fix
    # False: the worker hands the task back unrun (it was stopping, at capacity, or
    # the lease went stale while the task waited for a slot).
    started: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    seq: int
    results: tuple[TaskOutcome, ...]


class Checkpoint(NamedTuple):
    id: int
    attempt: int
    number: int  # 1, 2, 3... within one task; a lower number never overwrites a higher
    state: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoints:
    seq: int
    checkpoints: tuple[Checkpoint, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerDisconnect:
    reason: str


def decode_ready(body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Ready:
    capacity = _count(body, "capacity")
    # held lists travel in one READY or HEARTBEAT, so capacity is bounded like a batch.
    if not 1 <= capacity <= limits.max_batch:
        raise ProtocolError(E_BAD_BODY, f"capacity must be 1..{limits.max_batch}")
    concurrency = _count(body, "concurrency") if body.get("concurrency") is not None else capacity
    if not 1 <= concurrency <= capacity:
        raise ProtocolError(E_BAD_BODY, f"concurrency must be 1..capacity ({capacity})")
    names = _field(body, "tasks", dict)
    if len(names) > 10_000 or not all(
        isinstance(n, str)
        and 0 < len(n) <= limits.max_name_len
        and isinstance(m, int)
        and not isinstance(m, bool)
        and 1 <= m <= 1000
        for n, m in names.items()
    ):
        raise ProtocolError(E_BAD_BODY, "tasks must map task names to max_attempts (1..1000)")
    return Ready(
        seq=_count(body, "seq"),
        capacity=capacity,
        concurrency=concurrency,
        tasks=names,
        held=_pairs(body, limits),
        pid=_optional(body, "pid", int, 0),
        host=_optional(body, "host", str, "")[:255],
        pool=_optional(body, "pool", str, "thread")[:32],
        incarnation=_optional(body, "incarnation", str, "")[:64],
        dseq=_count(body, "dseq") if body.get("dseq") is not None else 0,
    )


def decode_worker_heartbeat(
    body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS
) -> WorkerHeartbeat:
    dseq = _count(body, "dseq") if body.get("dseq") is not None else 0
    draining = bool(_optional(body, "draining", bool, False))
    incarnation = _optional(body, "incarnation", str, "")[:64]
    return WorkerHeartbeat(
        dseq=dseq, held=_pairs(body, limits), draining=draining, incarnation=incarnation
    )


def _lease_of(item: dict[str, Any]) -> tuple[int, int] | None:
    """(id, attempt) of an item, if both are exact ints in uint range (the fast paths)."""
    task_id, attempt = item.get("id"), item.get("attempt")
    if type(task_id) is not int or type(attempt) is not int:
        return None
    if not (0 <= task_id < 2**63 and 0 <= attempt < 2**63):
        return None
    return task_id, attempt


def _outcome(item: Any, limits: Limits) -> TaskOutcome:
    # Fast path for a well-formed outcome, as in _new_task.
    if type(item) is dict:
        lease, ok = _lease_of(item), item.get("ok")
        value, error, retry = item.get("value"), item.get("error"), item.get("retry")
        if (
            lease is not None
            and type(ok) is bool
            and (value is None or (type(value) is bytes and len(value) <= limits.max_result_bytes))
            and (error is None or (type(error) is str and len(error) <= limits.max_error_len))
            and (retry is None or type(retry) is bool)
            and "started" not in item
        ):
            return TaskOutcome(*lease, ok, value, error, retry is not False)
    return _checked_outcome(item, limits)


def _checked_outcome(item: Any, limits: Limits) -> TaskOutcome:
    if not isinstance(item, dict):
        raise ProtocolError(E_BAD_BODY, "each result must be a map")
    ok = _field(item, "ok", bool)
    error = _optional(item, "error", str)
    return TaskOutcome(
        id=_count(item, "id"),
        attempt=_count(item, "attempt"),
        ok=ok,
        value=_blob(item, "value", limits.max_result_bytes, "max_result_bytes"),
        error=error[: limits.max_error_len] if error is not None else None,
        retry=bool(_optional(item, "retry", bool, True)),
        started=bool(_optional(item, "started", bool, True)),
    )


def decode_result(body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Result:
    return Result(
        seq=_count(body, "seq"),
        results=tuple(_outcome(item, limits) for item in _list(body, "results", limits)),
    )


def _checkpoint(item: Any, limits: Limits) -> Checkpoint:
    # Fast path for a well-formed checkpoint, as in _outcome.
    if type(item) is dict:
        lease, number, state = _lease_of(item), item.get("number"), item.get("state")
        if (
            lease is not None
            and type(number) is int
            and 0 <= number < 2**63
            and type(state) is bytes
            and len(state) <= limits.max_checkpoint_bytes
        ):
            return Checkpoint(*lease, number, state)
    return _checked_checkpoint(item, limits)


def _checked_checkpoint(item: Any, limits: Limits) -> Checkpoint:
    if not isinstance(item, dict):
        raise ProtocolError(E_BAD_BODY, "each checkpoint must be a map")
    state = _blob(item, "state", limits.max_checkpoint_bytes, "max_checkpoint_bytes")
    if state is None:
        raise ProtocolError(E_BAD_BODY, "field 'state' is missing")
    return Checkpoint(
        id=_count(item, "id"),
        attempt=_count(item, "attempt"),
        number=_count(item, "number"),
        state=state,
    )


def decode_checkpoint(body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Checkpoints:
    return Checkpoints(
        seq=_count(body, "seq"),
        checkpoints=tuple(_checkpoint(item, limits) for item in _list(body, "checkpoints", limits)),
    )


def decode_worker_disconnect(
    body: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS
) -> WorkerDisconnect:
    return WorkerDisconnect(reason=str(_optional(body, "reason", str, ""))[:200])


# ---------------------------------------------------------------- task views

# How the detail of a `retried` event begins when its attempt is not counted
# against max_attempts.
SPARED_NOTE = "not counted against max_attempts"


def task_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """The public fields of a task, as REPLY and NOTIFY carry them."""
    return {
        "id": row["id"],
        "name": row["name"],
        "state": row["state"],
        "key": row["key"],
        "attempt": row["attempt"],
        "max_attempts": row["max_attempts"],
        "spared": row["spared"],
        "worker": row["worker"],
        "result": row["result"],
        "error": row["error"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


# ---------------------------------------------------------------- broker -> worker


class Assignment(NamedTuple):
    """One task leased to a worker for one attempt (the attempt is the fencing token)."""

    id: int
    attempt: int
    name: str
    payload: bytes  # msgpack of [args, kwargs]
    state: bytes | None  # msgpack of the last stored checkpoint, None on a fresh start
    number: int  # number of that checkpoint; the next one the task sends is number + 1


@dataclasses.dataclass(frozen=True, slots=True)
class Dispatch:
    dseq: int  # per-registration counter of TASK messages, echoed in worker heartbeats
    tasks: tuple[Assignment, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome:
    seq: int
    heartbeat_s: float
    liveness: int
    dseq: int  # the dseq of the last TASK the broker sent before this WELCOME
    limits: dict[str, int]  # the broker's Limits by name; empty from older brokers


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    stale: tuple[int, ...]  # task ids whose message was recorded but not applied


def assignment_body(
    id: int, attempt: int, name: str, payload: bytes, state: bytes | None, number: int
) -> dict[str, Any]:
    return {
        "id": id,
        "attempt": attempt,
        "name": name,
        "payload": payload,
        "state": state,
        "number": number,
    }


def decode_dispatch(body: Mapping[str, Any]) -> Dispatch:
    tasks = []
    for item in _field(body, "tasks", list):
        if type(item) is dict:  # fast path for a well-formed assignment, as in _new_task
            lease, name = _lease_of(item), item.get("name")
            payload, state, number = item.get("payload"), item.get("state"), item.get("number")
            if (
                lease is not None
                and type(name) is str
                and type(payload) is bytes
                and (state is None or type(state) is bytes)
                and (number is None or type(number) is int)
            ):
                tasks.append(Assignment(*lease, name, payload, state, number or 0))
                continue
        if not isinstance(item, dict):
            raise ProtocolError(E_BAD_BODY, "each task must be a map")
        payload = _field(item, "payload", bytes)
        tasks.append(
            Assignment(
                id=_count(item, "id"),
                attempt=_count(item, "attempt"),
                name=_field(item, "name", str),
                payload=payload,
                state=_optional(item, "state", bytes),
                number=_optional(item, "number", int, 0),
            )
        )
    return Dispatch(dseq=_count(body, "dseq"), tasks=tuple(tasks))


def decode_welcome(body: Mapping[str, Any]) -> Welcome:
    heartbeat_ms = _count(body, "heartbeat_ms")
    liveness = _count(body, "liveness")
    if heartbeat_ms < 1 or liveness < 1:
        raise ProtocolError(E_BAD_BODY, "heartbeat_ms and liveness must be positive")
    dseq = _count(body, "dseq") if body.get("dseq") is not None else 0
    return Welcome(
        seq=_count(body, "seq"),
        heartbeat_s=heartbeat_ms / 1000,
        liveness=liveness,
        dseq=dseq,
        limits=announced_limits(body.get("limits")),
    )


def announced_limits(announced: Any) -> dict[str, int]:
    """The Limits a peer announced (STATUS, WELCOME): known names with positive int values."""
    if not isinstance(announced, dict):
        return {}
    known = {f.name for f in dataclasses.fields(Limits)}
    return {
        k: v
        for k, v in announced.items()
        if k in known and isinstance(v, int) and not isinstance(v, bool) and v > 0
    }


def decode_broker_heartbeat(body: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """The `stale` pairs of a broker's HEARTBEAT: held attempts whose lease is gone."""
    return _pairs(body, DEFAULT_LIMITS, "stale")


def decode_ack(body: Mapping[str, Any]) -> Ack:
    stale = _optional(body, "stale", list, [])
    return Ack(seq=_count(body, "seq"), stale=tuple(i for i in stale if isinstance(i, int)))


def error_body(seq: int | None, code: str, message: str) -> dict[str, Any]:
    return {"seq": seq, "code": code, "message": message}
