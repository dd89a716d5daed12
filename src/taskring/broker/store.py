"""The task log: SQLite in WAL mode, the only module that speaks SQL.

Two tables carry the truth. `tasks` holds the current state of each task;
`events` is append-only and tells how it got there, so the history of any
task can be shown and checked. The broker opens one transaction per loop
turn (`turn()`), so a burst of submits, results and checkpoints costs one
commit, and nothing is acknowledged before that commit returns.

A commit survives the death of any process. With `synchronous="full"` (the
default) it also survives power loss once `sync()` returned: SQLite commits
with synchronous=NORMAL and a WalSyncer fdatasyncs the WAL file, once for all
the commits since the last sync (broker/durability.py). With `"normal"`
nothing is synced per commit: a power loss may roll back the last commits.
It is offered for speed. In either mode the WAL is copied into the database
between turns, not inside a commit (broker/checkpointer.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any

import msgpack
import sqlite_utils

from taskring.broker.checkpointer import (
    FALLBACK_FRAMES,
    WAL_SIZE_LIMIT_BYTES,
    TurnEndCheckpointer,
    WalCheckpointer,
)
from taskring.broker.durability import WalSyncer, failed_sync_marker
from taskring.broker.ownership import LogLock
from taskring.broker.walindex import WalIndex
from taskring.protocol import CANCELLED, FINAL_STATES, QUEUED, RUNNING

# sqlite3.Row, read by column name; typed loosely because typeshed's Row is
# not a Mapping, though every reader here uses it as one.
Row = Any

log = logging.getLogger(__name__)

# Every task id up to this one may have been given out (m003).
HIGHEST_TASK_ID = "highest_task_id"
# Ids reserved at once, durably before any TASK can carry one. A crash skips what
# was left of the block; a broker that stops cleanly gives the rest back.
ID_BLOCK = 1024

migrations = sqlite_utils.Migrations("taskring")


@migrations()
def m001_tasks_and_events(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE tasks (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            payload BLOB NOT NULL,          -- msgpack [args, kwargs], never decoded here
            key TEXT,
            state TEXT NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 0,   -- leases granted so far: the fencing token
            max_attempts INTEGER NOT NULL,
            worker TEXT,                    -- holder of the current or last lease
            checkpoint BLOB,
            checkpoint_no INTEGER NOT NULL DEFAULT 0,
            result BLOB,
            error TEXT,
            client TEXT,                    -- who submitted it: request (client, seq, index)
            client_seq INTEGER,
            client_idx INTEGER,
            idempotency_key TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)
            WHERE idempotency_key IS NOT NULL;
        -- Only the states the broker reads back are indexed: a task's last
        -- transition removes it from both, and the indexes stay small and hot.
        CREATE INDEX tasks_queued ON tasks (id) WHERE state = 'queued';
        CREATE INDEX tasks_running ON tasks (id) WHERE state = 'running';
        -- One row per SUBMIT message, not per task: a resend of (client, seq)
        -- gets the same ids back, at the cost of one small row per batch.
        CREATE TABLE requests (
            client TEXT NOT NULL,
            seq INTEGER NOT NULL,
            ids BLOB NOT NULL,              -- msgpack array of the task ids answered
            at REAL NOT NULL,
            PRIMARY KEY (client, seq)
        ) WITHOUT ROWID;
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            task_id INTEGER NOT NULL,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            worker TEXT,
            detail TEXT
        );
        CREATE INDEX events_task ON events (task_id, id);
        -- Names workers registered, so a submit of a name never seen can be flagged.
        CREATE TABLE task_names (
            name TEXT PRIMARY KEY,
            max_attempts INTEGER NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL
        );
        """
    )


@migrations()
def m002_spared_attempts(db: sqlite_utils.Database) -> None:
    # Attempts that never started (handed back, lost in transit, or likely still
    # waiting in a worker that died): counted in `attempt`, the fencing token, but
    # not against max_attempts.
    db.execute("ALTER TABLE tasks ADD COLUMN spared INTEGER NOT NULL DEFAULT 0")


@migrations()
def m003_highest_task_id(db: sqlite_utils.Database) -> None:
    # Task ids are reserved a block at a time (Store.allocate_id), and pruning may
    # delete the newest tasks: max(id) alone could give an id out twice, and a
    # client's or a task's old id would name another task.
    db.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")


# In the order of broker.jobs.Job's fields.
JOB_COLUMNS = (
    "id, name, payload, key, attempt, max_attempts, checkpoint, checkpoint_no, created_at, spared"
)
VIEW_COLUMNS = (
    "id, name, state, key, attempt, max_attempts, spared, worker, result, error, created_at,"
    " updated_at"
)
# The same without reading the results, which may be 1 MiB each.
VIEW_COLUMNS_NO_RESULT = VIEW_COLUMNS.replace(" result,", " NULL AS result,")

_INSERT_EVENT = (
    "INSERT INTO events (task_id, at, kind, attempt, worker, detail) VALUES (?, ?, ?, ?, ?, ?)"
)
_LEASE = (
    f"UPDATE tasks SET state = '{RUNNING}', attempt = ?, worker = ?, updated_at = ? WHERE id = ?"
)
# The hot path's writes in bulk. executemany runs a statement once per row,
# which for a task's small rows cost about as much as the write itself, so
# rows that differ only in the task id are one statement reading the ids from
# a JSON array (Store._per_id), and rows that differ in more go many to a
# statement as rows of VALUES (Store._write_rows). Each has a one-row form
# taking the same parameters, for the few rows of a quiet turn: below _FEW rows
# the bulk form costs more to set up than it saves (in-process, one task per
# turn took twice as long to lease and finish through it).
_FEW = 8
_INSERT_EVENTS = (
    "INSERT INTO events (task_id, at, kind, attempt, worker, detail)"
    " SELECT value, ?, ?, ?, ?, NULL FROM json_each(?)"
)
# _INSERT_EVENT with the parameters of _INSERT_EVENTS: (now, kind, attempt, worker, id).
_INSERT_EVENT_LAST_ID = (
    "INSERT INTO events (task_id, at, kind, attempt, worker, detail)"
    " VALUES (?5, ?1, ?2, ?3, ?4, NULL)"
)
_LEASE_MANY = (
    f"UPDATE tasks SET state = '{RUNNING}', attempt = ?, worker = ?, updated_at = ?"
    " WHERE id IN (SELECT value FROM json_each(?))"
)
_INSERT_TASKS = (
    "INSERT INTO tasks (id, name, payload, key, state, attempt, max_attempts, client,"
    " client_seq, client_idx, idempotency_key, created_at, updated_at) VALUES {rows}"
)
_TASK_ROW = f"(?, ?, ?, ?, '{QUEUED}', 0, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_TASK = _INSERT_TASKS.format(rows=_TASK_ROW)
# Results differ per task; SQLite walks the rows of VALUES, finding each task by its id.
_SUCCEED = (
    "UPDATE tasks SET state = 'succeeded', result = v.column3, error = NULL, updated_at = ?"
    " FROM (VALUES {rows}) AS v WHERE tasks.id = v.column1 AND tasks.attempt = v.column2"
)
_SUCCESS_ROW = "(?, ?, ?)"
# The same for one row, with the same parameters: (now, id, attempt, result).
_SUCCEED_ONE = (
    "UPDATE tasks SET state = 'succeeded', result = ?4, error = NULL, updated_at = ?1"
    " WHERE id = ?2 AND attempt = ?3"
)
# Rows of VALUES per statement: a fixed number keeps it one prepared statement.
_ROWS_PER_STATEMENT = 32
_INSERT_TASKS_MANY = _INSERT_TASKS.format(rows=", ".join([_TASK_ROW] * _ROWS_PER_STATEMENT))
_SUCCEED_MANY = _SUCCEED.format(rows=", ".join([_SUCCESS_ROW] * _ROWS_PER_STATEMENT))
_REQUEUE = (
    f"UPDATE tasks SET state = '{QUEUED}', error = ?, updated_at = ?, spared = spared + ?"
    " WHERE id = ?"
)
_FINISH = (
    "UPDATE tasks SET state = ?, result = ?, error = ?, updated_at = ? WHERE id = ? AND attempt = ?"
)
_CANCEL = (
    f"UPDATE tasks SET state = '{CANCELLED}', error = ?, updated_at = ?"
    f" WHERE id = ? AND state IN ('{QUEUED}', '{RUNNING}')"
)
_CHECKPOINT = (
    "UPDATE tasks SET checkpoint = ?, checkpoint_no = ?, updated_at = ?"
    " WHERE id = ? AND attempt = ? AND checkpoint_no < ?"
)

_PRUNE_EVENTS = "DELETE FROM events WHERE task_id IN (SELECT value FROM json_each(?))"
# The state check again: whatever a caller passed, a live task stays.
_PRUNE_TASKS = (
    "DELETE FROM tasks WHERE id IN (SELECT value FROM json_each(?)) AND state IN ({})".format(
        ", ".join(f"'{state}'" for state in sorted(FINAL_STATES))
    )
)
_PRUNE_REQUEST = "DELETE FROM requests WHERE client = ? AND seq = ?"
# The records of [client, seq] pairs given as a JSON array, and who made the tasks left.
_REQUESTS_OF = (
    "SELECT r.client, r.seq, r.ids FROM json_each(?) AS j JOIN requests AS r"
    " ON r.client = json_extract(j.value, '$[0]') AND r.seq = json_extract(j.value, '$[1]')"
)
_SUBMITTERS_OF = "SELECT client, client_seq FROM tasks WHERE id IN (SELECT value FROM json_each(?))"
_RAISE_COUNTER = (
    "INSERT INTO counters (name, value) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)"
)
_SET_COUNTER = (
    "INSERT INTO counters (name, value) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)


class Store:
    """All reads and writes of the task log."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "full") -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")
        _require_features()
        self.path = os.fspath(path)
        # Before anything reads the log: one broker per log (broker/ownership.py).
        self._owner = LogLock(self.path)
        try:
            # The log may hold task arguments and results: readable by its owner only.
            if not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            # Autocommit outside turn(): a stray write can never leave a transaction
            # open that every later turn would silently nest inside and never commit.
            connection = sqlite3.connect(self.path, isolation_level=None)
        except BaseException:
            self._owner.close()
            raise
        self.db = sqlite_utils.Database(connection)
        self.conn: sqlite3.Connection = connection
        self.syncer: WalSyncer | None = None
        self._wal_index: WalIndex | None = None
        self.checkpointer: WalCheckpointer | TurnEndCheckpointer | None = None
        # Commits are numbered, so that a sync can tell whether one is needed.
        self.generation = 0
        self._checked = 0  # the generation finish_checkpoint() last looked after
        # A block of ids was reserved since the last sync: TASKs wait for the next.
        self.ids_not_synced = False
        try:
            self._open(synchronous)
        except BaseException:
            # In this order whatever failed: see close().
            self._close_files()
            raise

    def _open(self, synchronous: str) -> None:
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("PRAGMA busy_timeout = 5000")
        migrations.apply(self.db)
        self._recover_from_a_failed_sync()
        self.next_id = 1 + max(
            self.conn.execute("SELECT max(id) FROM tasks").fetchone()[0] or 0,
            self._counter(HIGHEST_TASK_ID),
        )
        # A log from before m003 has no counter, and one that only prunes raised
        # may have it below max(id): from here on it is never below.
        self.conn.execute(_RAISE_COUNTER, (HIGHEST_TASK_ID, self.next_id - 1))
        self._reserved = self.next_id - 1  # ids up to this one are in the log's counter
        # Checkpoints run between turns; SQLite's own, inside a commit, is a fallback.
        self.conn.execute(f"PRAGMA wal_autocheckpoint = {FALLBACK_FRAMES}")
        self.conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
        if synchronous == "full":
            # The read above made SQLite open (and create) the WAL file.
            self.syncer = WalSyncer(self.path)
            self.syncer.sync_what_is_there()
            self.checkpointer = self._turn_end_checkpointer()
        else:
            self.checkpointer = WalCheckpointer(self.path)

    def _recover_from_a_failed_sync(self) -> None:
        """After a failed sync (durability.failed_sync_marker), copy the whole log into
        the database file and sync it, before anything is answered from it.

        The checkpoint writes what SQLite reads back, failed pages included, into
        the database file as new writes, and syncs that (SQLite does, in NORMAL
        mode too) before it empties the WAL; an error (the disk still failing)
        stops the start, and the marker stays.
        """
        marker = failed_sync_marker(self.path)
        if not os.path.lexists(marker):
            return
        log.warning("the last sync of task log %s failed: copying it before serving", self.path)
        busy, _, _ = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise sqlite3.OperationalError(
                "the log must be copied after a failed sync, but another connection "
                "holds it open; close it and start again"
            )
        # SQLite synced the database file before it emptied the WAL. Lost in a
        # crash, or refused, the unlink only makes the next start copy an empty
        # WAL again.
        try:
            os.unlink(marker)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", marker, e)

    def _turn_end_checkpointer(self) -> TurnEndCheckpointer | None:
        try:
            self._wal_index = WalIndex(self.path)
        except OSError as e:
            # No -shm file: this SQLite keeps the wal-index in memory. Checkpoint
            # inside commits, as SQLite does by default, rather than not start.
            log.warning("WAL length unreadable (%s); SQLite checkpoints in its commits", e)
            self.conn.execute("PRAGMA wal_autocheckpoint = 1000")
            return None
        return TurnEndCheckpointer(self._wal_index)

    def keep_ownership(self) -> bool:
        """Take the log's lock file again if it was removed or replaced; False if it was.

        Raises LogInUse if another broker holds the file now at its path.
        """
        return self._owner.keep()

    def sync(self) -> None:
        """Make every commit so far survive power loss (with synchronous="full")."""
        if self.syncer is not None:
            try:
                self.syncer.sync(self.generation)
            except OSError as e:
                # Nothing more may be acknowledged; the broker stops, and a restart
                # recovers from what the log holds.
                raise _sync_failed(e) from e
        self.ids_not_synced = False

    def finish_checkpoint(self) -> None:
        """Between turns, after their messages left: copy the WAL into the database
        once it is long, so that the WAL starts over. Only after a turn that wrote:
        the others (most heartbeats) leave the WAL as it was."""
        if self.checkpointer is not None and self._checked != self.generation:
            self._checked = self.generation
            self.checkpointer.finish_checkpoint(self.conn)

    def close(self) -> None:
        self._close_files()

    def _close_files(self) -> None:
        # The checkpoint thread's connection first: SQLite checkpoints and removes
        # the WAL when the last connection closes, which should be the loop's.
        if isinstance(self.checkpointer, WalCheckpointer):
            self.checkpointer.close()
        self.db.close()
        # Our own descriptors of the log's files only after SQLite's: closing one
        # drops every POSIX lock this process holds on that file, SQLite's
        # included (broker/durability.py).
        if self.syncer is not None:
            self.syncer.close()
        if self._wal_index is not None:
            self._wal_index.close()
        self._owner.close()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """One transaction: every write of one broker loop turn commits together."""
        if self.conn.in_transaction:
            raise RuntimeError("a transaction is already open: turns do not nest")
        if self.syncer is not None and self.syncer.error is not None:
            # One failed sync is final (WalSyncer): commit nothing more, or a turn's
            # TASKs would leave before its sync failed in turn.
            raise _sync_failed(self.syncer.error)
        changes = self.conn.total_changes
        reserved = self._reserved
        try:
            with self.db.atomic():
                yield
        except BaseException:
            self._reserved = reserved  # its counter rolled back with the rest
            raise
        if self.conn.total_changes != changes:
            self.generation += 1

    # ------------------------------------------------------------ writes

    def find_request(self, client: str, seq: int) -> list[int] | None:
        """The ids answered to an earlier copy of this (client, seq) request."""
        row = self.conn.execute(
            "SELECT ids FROM requests WHERE client = ? AND seq = ?", (client, seq)
        ).fetchone()
        return None if row is None else list(msgpack.unpackb(row[0]))

    def remember_request(self, client: str, seq: int, ids: Sequence[int], now: float) -> None:
        self.conn.execute(
            "INSERT INTO requests (client, seq, ids, at) VALUES (?, ?, ?, ?)",
            (client, seq, msgpack.packb(list(ids)), now),
        )

    def find_idempotency_keys(self, keys: Iterable[str]) -> dict[str, int]:
        found = {}
        for key in keys:
            row = self.conn.execute(
                "SELECT id FROM tasks WHERE idempotency_key = ?", (key,)
            ).fetchone()
            if row:
                found[key] = row[0]
        return found

    def insert_tasks(self, rows: Sequence[tuple[Any, ...]], now: float) -> None:
        """rows: (id, name, payload, key, max_attempts, client, seq, idx, idempotency_key)."""
        self._write_rows(_INSERT_TASKS_MANY, _INSERT_TASK, [(*row, now, now) for row in rows])
        self._events([row[0] for row in rows], "submitted", 0, None, now)

    def allocate_id(self) -> int:
        """The next task id, from memory: the broker is the only writer.

        Ids are reserved in the log ID_BLOCK at a time before one is given out.
        A TASK may leave between a commit and its sync, and a power loss can then
        undo the task's row; without the reservation, max(id) + 1 would give the
        id a worker has seen to another task, and task code that keys work on
        ctx.task_id would take one task's work for the other's.
        """
        task_id = self.next_id
        if task_id > self._reserved:
            self._reserved = task_id + ID_BLOCK - 1
            self.conn.execute(_RAISE_COUNTER, (HIGHEST_TASK_ID, self._reserved))
            self.ids_not_synced = True
            if not self.conn.in_transaction:
                self.generation += 1  # committed on its own (outside a turn): sync it too
        self.next_id += 1
        return task_id

    def release_ids(self) -> None:
        """At a clean stop: give back the ids of the block not given out, so that
        the next broker goes on from the last id (after a crash it skips them)."""
        with self.turn():
            self.conn.execute(_SET_COUNTER, (HIGHEST_TASK_ID, self.next_id - 1))
        self._reserved = self.next_id - 1
        self.sync()

    def lease(self, leases: Sequence[tuple[int, int, str]], now: float) -> None:
        """leases: (task id, attempt, worker), each task at most once.

        Rows are grouped by (attempt, worker), not applied in their order, so a
        second lease of one task in the same call could be overwritten by the first.
        """
        for (attempt, worker), ids in _by_attempt_and_worker(leases).items():
            self._per_id(_LEASE, _LEASE_MANY, (attempt, worker, now), ids)
            self._events(ids, "leased", attempt, worker, now)

    def requeue(
        self,
        task_id: int,
        attempt: int,
        worker: str | None,
        reason: str,
        now: float,
        *,
        spared: bool = False,
    ) -> None:
        """Queued again; `spared`: this attempt does not count against max_attempts."""
        self.conn.execute(_REQUEUE, (reason, now, int(spared), task_id))
        self.conn.execute(_INSERT_EVENT, (task_id, now, "retried", attempt, worker, reason))

    def finish(
        self,
        task_id: int,
        attempt: int,
        worker: str | None,
        state: str,
        result: bytes | None,
        error: str | None,
        now: float,
    ) -> None:
        """Move a task to a final state; the attempt check makes a late writer harmless."""
        if state not in FINAL_STATES:
            raise ValueError(f"{state} is not a final state")
        self.conn.execute(_FINISH, (state, result, error, now, task_id, attempt))
        self.conn.execute(_INSERT_EVENT, (task_id, now, state, attempt, worker, error))

    def finish_many(self, rows: Sequence[tuple[int, int, str, bytes | None]], now: float) -> None:
        """Successful results in bulk: (task id, attempt, worker, result), each task once."""
        successes = [(i, a, r) for i, a, _w, r in rows]
        self._write_rows(_SUCCEED_MANY, _SUCCEED_ONE, successes, (now,))
        for (attempt, worker), ids in _by_attempt_and_worker(rows).items():
            self._events(ids, "succeeded", attempt, worker, now)

    def _write_rows(
        self, many: str, one: str, rows: Sequence[tuple[Any, ...]], shared: tuple[Any, ...] = ()
    ) -> None:
        """`rows` _ROWS_PER_STATEMENT at a time through `many`, which takes them as rows
        of VALUES, and the rest through `one`, row by row. `shared`: parameters before
        the rows' own, in both forms."""
        whole = len(rows) - len(rows) % _ROWS_PER_STATEMENT
        for start in range(0, whole, _ROWS_PER_STATEMENT):
            chunk = rows[start : start + _ROWS_PER_STATEMENT]
            self.conn.execute(many, [*shared, *itertools.chain.from_iterable(chunk)])
        if whole < len(rows):
            rest = rows[whole:]
            self.conn.executemany(one, [(*shared, *r) for r in rest] if shared else rest)

    def _per_id(self, one: str, many: str, shared: tuple[Any, ...], ids: list[int]) -> None:
        """One change for each of `ids`: `many` once, which takes them as a JSON array,
        or for a few `one` per id. Both take the `shared` parameters, then the id(s)."""
        if len(ids) < _FEW:
            self.conn.executemany(one, [(*shared, i) for i in ids])
        else:
            self.conn.execute(many, (*shared, json.dumps(ids)))

    def _events(
        self, task_ids: list[int], kind: str, attempt: int, worker: str | None, now: float
    ) -> None:
        """The same event for many tasks."""
        shared = (now, kind, attempt, worker)
        self._per_id(_INSERT_EVENT_LAST_ID, _INSERT_EVENTS, shared, task_ids)

    def cancel(self, rows: Sequence[tuple[int, int, str | None]], reason: str, now: float) -> None:
        """Queued or running tasks to `cancelled`, final: (task id, attempt, worker)."""
        self.conn.executemany(_CANCEL, [(reason, now, i) for i, _a, _w in rows])
        self.conn.executemany(
            _INSERT_EVENT, [(i, now, CANCELLED, a, w, reason) for i, a, w in rows]
        )

    def prune(
        self,
        before: float,
        states: Collection[str],
        after_id: int,
        scan: int,
        client_prefix: str | None = None,
    ) -> tuple[Counter[str], int | None]:
        """Delete the tasks among the `scan` after `after_id` that reached one of
        `states` (final ones only) before `before`, with their events, and the
        record of a SUBMIT once no task it made is left; with `client_prefix`, only
        tasks whose submitter starts with it.

        Returns the count deleted by state, and the id to go on after (None once
        the scan reached the last task).
        """
        if not set(states) <= FINAL_STATES:
            raise ValueError(f"only final states can be pruned, not {set(states) - FINAL_STATES}")
        rows = self.conn.execute(
            "SELECT id, state, updated_at, client, client_seq FROM tasks"
            " WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, scan),
        ).fetchall()
        go_on = rows[-1][0] if len(rows) == scan else None
        doomed = [
            row
            for row in rows
            if row[1] in states
            and row[2] < before
            and (client_prefix is None or (row[3] or "").startswith(client_prefix))
        ]
        deleted: Counter[str] = Counter(row[1] for row in doomed)
        if not doomed:
            return deleted, go_on
        ids = json.dumps([row[0] for row in doomed])
        self.conn.execute(_PRUNE_EVENTS, (ids,))
        self.conn.execute(_PRUNE_TASKS, (ids,))
        self._prune_requests({(row[3], row[4]) for row in doomed if row[3] is not None})
        return deleted, go_on

    def _prune_requests(self, keys: set[tuple[str, int]]) -> None:
        """Delete the records of these SUBMITs (client, seq) that made no task left:
        while one made by a SUBMIT remains, a resend of it must still get its ids."""
        records = self.conn.execute(_REQUESTS_OF, (json.dumps(sorted(keys)),)).fetchall()
        named = sorted({i for _, _, ids in records for i in msgpack.unpackb(ids)})
        left = self.conn.execute(_SUBMITTERS_OF, (json.dumps(named),)).fetchall()
        live = {(client, seq) for client, seq in left}
        self.conn.executemany(_PRUNE_REQUEST, [r[:2] for r in records if r[:2] not in live])

    def _counter(self, name: str) -> int:
        row = self.conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return 0 if row is None else int(row[0])

    def checkpoints(self, rows: Sequence[tuple[int, int, str, int, bytes]], now: float) -> None:
        """Checkpoints in bulk, in order: (task id, attempt, worker, number, state)."""
        self.conn.executemany(_CHECKPOINT, [(s, n, now, i, a, n) for i, a, _w, n, s in rows])
        self.conn.executemany(
            _INSERT_EVENT,
            [(i, now, "checkpointed", a, w, f"checkpoint {n}") for i, a, w, n, _s in rows],
        )

    def event(
        self,
        task_id: int,
        kind: str,
        attempt: int,
        worker: str | None,
        detail: str | None,
        now: float,
    ) -> None:
        self.conn.execute(_INSERT_EVENT, (task_id, now, kind, attempt, worker, detail))

    def remember_names(self, names: dict[str, int], now: float) -> None:
        self.conn.executemany(
            "INSERT INTO task_names (name, max_attempts, first_seen, last_seen)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
            " max_attempts = excluded.max_attempts, last_seen = excluded.last_seen",
            [(name, m, now, now) for name, m in names.items()],
        )

    # ------------------------------------------------------------ reads

    def known_names(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT name, max_attempts FROM task_names").fetchall())

    def running(self) -> list[tuple[Any, ...]]:
        """Running tasks as tuples of JOB_COLUMNS, then the worker holding the lease."""
        return self.conn.execute(
            f"SELECT {JOB_COLUMNS}, worker FROM tasks WHERE state = ?", (RUNNING,)
        ).fetchall()

    def queued(self, after_id: int, limit: int) -> list[tuple[Any, ...]]:
        """Queued tasks after `after_id` in id order, as plain tuples of JOB_COLUMNS.

        Tuples, not Rows: the broker reads every task back this way once the
        queue outgrows its window, and it is on the throughput path.
        """
        return self.conn.execute(
            f"SELECT {JOB_COLUMNS} FROM tasks WHERE state = ? AND id > ? ORDER BY id LIMIT ?",
            (QUEUED, after_id, limit),
        ).fetchall()

    def views(self, ids: Sequence[int]) -> dict[int, Row]:
        return self._by_id(VIEW_COLUMNS, ids)

    def owners(self, ids: Sequence[int]) -> dict[int, Row]:
        """State, attempt and submitter (`client`) of each task that exists."""
        return self._by_id("id, state, attempt, client", ids)

    def _by_id(self, columns: str, ids: Sequence[int]) -> dict[int, Row]:
        """Rows of the tasks that exist among `ids`, by id; `columns` must include id."""
        found: dict[int, Row] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._rows(f"SELECT {columns} FROM tasks WHERE id IN ({marks})", chunk):
                found[row["id"]] = row
        return found

    def outcome(self, task_id: int) -> Row | None:
        rows = self._rows(
            "SELECT state, attempt, worker, checkpoint_no FROM tasks WHERE id = ?", (task_id,)
        )
        return rows[0] if rows else None

    def list_tasks(
        self,
        state: str | None,
        name: str | None,
        limit: int,
        before_id: int | None,
        *,
        results: bool = True,
    ) -> list[Row]:
        """Views of tasks newest first; `results` False reads every result as NULL."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("state", state), ("name", name)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if before_id is not None:
            where.append("id < ?")
            params.append(before_id)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        columns = VIEW_COLUMNS if results else VIEW_COLUMNS_NO_RESULT
        return self._rows(
            f"SELECT {columns} FROM tasks{clause} ORDER BY id DESC LIMIT ?", (*params, limit)
        )

    def history(self, task_id: int, after: int = 0, limit: int = -1) -> list[Row]:
        """A task's events numbered above `after` (`n`, the log order), at most `limit`."""
        return self._rows(
            "SELECT id AS n, at, kind, attempt, worker, detail FROM events"
            " WHERE task_id = ? AND id > ? ORDER BY id LIMIT ?",
            (task_id, after, limit),
        )

    def count_by_state(self) -> dict[str, int]:
        return dict(
            self.conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall()
        )

    def _rows(self, sql: str, params: Sequence[Any]) -> list[Row]:
        cursor = self.conn.execute(sql, params)
        cursor.row_factory = sqlite3.Row
        return cursor.fetchall()


def _sync_failed(error: OSError) -> sqlite3.OperationalError:
    return sqlite3.OperationalError(f"fsync of the task log failed: {error}")


def _by_attempt_and_worker(rows: Iterable[Sequence[Any]]) -> dict[Any, list[int]]:
    """Task ids by (attempt, worker), from rows that begin (task id, attempt, worker)."""
    groups: defaultdict[Any, list[int]] = defaultdict(list)
    for row in rows:
        groups[row[1:3]].append(row[0])
    return groups


def _require_features() -> None:
    """The bulk writes use UPDATE ... FROM (SQLite 3.33) and json_each (built in
    since 3.38, compiled in by most distributions before): refuse to start without."""
    missing = None
    if sqlite3.sqlite_version_info < (3, 33, 0):
        missing = "UPDATE ... FROM needs 3.33"
    else:
        with contextlib.closing(sqlite3.connect(":memory:")) as probe:
            try:
                probe.execute("SELECT count(*) FROM json_each('[1]')").fetchone()
            except sqlite3.OperationalError as e:
                missing = f"no JSON functions: {e}"
    if missing is not None:
        raise sqlite3.NotSupportedError(
            "taskring needs SQLite 3.33 or later with its JSON functions;"
            f" this Python's SQLite is {sqlite3.sqlite_version} ({missing})"
        )
