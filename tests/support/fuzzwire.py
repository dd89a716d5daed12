"""Hostile wire input for the broker: hypothesis strategies and raw ZMTP encoders.

Used by tests/integration/test_fuzz.py. A generated message is a `Msg`: who
sends it (an index into the test's pool of DEALER identities, or a fresh
identity) and its frames, where a frame is raw bytes or a body map still to be
packed. Maps may hold `TaskRef` and `HeldAttempt` placeholders, resolved at send
time to ids of the well-behaved client's tasks and the attempts their leases
hold, so forged RESULTs, CHECKPOINTs and heartbeats name tasks that really run.
A `RawConn` is a plain TCP connection that writes bytes (garbage, cut
greetings, ZMTP/1.0 or 3.0 framing) and closes.

A plaintext ROUTER takes the routing id a peer announces, so everything here
must stay clear of the real worker's name: that would be a takeover, a weakness
protocol.md documents, not a bug to find.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import msgpack
from hypothesis import strategies as st

from taskring import protocol as p

MISSING = object()  # a field left out of a body

# ---------------------------------------------------------------- placeholders


@dataclasses.dataclass(frozen=True)
class TaskRef:
    """One of the good client's task ids, chosen at send time.

    `among` is "all", "recent" (the latest ids), "long" (the tasks that run a
    while and checkpoint) or "running" (as the broker listed them just before).
    """

    index: int
    among: str


@dataclasses.dataclass(frozen=True)
class HeldAttempt:
    """The attempt the real worker holds for TaskRef(index, "running"), plus `delta`.

    With delta 0 a forged message carries the very fencing token of the live
    lease: only the sender's identity tells it from the real worker's.
    """

    index: int
    delta: int


@dataclasses.dataclass(frozen=True)
class Filler:
    """A large frame, kept small in the printed example: `size` copies of `byte`."""

    size: int
    byte: int = 0x92

    def __bytes__(self) -> bytes:
        return bytes([self.byte]) * self.size


@dataclasses.dataclass(frozen=True)
class Msg:
    sender: int | bytes  # index into the identity pool, or a fresh routing id
    frames: tuple[Any, ...]  # bytes, or a dict to pack after resolving TaskRefs


@dataclasses.dataclass(frozen=True)
class RawConn:
    """A TCP connection that writes `prefix`, then `messages` as ZMTP/1.0, then closes."""

    prefix: bytes
    identity: bytes | None  # ZMTP/1.0 identity frame to send after `prefix`, if any
    messages: tuple[Msg, ...]


def resolve(value: Any, pick: Callable[[TaskRef | HeldAttempt], int]) -> Any:
    """`value` with placeholders resolved, Fillers made bytes and MISSING fields removed."""
    if isinstance(value, TaskRef | HeldAttempt):
        return pick(value)
    if isinstance(value, Filler):
        return bytes(value)
    if isinstance(value, dict):
        return {k: resolve(v, pick) for k, v in value.items() if v is not MISSING}
    if isinstance(value, list):
        return [resolve(v, pick) for v in value]
    return value


# ---------------------------------------------------------------- values

U63 = 2**63 - 1
PROTOCOLS = (p.PROTOCOL_CLIENT, p.PROTOCOL_WORKER)
COMMANDS = tuple(sorted(p.ALL_COMMANDS))
MAGIC_FRAMES = (
    *PROTOCOLS,
    *COMMANDS,
    b"TRC02",
    b"trw01",
    b"TRW01\x00",
    b"",
    b"\x80",
    b"\xc0",
    b"submit",
    b"SUBMITX",
    b"ABCDEFGHIJK",
)
FUZZ_NAMES = ("fuzz.a", "fuzz.b", "fuzz.\u00e9\u4e2d", "x" * 200)

task_refs = st.builds(
    TaskRef, st.integers(0, 10_000), st.sampled_from(["all", "recent", "long", "running"])
)
refs = st.one_of(task_refs, st.integers(0, 5), st.integers(0, U63), st.just(U63))
attempts = st.integers(0, 4)
uints = st.one_of(st.integers(0, 6), st.integers(0, U63))
ints64 = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry

scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints64,
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
)
msgpack_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
    ),
    max_leaves=12,
)
# Anything of the wrong type, out of range, or absent.
bad_values = st.one_of(
    st.just(MISSING),
    st.none(),
    st.booleans(),
    st.sampled_from([-1, 2**63, 2**64 - 1, -(2**63), 1001, 0]),
    ints64,
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=4), scalars, max_size=2),
)


def _payload() -> st.SearchStrategy[bytes]:
    args = st.tuples(st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars))
    return st.one_of(
        args.map(lambda a: p.pack([a[0], a[1]])),
        st.binary(max_size=40),
        st.just(b""),
    )


new_tasks = st.fixed_dictionaries(
    {
        "name": st.one_of(st.sampled_from(FUZZ_NAMES), st.text(min_size=1, max_size=16)),
        "payload": _payload(),
    },
    optional={
        "key": st.one_of(st.none(), st.text(min_size=1, max_size=6)),
        "idem": st.one_of(st.none(), st.sampled_from(["i1", "i2", "i3"]), st.text(max_size=6)),
        "max_attempts": st.one_of(st.none(), st.integers(1, 1000)),
    },
)


@st.composite
def id_attempts(draw: st.DrawFn) -> tuple[Any, Any]:
    """(task id, attempt): half the time a running task and the attempt its lease holds."""
    if draw(st.booleans()):
        index = draw(st.integers(0, 50))
        return TaskRef(index, "running"), HeldAttempt(index, draw(st.sampled_from([0, 0, -1, 1])))
    return draw(refs), draw(attempts)


held_lists = st.lists(id_attempts().map(list), max_size=4)


@st.composite
def checkpoints(draw: st.DrawFn) -> dict[str, Any]:
    """One item of a CHECKPOINT: well-typed, or now and then with one field broken."""
    task_id, attempt = draw(id_attempts())
    number = draw(st.one_of(st.integers(0, 8), st.integers(0, U63)))
    item = {
        "id": task_id,
        "attempt": attempt,
        "number": number,
        "state": draw(st.binary(max_size=16)),
    }
    if draw(st.integers(0, 7)) == 0:
        item[draw(st.sampled_from([*item, "unknown_field"]))] = draw(bad_values)
    return item


@st.composite
def outcomes(draw: st.DrawFn) -> dict[str, Any]:
    task_id, attempt = draw(id_attempts())
    optional = {
        "value": st.one_of(st.none(), st.binary(max_size=16)),
        "error": st.one_of(st.none(), st.text(max_size=16)),
        "retry": st.booleans(),
    }
    extra = draw(st.fixed_dictionaries({}, optional=optional))
    return {"id": task_id, "attempt": attempt, "ok": draw(st.booleans()), **extra}


# The field tables of protocol.md, with strategies for well-typed values.
FIELDS: dict[bytes, dict[str, st.SearchStrategy[Any]]] = {
    p.SUBMIT: {
        "seq": uints,
        "tasks": st.lists(new_tasks, min_size=1, max_size=3),
        "watch": st.booleans(),
        "strict": st.booleans(),
    },
    p.GET: {
        "seq": uints,
        "ids": st.lists(refs, max_size=5),
        "watch": st.booleans(),
    },
    p.STATUS: {"seq": uints},
    p.TASKS: {
        "seq": uints,
        "state": st.one_of(st.none(), st.sampled_from(p.ALL_STATES)),
        "name": st.one_of(st.none(), st.sampled_from(["tt_tasks.add", *FUZZ_NAMES])),
        "limit": st.one_of(st.none(), st.integers(1, 1000)),
        "before_id": st.one_of(st.none(), refs),
    },
    p.HISTORY: {"seq": uints, "id": refs},
    p.READY: {
        "seq": uints,
        "capacity": st.integers(1, 6),
        "tasks": st.dictionaries(
            st.one_of(st.sampled_from(FUZZ_NAMES), st.text(min_size=1, max_size=10)),
            st.integers(1, 1000),
            max_size=3,
        ),
        "held": held_lists,
        "pid": ints64,
        "host": st.text(max_size=10),
        "pool": st.sampled_from(["thread", "process", ""]),
        "incarnation": st.one_of(st.just("fuzz-incarnation"), st.text(max_size=10)),
        "dseq": uints,
    },
    p.HEARTBEAT: {"dseq": uints, "held": held_lists, "draining": st.booleans()},
    p.RESULT: {"seq": uints, "results": st.lists(outcomes(), max_size=4)},
    p.CHECKPOINT: {"seq": uints, "checkpoints": st.lists(checkpoints(), max_size=4)},
    p.DISCONNECT: {"reason": st.text(max_size=20)},
}
PROTOCOL_OF = {cmd: p.PROTOCOL_CLIENT for cmd in p.CLIENT_TO_BROKER} | {
    cmd: p.PROTOCOL_WORKER for cmd in p.WORKER_TO_BROKER
}


def _break(body: dict[str, Any], damage: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(body)
    for name, value in damage:
        out[name] = value
    return out


@st.composite
def shaped_messages(
    draw: st.DrawFn, command: bytes | None = None
) -> tuple[bytes, bytes, dict[str, Any]]:
    """A command of the right shape: valid, or with a few fields of the wrong type or absent."""
    if command is None:
        command = draw(st.sampled_from(sorted(FIELDS)))
    fields = FIELDS[command]
    body = draw(st.fixed_dictionaries(fields))
    names = [*fields, "unknown_field"]
    damage = draw(st.lists(st.tuples(st.sampled_from(names), bad_values), max_size=2))
    protocol = PROTOCOL_OF[command]
    if draw(st.integers(0, 19)) == 0:  # now and then under the other sub-protocol
        protocol = p.PROTOCOL_WORKER if protocol == p.PROTOCOL_CLIENT else p.PROTOCOL_CLIENT
    return protocol, command, _break(body, damage)


def _raw_ext(code: int, data: bytes) -> bytes:
    return b"\xc7" + bytes([len(data)]) + code.to_bytes(1, "big", signed=True) + data


@st.composite
def garbage_bodies(draw: st.DrawFn) -> bytes:
    """A body frame that is not a valid msgpack map with str keys."""
    kind = draw(st.integers(0, 7))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:  # a msgpack value that is not a map
        value = draw(msgpack_values.filter(lambda v: not isinstance(v, dict)))
        return p.pack(value)
    if kind == 2:  # a map with keys that are not str
        keys = st.one_of(ints64, st.binary(max_size=4), st.booleans(), st.none(), st.floats())
        return msgpack.packb(draw(st.dictionaries(keys, scalars, min_size=1, max_size=3)))
    if kind == 3:  # extension types, including the timestamp (-1) hidden in a field
        code = draw(st.integers(-128, 127))
        ext = _raw_ext(code, draw(st.binary(max_size=12)))
        return b"\x82\xa3seq\x01\xa2id" + ext
    if kind == 4:  # a valid body cut short
        body = p.pack({"seq": 1, "results": [{"id": 1, "attempt": 1, "ok": True}]})
        return body[: draw(st.integers(0, len(body) - 1))]
    if kind == 5:  # a valid body with bytes after it
        return p.pack({"seq": 1}) + draw(st.binary(min_size=1, max_size=8))
    if kind == 6:  # deep nesting
        depth = draw(st.integers(1, 5000))
        return b"\x81\xa1x" + b"\x91" * depth + b"\xc0"
    return msgpack.packb(  # a timestamp value, which msgpack decodes without ext_hook
        {"seq": 1, "id": msgpack.Timestamp(draw(st.integers(0, 2**32 - 1)), 0)}
    )


big_frames = st.builds(Filler, st.integers(0, 200_000), st.integers(0, 255))
frames = st.one_of(st.binary(max_size=48), st.sampled_from(MAGIC_FRAMES), big_frames)


@st.composite
def frame_lists(draw: st.DrawFn) -> tuple[Any, ...]:
    """The frames of one message: random, valid header with a garbage body, or shaped."""
    kind = draw(st.integers(0, 9))
    if kind <= 1:  # random frames, random count
        return tuple(draw(st.lists(frames, min_size=1, max_size=7)))
    if kind <= 3:  # a valid header, a garbage body
        protocol = draw(st.sampled_from(PROTOCOLS))
        command = draw(st.sampled_from(sorted(FIELDS)))
        return (protocol, command, draw(garbage_bodies()))
    protocol, command, body = draw(shaped_messages())
    if draw(st.integers(0, 29)) == 0:  # a valid message with one frame too many or too few
        return (protocol, command, body, b"") if draw(st.booleans()) else (protocol, command)
    return (protocol, command, body)


def _senders(pool_size: int, avoid: frozenset[bytes]) -> st.SearchStrategy[int | bytes]:
    fresh = st.binary(min_size=1, max_size=255).filter(lambda b: b not in avoid)
    return st.integers(0, 9).flatmap(
        lambda k: fresh if k == 0 else st.integers(0, pool_size - 1)  # type: ignore[arg-type]
    )


def messages(pool_size: int, avoid: frozenset[bytes]) -> st.SearchStrategy[Msg]:
    return st.builds(Msg, _senders(pool_size, avoid), frame_lists())


@st.composite
def repeats(draw: st.DrawFn, pool_size: int, avoid: frozenset[bytes]) -> list[Msg]:
    """Two messages of one sender with one seq: a resend (the same frames), or a
    broken peer that reuses the seq for another body of the same command."""
    sender = draw(_senders(pool_size, avoid))
    protocol, command, body = draw(shaped_messages())
    first = Msg(sender, (protocol, command, body))
    if draw(st.booleans()):
        return [first, first]
    other = draw(shaped_messages(command))[2]
    if "seq" in body:
        other["seq"] = body["seq"]
    return [first, Msg(sender, (protocol, command, other))]


def batches(pool_size: int, avoid: frozenset[bytes]) -> st.SearchStrategy[list[Msg]]:
    """10 to 60 groups of messages; one group in eight is a repeat of a seq."""
    group = st.integers(0, 7).flatmap(
        lambda k: repeats(pool_size, avoid) if k == 0 else messages(pool_size, avoid).map(_one)
    )
    return st.lists(group, min_size=10, max_size=60).map(
        lambda groups: list(itertools.chain.from_iterable(groups))
    )


def _one(msg: Msg) -> list[Msg]:
    return [msg]


# ---------------------------------------------------------------- raw TCP

# A ZMTP 3.0 greeting for the NULL mechanism (RFC 23): signature, version, mechanism.
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32


def zmtp10(frames: list[bytes]) -> bytes:
    """Frames in ZMTP/1.0 framing (RFC 13): length of flags+body, flags (bit 0: more), body."""
    out = bytearray()
    for i, frame in enumerate(frames):
        size = len(frame) + 1
        out += bytes([size]) if size < 255 else b"\xff" + size.to_bytes(8, "big")
        out += b"\x01" if i < len(frames) - 1 else b"\x00"
        out += frame
    return bytes(out)


def zmtp3_ready(identity: bytes) -> bytes:
    def prop(name: bytes, value: bytes) -> bytes:
        return bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value

    body = b"\x05READY" + prop(b"Socket-Type", b"DEALER") + prop(b"Identity", identity)
    return b"\x04" + bytes([len(body)]) + body


@st.composite
def raw_prefixes(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Bytes to write first; True if ZMTP/1.0 messages may follow them."""
    kind = draw(st.integers(0, 7))
    if kind == 0:
        return draw(st.binary(min_size=1, max_size=300)), False
    if kind == 1:  # a greeting cut anywhere
        return GREETING[: draw(st.integers(1, len(GREETING) - 1))], False
    if kind == 2:  # a greeting, then garbage where the handshake belongs
        return GREETING + draw(st.binary(max_size=100)), False
    if kind == 3:  # another version or mechanism
        version = bytes([draw(st.integers(0, 255)), draw(st.integers(0, 255))])
        mechanism = draw(st.sampled_from([b"CURVE", b"PLAIN", b"GSSAPI", b"\xff" * 20, b""]))
        return GREETING[:10] + version + mechanism.ljust(20, b"\x00")[:20] + b"\x00" * 32, False
    if kind == 4:  # ZMTP/1.0 with a huge 8-byte length (byte 9 even, so not a greeting)
        size = draw(st.sampled_from([2**63, 2**64 - 256, 2**32, 17 * 2**20, 0])) & ~0xFF
        return b"\xff" + size.to_bytes(8, "big") + draw(st.binary(max_size=64)), False
    if kind == 5:  # a ZMTP 3.0 handshake, then a message frame claiming a huge size
        size = draw(st.sampled_from([2**63 - 1, 2**64 - 1, 2**31, 17 * 2**20]))
        ident = b"raw3-" + draw(st.binary(max_size=8))
        return GREETING + zmtp3_ready(ident) + b"\x02" + size.to_bytes(8, "big"), False
    if kind == 6:  # a ZMTP 3.0 handshake, then garbage frames
        ident = b"raw3-" + draw(st.binary(max_size=8))
        return GREETING + zmtp3_ready(ident) + draw(st.binary(max_size=200)), False
    return b"", True  # ZMTP/1.0 messages follow


@st.composite
def raw_conns(draw: st.DrawFn) -> RawConn:
    prefix, messages_follow = draw(raw_prefixes())
    if not messages_follow:
        return RawConn(prefix, None, ())
    identity = draw(st.one_of(st.just(b""), st.binary(max_size=12).map(lambda b: b"raw1-" + b)))
    msgs = draw(st.lists(st.builds(Msg, st.just(-1), frame_lists()), max_size=4))
    return RawConn(prefix, identity, tuple(msgs))
