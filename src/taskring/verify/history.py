"""A run's history as the checker reads it: the task log and the journals around it.

The task log is opened read-only (`mode=ro`), so verifying never changes
what it verifies, and it is read with SQL of its own rather than through the
broker's Store: an auditor should not share the code it audits.

Journals are JSON lines. A line that does not parse (a torn last write of a
killed process) or lacks a field is skipped and counted in `notes`: a skipped
line can only make a journal claim less, never more.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from taskring.errors import TaskringError


class VerifyError(TaskringError):
    """The history cannot be read: a missing file, or one that is not what it should be."""


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """A row of `tasks`: the broker's current view of one task."""

    id: int
    name: str
    state: str
    attempt: int
    max_attempts: int
    checkpoint_no: int
    spared: int  # 0 in a log from before spared attempts


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """A row of `events`; `seq` (events.id) is the log order."""

    seq: int
    task_id: int
    kind: str
    attempt: int
    worker: str | None
    detail: str | None

    @property
    def number(self) -> int | None:
        """The checkpoint number of a `checkpointed` event ("checkpoint N")."""
        if self.kind != "checkpointed" or not self.detail:
            return None
        head, _, tail = self.detail.partition(" ")
        return int(tail) if head == "checkpoint" and tail.isdigit() else None


@dataclasses.dataclass(frozen=True, slots=True)
class Submit:
    """One task id a client journal says the broker acknowledged."""

    task_id: int
    name: str | None
    source: str  # file:line


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    """A CANCEL a client journal says the broker answered: the state it gave the task."""

    task_id: int
    state: str | None  # "cancelled", the final state the task already had, or None
    source: str


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    """One line of a worker's --journal: a result or checkpoint the broker ACKed."""

    kind: str  # "result" or "checkpoint"
    task_id: int
    attempt: int
    stale: bool
    ok: bool  # results only
    number: int  # checkpoints only
    worker: str
    source: str


@dataclasses.dataclass(frozen=True, slots=True)
class Start:
    """An attempt starting to run, as a chaos task recorded it: its checkpoint number."""

    task_id: int
    attempt: int
    number: int
    source: str


@dataclasses.dataclass(slots=True)
class History:
    db: str
    tasks: dict[int, Task]
    events: dict[int, list[Event]]  # by task id, in log order
    integrity: str
    submits: list[Submit] | None  # None: no client journals were given
    cancels: list[Cancel]
    acks: list[Ack]
    starts: list[Start]
    files: dict[str, int]  # input kind -> files read
    notes: list[str]


def journal_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, or the *.jsonl files of folders named; VerifyError if one is missing."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(path.glob("*.jsonl")))
        elif path.is_file():
            found.append(path)
        else:
            raise VerifyError(f"no such file or folder: {path}")
    return found


def load_history(
    db_path: str | Path,
    client_journals: Sequence[str | Path] = (),
    worker_journals: Sequence[str | Path] = (),
    start_logs: Sequence[str | Path] = (),
) -> History:
    clients = journal_files(client_journals)
    workers = journal_files(worker_journals)
    starts = journal_files(start_logs)
    notes: list[str] = []
    tasks, events, integrity = _read_log(Path(db_path))
    records = [r for path in clients for r in _parse(path, _client_record, notes)]
    submits = [r for r in records if isinstance(r, Submit)] if clients else None
    return History(
        db=str(db_path),
        tasks=tasks,
        events=events,
        integrity=integrity,
        submits=submits,
        cancels=[r for r in records if isinstance(r, Cancel)],
        acks=[a for path in workers for a in _parse(path, _ack, notes)],
        starts=[s for path in starts for s in _parse(path, _start, notes)],
        files={"client": len(clients), "worker": len(workers), "start": len(starts)},
        notes=notes,
    )


# ---------------------------------------------------------------- the task log


def _read_log(path: Path) -> tuple[dict[int, Task], dict[int, list[Event]], str]:
    if not path.is_file():
        raise VerifyError(f"no such database: {path}")
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise VerifyError(f"cannot open {path}: {e}") from e
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if not {"tasks", "events"} <= tables:
            raise VerifyError(f"{path} is not a taskring database (no tasks and events tables)")
        integrity = "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
        columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
        spared = "spared" if "spared" in columns else "0"
        tasks = {
            row[0]: Task(*row)
            for row in conn.execute(
                f"SELECT id, name, state, attempt, max_attempts, checkpoint_no, {spared} FROM tasks"
            )
        }
        events: dict[int, list[Event]] = {}
        for row in conn.execute(
            "SELECT id, task_id, kind, attempt, worker, detail FROM events ORDER BY task_id, id"
        ):
            event = Event(*row)
            events.setdefault(event.task_id, []).append(event)
    except sqlite3.DatabaseError as e:
        raise VerifyError(f"cannot read {path}: {e}") from e
    finally:
        conn.close()
    return tasks, events, integrity


# ---------------------------------------------------------------- journals


def _parse(path: Path, parse: Any, notes: list[str]) -> Iterator[Any]:
    """Records of one journal; skipped lines are counted in notes."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise VerifyError(f"cannot read {path}: {e}") from e
    read = skipped = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records = list(parse(record, f"{path.name}:{number}"))
        except (ValueError, TypeError, KeyError):
            skipped += 1
            continue
        read += 1
        yield from records
    if skipped and not read:
        raise VerifyError(f"{path} is not a journal: none of its lines is a record")
    if skipped:
        notes.append(f"{path.name}: {skipped} unreadable line(s) skipped (a torn write?)")


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value


def _client_record(record: dict[str, Any], source: str) -> Iterator[Submit | Cancel]:
    """An acknowledged submit `{"ids": [...], "name": ...}`, or an answered cancel
    `{"cancel": id, "state": ...}`."""
    if "cancel" in record:
        state = record["state"]
        if state is not None and not isinstance(state, str):
            raise TypeError("state is not a string")
        yield Cancel(_int(record["cancel"]), state, source)
        return
    name = record.get("name")
    for task_id in record["ids"]:
        yield Submit(_int(task_id), name if isinstance(name, str) else None, source)


def _ack(record: dict[str, Any], source: str) -> Iterator[Ack]:
    kind = record["kind"]
    if kind not in ("result", "checkpoint"):
        raise ValueError(f"unknown kind {kind!r}")
    yield Ack(
        kind=kind,
        task_id=_int(record["id"]),
        attempt=_int(record["attempt"]),
        stale=bool(record["stale"]),
        ok=bool(record.get("ok", False)),
        number=_int(record.get("number", 0)),
        worker=str(record.get("worker", "?")),
        source=source,
    )


def _start(record: dict[str, Any], source: str) -> Iterator[Start]:
    yield Start(_int(record["id"]), _int(record["attempt"]), _int(record["number"]), source)
