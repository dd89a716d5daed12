"""protocol.md and protocol.py must agree (in the spirit of sqlite-utils' tests/test_docs.py).

Every command has its section, every error code and limit is documented, and
the hex dumps of the appendix still decode with the codec, so neither the spec
nor its examples can go out of date without a failing test.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from taskring import protocol as p

DOC = Path(__file__).resolve().parents[2] / "protocol.md"
COMMAND_NAMES = {c.decode() for c in p.ALL_COMMANDS}
ERROR_CODES = {name: value for name, value in vars(p).items() if name.startswith("E_")}

# Decoders of what peers send to the broker, and of what a worker receives.
TO_BROKER: dict[str, Callable[[Mapping[str, Any]], object]] = {
    "SUBMIT": p.decode_submit,
    "GET": p.decode_get,
    "STATUS": p.decode_status,
    "TASKS": p.decode_tasks,
    "HISTORY": p.decode_history,
    "CANCEL": p.decode_cancel,
    "PRUNE": p.decode_prune,
    "READY": p.decode_ready,
    "HEARTBEAT": p.decode_worker_heartbeat,
    "RESULT": p.decode_result,
    "CHECKPOINT": p.decode_checkpoint,
    "DISCONNECT": p.decode_worker_disconnect,
}
TO_WORKER: dict[str, Callable[[Mapping[str, Any]], object]] = {
    "WELCOME": p.decode_welcome,
    "TASK": p.decode_dispatch,
    "ACK": p.decode_ack,
}


@dataclasses.dataclass(frozen=True)
class Section:
    level: int
    title: str
    text: str  # the section's own lines and those of its subsections


def sections(markdown: str) -> list[Section]:
    """Every `##`/`###` section, with headings inside code fences ignored."""
    heads: list[tuple[int, int, str]] = []  # (line index, level, title)
    lines = markdown.splitlines()
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^(#{2,3}) (.+?)\s*$", line)):
            heads.append((i, len(m.group(1)), m.group(2)))
    out = []
    for n, (start, level, title) in enumerate(heads):
        end = next((i for i, lv, _ in heads[n + 1 :] if lv <= level), len(lines))
        out.append(Section(level, title, "\n".join(lines[start + 1 : end])))
    return out


DOC_TEXT = DOC.read_text(encoding="utf-8")
SECTIONS = sections(DOC_TEXT)


def top(title_prefix: str) -> list[Section]:
    return [s for s in SECTIONS if s.level == 2 and s.title.startswith(title_prefix)]


def command_sections() -> dict[str, str]:
    """`### NAME` sections inside the `## Commands...` parts, by title."""
    out: dict[str, str] = {}
    for part in top("Commands"):
        for sub in sections("## x\n" + part.text):
            if sub.level == 3:
                out[sub.title] = sub.text
    return out


COMMANDS = command_sections()


# ---------------------------------------------------------------- commands, codes, limits


def test_every_command_in_the_code_has_a_section() -> None:
    # Given the commands protocol.py defines, When the spec's command headings are read
    missing = COMMAND_NAMES - COMMANDS.keys()
    # Then each command has its own `### NAME` section
    assert not missing, f"protocol.md has no `### NAME` section for {sorted(missing)}"


def test_every_command_section_names_a_real_command() -> None:
    extra = COMMANDS.keys() - COMMAND_NAMES
    assert not extra, f"protocol.md documents commands protocol.py lacks: {sorted(extra)}"


def test_every_command_section_shows_its_three_frames() -> None:
    for name, text in COMMANDS.items():
        assert f"* Frame 1: `{name}`" in text, f"### {name} has no numbered frame list"
        assert "| field | type | required | meaning |" in text, f"### {name} has no field table"


@pytest.mark.parametrize("constant", sorted(ERROR_CODES))
def test_every_error_code_is_documented(constant: str) -> None:
    (errors,) = top("Error Replies")
    row = f"| `{ERROR_CODES[constant]}` | `{constant}` |"
    assert row in errors.text, f"the Error Replies table has no row for {constant}"


def test_the_error_table_names_only_real_codes() -> None:
    (errors,) = top("Error Replies")
    documented = set(re.findall(r"^\| `([a-z-]+)` \| `(E_[A-Z_]+)` \|", errors.text, re.M))
    assert documented == {(v, k) for k, v in ERROR_CODES.items()}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(p.Limits)])
def test_every_limit_is_documented_with_its_default(field: str) -> None:
    # Given a field of Limits, When its row in the Size Limits table is read
    (limits,) = top("Size Limits")
    row = re.search(rf"^\| `{field}` \| ([^|]+) \|", limits.text, re.M)
    assert row, f"the Size Limits table has no row for {field}"
    # Then the default shown (the number in brackets, else the first number) is the code's
    shown = re.search(r"\((\d+)\)", row.group(1)) or re.search(r"\d+", row.group(1))
    assert shown and int(shown.group(shown.lastindex or 0)) == getattr(p.DEFAULT_LIMITS, field)


# Every field a decoder returns must be a row of its command's field tables. Wire names
# differ from the dataclass field names in a few places.
DECODED: dict[str, tuple[type, ...]] = {
    "SUBMIT": (p.Submit, p.NewTask),
    "GET": (p.Get,),
    "STATUS": (p.Status,),
    "TASKS": (p.ListTasks,),
    "HISTORY": (p.History,),
    "CANCEL": (p.Cancel,),
    "PRUNE": (p.Prune,),
    "READY": (p.Ready,),
    "HEARTBEAT": (p.WorkerHeartbeat,),
    "RESULT": (p.Result, p.TaskOutcome),
    "CHECKPOINT": (p.Checkpoints, p.Checkpoint),
    "DISCONNECT": (p.WorkerDisconnect,),
    "TASK": (p.Dispatch, p.Assignment),
    "WELCOME": (p.Welcome,),
    "ACK": (p.Ack,),
}
WIRE_NAME = {"idempotency_key": "idem", "heartbeat_s": "heartbeat_ms"}


@pytest.mark.parametrize("command", sorted(DECODED))
def test_every_decoded_field_has_a_row_in_its_command_table(command: str) -> None:
    # Given the dataclasses a command decodes to, When its section's tables are read
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", COMMANDS[command], re.M))
    # Then every field is a row there, under its wire name
    for kind in DECODED[command]:
        for field in field_names(kind):
            name = WIRE_NAME.get(field, field)
            assert name in rows, f"{kind.__name__}.{field} has no `{name}` row in ### {command}"


def field_names(kind: type) -> tuple[str, ...]:
    """Fields of a decoded type: a dataclass, or a NamedTuple on the hot path."""
    if dataclasses.is_dataclass(kind):
        return tuple(f.name for f in dataclasses.fields(kind))
    return kind._fields  # type: ignore[attr-defined, no-any-return]


def test_decoded_commands_cover_every_decoder() -> None:
    assert DECODED.keys() == TO_BROKER.keys() | TO_WORKER.keys()


# ---------------------------------------------------------------- appendix hex dumps

HEAD = re.compile(r"^A\.\d+ ([A-Z]+) \((.+)\)$")
FRAME = re.compile(r"^frame (\d): [a-z ]+, (\d+) bytes$")
DUMP = re.compile(r"^([0-9a-f]{8}): (.{39})  (.{1,16})$")


@dataclasses.dataclass(frozen=True)
class Example:
    command: str
    direction: str
    frames: list[bytes]


def undump(block: str) -> list[bytes]:
    """The frames of one example block, each written as `xxd` prints it."""
    frames: list[bytearray] = []
    sizes: list[int] = []
    for line in block.splitlines():
        if m := FRAME.match(line):
            assert int(m.group(1)) == len(frames), f"frames out of order at {line!r}"
            frames.append(bytearray())
            sizes.append(int(m.group(2)))
            continue
        m = DUMP.match(line)
        assert m and frames, f"not an xxd line: {line!r}"
        frame = frames[-1]
        assert int(m.group(1), 16) == len(frame), f"offset does not follow on: {line!r}"
        data = bytes.fromhex(m.group(2).replace(" ", ""))
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in data)
        assert m.group(3) == text, f"ASCII column does not match the bytes: {line!r}"
        frame += data
    assert [len(f) for f in frames] == sizes, "a frame's size does not match its dump"
    return [bytes(f) for f in frames]


def examples() -> list[Example]:
    (appendix,) = top("Appendix A")
    out = []
    for sub in sections("## x\n" + appendix.text):
        m = HEAD.match(sub.title)
        if sub.level != 3 or not m:
            continue
        block = re.search(r"^```text\n(.*?)^```$", sub.text, re.M | re.S)
        assert block, f"example {sub.title!r} has no ```text block"
        out.append(Example(m.group(1), m.group(2), undump(block.group(1))))
    return out


EXAMPLES = examples()


def test_every_command_has_an_example() -> None:
    missing = COMMAND_NAMES - {e.command for e in EXAMPLES}
    assert not missing, f"Appendix A has no example of {sorted(missing)}"


@pytest.mark.parametrize(
    "example", EXAMPLES, ids=[f"{e.command}-{e.direction.split(',')[0]}" for e in EXAMPLES]
)
def test_example_decodes_with_the_codec(example: Example) -> None:
    # Given the frames dumped in the appendix
    protocol, command, body = example.frames  # three frames, no more, no fewer
    # Then frame 0 is the protocol id of the peer kind, frame 1 the heading's command
    assert protocol in (p.PROTOCOL_CLIENT, p.PROTOCOL_WORKER)
    peer = p.PROTOCOL_CLIENT if "client" in example.direction else p.PROTOCOL_WORKER
    assert protocol == peer
    assert command.decode() == example.command
    # And frame 2 is a msgpack map
    assert isinstance(p.unpack(body), dict)
    # And the whole message passes the decoder its receiver uses
    if example.direction.startswith(("client to", "worker to")):
        envelope = p.open_envelope([b"peer", *example.frames])
        TO_BROKER[example.command](envelope.body)
    else:
        received, decoded = p.decode_reply(example.frames, protocol)
        assert received == command
        if example.command in TO_WORKER:
            TO_WORKER[example.command](decoded)


@pytest.mark.parametrize(
    "example", EXAMPLES, ids=[f"{e.command}-{e.direction.split(',')[0]}" for e in EXAMPLES]
)
def test_example_fields_are_documented(example: Example) -> None:
    # Given an example's body, Then each of its fields appears in the spec's command part
    body = p.unpack(example.frames[2])
    own = COMMANDS[example.command]
    everywhere = "\n".join(COMMANDS.values())
    for key, value in body.items():
        assert f"`{key}`" in own, f"field {key!r} of {example.command} is not in its section"
        items = value if isinstance(value, list) else []
        for item in (i for i in items if isinstance(i, dict)):
            for inner in item:
                assert f"`{inner}`" in everywhere, f"field {inner!r} is not documented"
