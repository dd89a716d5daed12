"""The task log on its own: schema, pragmas and the guards in its SQL."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time

import pytest

from taskring.broker import checkpointer
from taskring.broker.jobs import Job
from taskring.broker.ownership import LogInUse, LogLock
from taskring.broker.store import ID_BLOCK, Store
from taskring.broker.walindex import WalIndex
from taskring.protocol import FINAL_STATES


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "t.db", synchronous="full")
    yield s
    s.close()


def add_task(store: Store, name: str = "t.add") -> int:
    with store.turn():  # ids are given out inside a turn, as the broker does
        task_id = store.allocate_id()
        store.insert_tasks([(task_id, name, b"\x92\x90\x80", None, 3, "c", 1, 0, None)], 1.0)
    return task_id


def test_new_log_is_wal_owner_only_and_migrated_once(tmp_path):
    path = tmp_path / "t.db"
    Store(path).close()
    again = Store(path)  # applying migrations twice must be harmless
    assert again.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # NORMAL in SQLite: with "full" the WAL is synced by the store's own thread
    assert again.conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    assert again.syncer is not None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    applied = again.conn.execute("SELECT name FROM _sqlite_migrations").fetchall()
    assert [name for (name,) in applied] == [
        "m001_tasks_and_events",
        "m002_spared_attempts",
        "m003_highest_task_id",
    ]
    again.close()


def test_a_log_from_before_spared_attempts_is_migrated_and_keeps_its_tasks(tmp_path):
    # Given a log with a queued task, migrated only up to m001
    path = tmp_path / "t.db"
    store = Store(path)
    task_id = add_task(store)
    store.conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm002_spared_attempts'")
    store.conn.execute("ALTER TABLE tasks DROP COLUMN spared")
    store.close()
    # When a broker opens it
    again = Store(path)
    # Then its task is still queued, with no attempt spared
    (job,) = again.queued(0, 10)
    assert (job[0], job[-1]) == (task_id, 0)
    again.close()


def test_a_spared_requeue_is_counted_in_the_log(store):
    # Given a leased task, When it is queued again twice, once spared
    task_id = add_task(store)
    with store.turn():
        store.lease([(task_id, 1, "w1")], 2.0)
        store.requeue(task_id, 1, "w1", "worker lost", 3.0, spared=True)
        store.lease([(task_id, 2, "w1")], 4.0)
        store.requeue(task_id, 2, "w1", "worker lost", 5.0)
    # Then the job read back has attempt 2, one of them spared
    (job,) = [Job(*row) for row in store.queued(0, 10)]
    assert (job.attempt, job.spared) == (2, 1)


def test_full_commits_are_numbered_and_become_durable_through_an_fsync_of_the_wal(
    tmp_path, monkeypatch
):
    # Given a store whose WAL syncs are recorded
    synced_inodes: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced_inodes.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr("taskring.broker.durability._datasync", recording_fsync)
    s = Store(tmp_path / "t.db", synchronous="full")
    assert s.syncer is not None
    # When a turn writes, and another writes nothing
    add_task(s)
    with s.turn():
        s.queued(0, 10)
    # Then only the writing turn is a new generation, and it becomes durable
    # through an fsync of the WAL file itself
    assert s.generation == 1 and s.syncer.synced == 0
    synced_inodes.clear()
    s.sync()
    assert s.syncer.synced == 1
    assert synced_inodes == [os.stat(tmp_path / "t.db-wal").st_ino]
    # And a sync with no commit since the last one does not touch the disk
    s.sync()
    assert len(synced_inodes) == 1
    s.close()


def test_a_refused_sync_is_a_database_error(tmp_path, monkeypatch):
    s = Store(tmp_path / "t.db", synchronous="full")
    add_task(s)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("taskring.broker.durability._datasync", failing)
    with pytest.raises(sqlite3.OperationalError, match="fsync of the task log failed"):
        s.sync()
    assert s.syncer is not None and s.syncer.synced == 0
    # And it stays refused though the disk answers again: after a failed fsync the
    # kernel may have dropped the pages, and a later fsync can report success
    monkeypatch.setattr("taskring.broker.durability._datasync", lambda fd: None)
    with pytest.raises(sqlite3.OperationalError, match="Input/output error"):
        s.sync()
    assert s.syncer is not None and s.syncer.synced == 0
    s.close()


def test_a_full_store_syncs_what_an_earlier_process_left_before_serving(tmp_path, monkeypatch):
    # Given a log whose last commits were made without a sync (a broker killed before it)
    s = Store(tmp_path / "t.db", synchronous="normal")
    add_task(s)
    s.close()
    # When a full-durability store opens it
    synced: list[int] = []
    monkeypatch.setattr("taskring.broker.durability._datasync", lambda fd: synced.append(fd))
    s = Store(tmp_path / "t.db", synchronous="full")
    # Then the WAL was synced before the store could answer anything from it
    assert len(synced) == 1 and s.generation == 0
    s.close()


def test_a_full_store_finds_the_wal_of_a_database_reached_through_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link.db").symlink_to(tmp_path / "real" / "t.db")
    s = Store(tmp_path / "link.db", synchronous="full")
    add_task(s)
    s.sync()
    assert s.syncer is not None and s.syncer.synced == s.generation == 1
    assert (tmp_path / "real" / "t.db-wal").exists()
    s.close()


def test_normal_commits_are_never_synced(tmp_path, monkeypatch):
    synced: list[int] = []
    monkeypatch.setattr("taskring.broker.durability._datasync", synced.append)
    s = Store(tmp_path / "t.db", synchronous="normal")
    add_task(s)
    s.sync()
    assert s.syncer is None and s.generation == 1 and synced == []
    s.close()


def wal_frames(store: Store) -> int:
    """Frames the WAL file has room for: its high-water mark, not its current length."""
    return (os.path.getsize(f"{store.path}-wal") - 32) // (4096 + 24)


def write_big_tasks(s: Store, turns: int, payload: bytes, *, finish: bool = True) -> None:
    """One 4 KB task per turn, each turn followed by what the broker does after its sends
    (unless `finish` is False: then no checkpoint follows the turns yet)."""
    for _ in range(turns):
        task_id = s.allocate_id()
        with s.turn():
            s.insert_tasks([(task_id, "t.big", payload, None, 3, "c", task_id, 0, None)], 1.0)
        if finish:
            s.finish_checkpoint()


def test_a_full_store_checkpoints_between_turns_not_in_a_commit(tmp_path):
    # Given a full log, whose own connection checkpoints in a commit only as a fallback
    s = Store(tmp_path / "t.db", synchronous="full")
    assert isinstance(s.checkpointer, checkpointer.TurnEndCheckpointer)
    fallback = s.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    assert fallback == checkpointer.FALLBACK_FRAMES == 16_000
    # When 2,000 turns each write a task of 4 KB (about 12,000 WAL frames in all)
    payload = os.urandom(4000)
    write_big_tasks(s, 2000, payload)
    # Then the loop copied them into the database between turns, often enough that
    # the WAL started over near SQLite's usual length (not at the fallback's)
    assert os.path.getsize(tmp_path / "t.db") > 1000 * len(payload)
    assert wal_frames(s) < checkpointer.TURN_END_FRAMES + 100
    s.close()
    db = sqlite3.connect(tmp_path / "t.db")
    assert db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 2000
    db.close()


class CountingConnection:
    """The loop's connection, counting the checkpoints it is asked to run."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.checkpoints = 0

    def execute(self, sql: str) -> sqlite3.Cursor:
        self.checkpoints += "wal_checkpoint" in sql
        return self.conn.execute(sql)


def test_a_turn_end_checkpoint_blocked_by_a_reader_is_not_retried_every_turn(tmp_path, monkeypatch):
    # Given a full log with a reader holding an old snapshot open (a sqlite3 shell,
    # say), so no checkpoint may copy the frames written after it
    monkeypatch.setattr(checkpointer, "BLOCKED_RETRY_S", 3600.0)
    s = Store(tmp_path / "t.db", synchronous="full")
    add_task(s)
    reader = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM tasks").fetchone()
    # and over 1,000 frames written since, in turns no checkpoint followed yet
    write_big_tasks(s, 550, os.urandom(4000), finish=False)
    assert isinstance(s.checkpointer, checkpointer.TurnEndCheckpointer)
    index = s.checkpointer._index
    assert index.uncopied_frames() > checkpointer.TURN_END_FRAMES
    counting = CountingConnection(s.conn)
    # When the loop finishes 50 turns
    for _ in range(50):
        add_task(s)
        s.checkpointer.finish_checkpoint(counting)  # type: ignore[arg-type]
    # Then it tried once, not once per turn, and could copy nothing past the reader
    assert counting.checkpoints == 1
    assert index.uncopied_frames() > checkpointer.TURN_END_FRAMES
    # And once the reader is gone and the retry is due, the next turn copies everything
    reader.execute("COMMIT")
    reader.close()
    s.checkpointer._retry_at = 0.0
    add_task(s)
    s.checkpointer.finish_checkpoint(counting)  # type: ignore[arg-type]
    assert counting.checkpoints == 2
    assert index.uncopied_frames() == 0
    s.close()


class FailingConnection:
    def execute(self, sql: str) -> sqlite3.Cursor:
        raise sqlite3.OperationalError("disk I/O error")


def test_a_failed_turn_end_checkpoint_is_logged_and_tried_again_later(tmp_path, caplog):
    # Given a full log with 1,000 frames to copy, and a disk that fails the copy
    s = Store(tmp_path / "t.db", synchronous="full")
    write_big_tasks(s, 500, os.urandom(4000), finish=False)
    assert isinstance(s.checkpointer, checkpointer.TurnEndCheckpointer)
    # When the loop finishes a turn, then another at once
    s.checkpointer.finish_checkpoint(FailingConnection())  # type: ignore[arg-type]
    s.checkpointer.finish_checkpoint(s.conn)
    # Then the failure is a warning, not the loop's end, and the next try waits
    assert "WAL checkpoint failed: disk I/O error" in caplog.text
    assert s.checkpointer._index.uncopied_frames() >= checkpointer.TURN_END_FRAMES
    # And once it is due, the copy is done
    s.checkpointer._retry_at = 0.0
    s.checkpointer.finish_checkpoint(s.conn)
    assert s.checkpointer._index.uncopied_frames() == 0
    s.close()


def test_a_full_store_without_a_readable_wal_index_checkpoints_as_sqlite_does(
    tmp_path, monkeypatch, caplog
):
    # Given a SQLite that keeps its wal-index in memory: no -shm file to read
    def no_shm(path: str) -> WalIndex:
        raise FileNotFoundError(f"{path}-shm")

    monkeypatch.setattr("taskring.broker.store.WalIndex", no_shm)
    # When a full log opens
    s = Store(tmp_path / "t.db", synchronous="full")
    # Then it serves, and SQLite checkpoints in its commits as by default
    assert s.checkpointer is None
    assert s.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    assert "WAL length unreadable" in caplog.text
    add_task(s)
    s.finish_checkpoint()
    s.close()


def test_a_normal_store_checkpoints_from_a_thread_and_its_wal_starts_over(tmp_path, monkeypatch):
    # Given a normal log whose WAL counts as long at 100 frames, checkpointed every 5 ms
    monkeypatch.setattr(checkpointer, "BUSY_INTERVAL_S", 0.005)
    monkeypatch.setattr(checkpointer, "LONG_WAL_FRAMES", 100)
    s = Store(tmp_path / "t.db", synchronous="normal")
    assert isinstance(s.checkpointer, checkpointer.WalCheckpointer)
    # whose own connection checkpoints in a commit only as a fallback, at 64 MB
    fallback = s.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    assert fallback == checkpointer.FALLBACK_FRAMES == 16_000
    # When 2,000 turns each write a task of 4 KB (about 12,000 WAL frames in all)
    write_big_tasks(s, 2000, os.urandom(4000))
    # Then checkpoints copied the tasks into the database file while the log was open,
    # and the loop finished them often enough that the WAL started over instead of
    # growing by every frame written
    assert os.path.getsize(tmp_path / "t.db") > 4_000_000
    assert wal_frames(s) < 4000
    thread = s.checkpointer._thread
    s.close()
    # And close() stopped the thread; the log holds every task
    assert not thread.is_alive()
    db = sqlite3.connect(tmp_path / "t.db")
    assert db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 2000
    db.close()


def test_bad_synchronous_setting_is_refused(tmp_path):
    with pytest.raises(ValueError, match="synchronous"):
        Store(tmp_path / "t.db", synchronous="off")


def test_ids_continue_after_a_clean_stop_and_skip_the_reserved_block_after_a_crash(tmp_path):
    # Given a log whose first task took id 1, and with it a block of ids
    s = Store(tmp_path / "t.db")
    first = add_task(s)
    assert s.conn.execute("SELECT value FROM counters").fetchall() == [(ID_BLOCK,)]
    # When the broker stops without giving the block back, as a crash does
    s.close()
    s = Store(tmp_path / "t.db")
    # Then the next one starts after the block: an id a worker may have seen is not reused
    last = add_task(s)
    assert (first, last) == (1, ID_BLOCK + 1)
    # When it stops cleanly instead, giving back what it did not use
    s.release_ids()
    s.close()
    # Then the next broker goes on from the last id given out
    s = Store(tmp_path / "t.db")
    assert s.allocate_id() == last + 1
    s.close()


def test_a_reserved_block_of_ids_is_flagged_until_synced_and_a_rollback_reserves_again(store):
    def allocate(n: int) -> bool:
        """Ids given out in a turn; whether TASKs must then wait for the sync."""
        with store.turn():
            for _ in range(n):
                store.allocate_id()
        flagged = store.ids_not_synced
        store.sync()
        assert not store.ids_not_synced
        return flagged

    # The first id reserves a block; the rest of the block needs no write
    assert allocate(1) is True
    assert allocate(ID_BLOCK - 1) is False
    # A turn that crosses into the next block and is rolled back leaves no reservation
    with pytest.raises(RuntimeError), store.turn():
        store.allocate_id()
        raise RuntimeError("crash before commit")
    assert store.conn.execute("SELECT value FROM counters").fetchall() == [(ID_BLOCK,)]
    # So the next turn writes it again, and says so
    assert allocate(1) is True
    assert store.conn.execute("SELECT value FROM counters").fetchall() == [(ID_BLOCK * 2 + 1,)]


def test_a_block_reserved_outside_a_turn_is_flagged_until_a_sync_that_covers_it(tmp_path):
    # Given a full store that gives out an id outside any turn (committed on its own)
    s = Store(tmp_path / "t.db", synchronous="full")
    assert s.syncer is not None
    s.allocate_id()
    # When a turn that reserves nothing commits, Then its TASKs must still wait
    with s.turn():
        s.allocate_id()
    assert s.ids_not_synced
    # And the sync that clears the flag did sync the reservation's commit
    synced = s.syncer.synced
    s.sync()
    assert not s.ids_not_synced and s.syncer.synced == s.generation > synced
    s.close()


def test_a_log_without_a_counter_gets_one_at_its_highest_id(tmp_path):
    # Given a log whose counter row is missing (from before m003, or left behind by
    # a broker that counted only what it pruned), with tasks 1 to 3 that ended
    s = Store(tmp_path / "t.db")
    ids = [task_in(s, "succeeded", 1.0) for _ in range(3)]
    s.conn.execute("DELETE FROM counters")
    s.close()
    # When a broker opens it, prunes all three, and is killed (no clean stop)
    s = Store(tmp_path / "t.db")
    with s.turn():
        assert s.prune(50.0, FINAL_STATES, 0, 100)[0].total() == 3
    s.close()
    # Then the next broker never gives out ids 1 to 3 again
    s = Store(tmp_path / "t.db")
    assert s.allocate_id() > ids[-1]
    s.close()


def test_after_a_failed_sync_no_turn_commits_again(tmp_path, monkeypatch):
    # Given a full store whose WAL sync failed once
    s = Store(tmp_path / "t.db", synchronous="full")
    first = add_task(s)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("taskring.broker.durability._datasync", failing)
    with pytest.raises(sqlite3.OperationalError, match="fsync of the task log failed"):
        s.sync()
    # When another turn begins, Then it is refused before it writes anything
    with pytest.raises(sqlite3.OperationalError, match="fsync of the task log failed"):
        add_task(s)
    assert sorted(s.views(range(1, 5))) == [first]
    monkeypatch.undo()
    s.close()


def test_a_rolled_back_turn_leaves_nothing(store):
    task_id = store.allocate_id()
    with pytest.raises(RuntimeError), store.turn():
        store.insert_tasks([(task_id, "t.add", b"", None, 3, "c", 1, 0, None)], 1.0)
        raise RuntimeError("crash before commit")
    assert store.views([task_id]) == {}
    assert store.history(task_id) == []


def test_finish_is_fenced_by_attempt(store):
    task_id = add_task(store)
    with store.turn():
        store.lease([(task_id, 2, "w1")], 2.0)
        store.finish(task_id, 1, "w0", "succeeded", b"\x01", None, 3.0)  # a stale attempt
    assert store.views([task_id])[task_id]["state"] == "running"
    with store.turn():
        store.finish(task_id, 2, "w1", "succeeded", b"\x01", None, 3.0)
    assert store.views([task_id])[task_id]["state"] == "succeeded"


def test_bulk_leases_and_results_keep_each_tasks_own_attempt_worker_and_result(store):
    # Given six queued tasks
    ids = [add_task(store) for _ in range(6)]
    a, b, c, d, e, f = ids
    # When they are leased in one call to two workers, at different attempts
    with store.turn():
        store.lease([(a, 1, "w1"), (b, 1, "w2"), (c, 2, "w1"), (d, 1, "w1"), (e, 1, "w2")], 2.0)
        store.lease([(f, 1, "w1")], 2.0)
    # And finish in one call: two share a result, two have their own, one is
    # from a superseded attempt, and one never reports
    with store.turn():
        results = [(a, 1, "w1", b"same"), (b, 1, "w2", b"same"), (c, 2, "w1", b"c")]
        store.finish_many([*results, (d, 1, "w1", b"d"), (e, 9, "w2", b"late")], 3.0)
    # Then each task has exactly what its own row said
    views = store.views(ids)
    got = {i: (v["state"], v["attempt"], v["worker"], v["result"]) for i, v in views.items()}
    assert got == {
        a: ("succeeded", 1, "w1", b"same"),
        b: ("succeeded", 1, "w2", b"same"),
        c: ("succeeded", 2, "w1", b"c"),
        d: ("succeeded", 1, "w1", b"d"),
        e: ("running", 1, "w2", None),
        f: ("running", 1, "w1", None),
    }
    # And its history one event per change, in order, with the attempt and worker
    history = {i: [(h["kind"], h["attempt"], h["worker"]) for h in store.history(i)] for i in ids}
    assert history[c] == [("submitted", 0, None), ("leased", 2, "w1"), ("succeeded", 2, "w1")]
    assert history[b] == [("submitted", 0, None), ("leased", 1, "w2"), ("succeeded", 1, "w2")]
    assert history[f] == [("submitted", 0, None), ("leased", 1, "w1")]


def test_many_tasks_inserted_in_one_call_each_keep_their_own_fields(store):
    # Given 70 new tasks, more than one statement's worth, each with its own fields
    ids = [store.allocate_id() for _ in range(70)]
    rows = [
        (i, f"t.{i % 3}", b"p%d" % i, f"k{i}" if i % 2 else None, i % 5 + 1, "c", 4, n, f"o{i}")
        for n, i in enumerate(ids)
    ]
    # When they are inserted in one call
    with store.turn():
        store.insert_tasks(rows, 1.0)
    # Then each row reads back as it was given, queued, in id order
    queued = store.queued(0, 100)
    assert [(*job[:4], job[5]) for job in queued] == [row[:5] for row in rows]
    assert store.find_idempotency_keys([f"o{i}" for i in ids]) == {f"o{i}": i for i in ids}
    assert [h["kind"] for i in ids for h in store.history(i)] == ["submitted"] * 70


def test_many_results_in_one_call_each_reach_their_own_task_fenced_by_attempt(store):
    # Given 70 running tasks, more than one statement's worth of results
    ids = [add_task(store) for _ in range(70)]
    with store.turn():
        store.lease([(i, 1, "w1") for i in ids], 2.0)
    # When they finish in one call, every seventh from a superseded attempt
    with store.turn():
        store.finish_many([(i, 1 if i % 7 else 2, "w1", b"r%d" % i) for i in ids], 3.0)
    # Then each task that finished holds its own result, and the others still run
    views = store.views(ids)
    for i in ids:
        expected = ("succeeded", b"r%d" % i) if i % 7 else ("running", None)
        assert (views[i]["state"], views[i]["result"]) == expected, i


def test_a_sqlite_without_json_functions_is_refused_with_its_version(tmp_path, monkeypatch):
    class NoJson:
        def execute(self, sql: str) -> None:
            raise sqlite3.OperationalError("no such table: json_each")

        def close(self) -> None:
            pass

    monkeypatch.setattr(sqlite3, "connect", lambda *args, **kwargs: NoJson())
    with pytest.raises(sqlite3.NotSupportedError, match=r"3\.33 or later.*no JSON functions"):
        Store(tmp_path / "t.db")
    assert not (tmp_path / "t.db").exists()


def test_a_sqlite_older_than_3_33_is_refused_before_the_log_is_touched(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(sqlite3.NotSupportedError, match=r"SQLite is 3\.31\.1 \(UPDATE"):
        Store(tmp_path / "t.db")
    assert not (tmp_path / "t.db").exists()


def test_checkpoint_never_goes_backwards(store):
    task_id = add_task(store)
    with store.turn():
        store.lease([(task_id, 1, "w1")], 2.0)
        store.checkpoints([(task_id, 1, "w1", 5, b"five"), (task_id, 1, "w1", 4, b"four")], 3.0)
    *fields, worker = store.running()[0]
    job = Job(*fields)
    assert (job.checkpoint, job.checkpoint_no, worker) == (b"five", 5, "w1")


def test_request_dedup_lookup_and_idempotency_keys(store):
    task_id = store.allocate_id()
    with store.turn():
        store.insert_tasks([(task_id, "t.add", b"", None, 3, "c-1", 9, 0, "order-7")], 1.0)
        store.remember_request("c-1", 9, [task_id], 1.0)
    assert store.find_request("c-1", 9) == [task_id]
    assert store.find_request("c-1", 10) is None
    assert store.find_idempotency_keys(["order-7", "order-8"]) == {"order-7": task_id}


def task_in(store: Store, state: str, at: float, client: str = "c-1") -> int:
    """A task submitted at 1.0 by `client` (a SUBMIT of its own), in `state` since `at`."""
    with store.turn():
        task_id = store.allocate_id()
        row = (task_id, "t.add", b"", None, 3, client, task_id, 0, f"idem-{task_id}")
        store.insert_tasks([row], 1.0)
        store.remember_request(client, task_id, [task_id], 1.0)
        if state != "queued":
            store.lease([(task_id, 1, "w1")], at)
        if state == "cancelled":
            store.cancel([(task_id, 1, "w1")], "cancelled by a client", at)
        elif state not in ("queued", "running"):
            store.finish(task_id, 1, "w1", state, None, None, at)
    return task_id


def test_prune_deletes_only_final_tasks_ended_before_the_cutoff_with_their_records(store):
    # Given a task in every state that ended (or last changed) at 10, and one that ended at 100
    old = {state: task_in(store, state, 10.0) for state in ("succeeded", "failed", "dead")}
    old["cancelled"] = task_in(store, "cancelled", 10.0)
    live = [task_in(store, "queued", 10.0), task_in(store, "running", 10.0)]
    recent = task_in(store, "succeeded", 100.0)
    # When the tasks that ended before 50 are pruned
    with store.turn():
        deleted, go_on = store.prune(50.0, FINAL_STATES, 0, 100)
    # Then exactly the four old final ones are gone, and the scan reached the end
    assert deleted == {"succeeded": 1, "failed": 1, "dead": 1, "cancelled": 1}
    assert go_on is None
    kept = sorted(store.views([*old.values(), *live, recent]))
    assert kept == sorted([*live, recent])
    # With their events, the records of their SUBMITs, and their idempotency keys
    for task_id in old.values():
        assert store.history(task_id) == []
        assert store.find_request("c-1", task_id) is None
    assert store.find_idempotency_keys([f"idem-{i}" for i in old.values()]) == {}
    for task_id in [*live, recent]:
        assert store.history(task_id) != []
        assert store.find_request("c-1", task_id) == [task_id]


def test_prune_goes_through_the_log_a_window_at_a_time(store):
    # Given five tasks that ended long ago, between two that still run
    running = task_in(store, "running", 1.0)
    ended = [task_in(store, "succeeded", 1.0) for _ in range(5)]
    last = task_in(store, "running", 1.0)
    # When pruned two tasks looked at per call, going on where each call stopped
    calls, after = [], 0
    while after is not None:
        with store.turn():
            deleted, go_on = store.prune(50.0, FINAL_STATES, after, 2)
        calls.append((deleted.total(), go_on))
        after = go_on
    # Then each call looked at the next two ids, and the last one, short, found the end
    assert calls == [(1, ended[0]), (2, ended[2]), (2, ended[4]), (0, None)]
    assert sorted(store.views([running, *ended, last])) == [running, last]


def test_a_submit_record_stays_while_a_task_it_made_is_left(store):
    # Given one SUBMIT that made two tasks: one failed long ago, one still queued
    first, second = store.allocate_id(), store.allocate_id()
    with store.turn():
        rows = [
            (i, "t.add", b"", None, 3, "c-1", 7, n, None) for n, i in enumerate((first, second))
        ]
        store.insert_tasks(rows, 1.0)
        store.remember_request("c-1", 7, [first, second], 1.0)
        store.lease([(first, 1, "w1")], 2.0)
        store.finish(first, 1, "w1", "failed", None, "boom", 2.0)
    # When the failed one is pruned, Then the record stays: a resend must not make
    # the queued task again
    with store.turn():
        assert store.prune(50.0, {"failed"}, 0, 100)[0] == {"failed": 1}
    assert store.find_request("c-1", 7) == [first, second]
    # When the other one ends and is pruned too, Then the record goes with it
    with store.turn():
        store.lease([(second, 1, "w1")], 3.0)
        store.finish(second, 1, "w1", "succeeded", None, None, 3.0)
        assert store.prune(50.0, FINAL_STATES, 0, 100)[0] == {"succeeded": 1}
    assert store.find_request("c-1", 7) is None


def test_prune_takes_only_the_states_asked_and_with_a_prefix_only_that_submitters(store):
    mine = [task_in(store, "succeeded", 1.0, "KEY/c-1"), task_in(store, "failed", 1.0, "KEY/c-1")]
    theirs = task_in(store, "succeeded", 1.0, "OTHER/c-2")
    with store.turn():
        deleted, _ = store.prune(50.0, {"succeeded"}, 0, 100, client_prefix="KEY/")
    assert deleted == {"succeeded": 1}
    assert sorted(store.views([*mine, theirs])) == [mine[1], theirs]


def test_prune_refuses_a_live_state(store):
    task_id = task_in(store, "running", 1.0)
    with pytest.raises(ValueError, match="only final states"), store.turn():
        store.prune(50.0, {"succeeded", "running"}, 0, 100)
    assert store.views([task_id])[task_id]["state"] == "running"


def test_ids_are_not_given_out_again_after_the_newest_tasks_are_pruned(tmp_path):
    # Given a log whose every task, the newest included, was pruned
    s = Store(tmp_path / "t.db")
    ids = [task_in(s, "succeeded", 1.0) for _ in range(3)]
    with s.turn():
        assert s.prune(50.0, FINAL_STATES, 0, 100)[0].total() == 3
    s.release_ids()  # a clean stop: the next broker goes on from the last id given
    s.close()
    # When a broker opens it again, Then the next id follows the last one ever given
    s = Store(tmp_path / "t.db")
    assert s.views(ids) == {}
    assert s.allocate_id() == ids[-1] + 1
    s.close()


def test_the_wal_index_counts_frames_as_sqlite_does(tmp_path):
    # Given a WAL-mode database that SQLite never checkpoints by itself
    path = str(tmp_path / "w.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (x BLOB)")
    index = WalIndex(path)
    # When 50 commits of 3 KB each are written
    for _ in range(50):
        conn.execute("INSERT INTO t VALUES (randomblob(3000))")
    # Then the frames left to copy are those a checkpoint then copies
    before = index.uncopied_frames()
    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and before == frames == copied > 50
    # And after it nothing is left; a write that starts the WAL over counts from 0
    assert index.uncopied_frames() == 0
    conn.execute("INSERT INTO t VALUES (1)")
    assert index.uncopied_frames() == 1
    index.close()
    conn.close()


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_a_wal_grown_long_is_cut_back_when_it_starts_over(tmp_path, monkeypatch, synchronous):
    # Given a log whose WAL is cut back to 1 MB, and a reader holding an old
    # snapshot open, so that no checkpoint can finish while 3 MB are written
    monkeypatch.setattr("taskring.broker.store.WAL_SIZE_LIMIT_BYTES", 1_000_000)
    s = Store(tmp_path / "t.db", synchronous=synchronous)
    add_task(s)
    reader = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM tasks").fetchone()
    write_big_tasks(s, 350, os.urandom(4000))
    wal = f"{s.path}-wal"
    assert os.path.getsize(wal) > 2_500_000
    # When the reader is gone and a checkpoint copies everything (in normal mode
    # the checkpoint thread may hold the checkpoint lock for a moment)
    reader.execute("COMMIT")
    reader.close()
    for _ in range(100):
        busy, frames, copied = s.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if busy == 0 and frames == copied:
            break
        time.sleep(0.01)
    assert busy == 0 and frames == copied
    # Then the write that starts the WAL over cuts the file back to the limit
    add_task(s)
    assert os.path.getsize(wal) <= 1_000_000
    s.close()


def open_and_close_elsewhere(path: str) -> int:
    """What a sqlite3 shell or a monitoring script does: open the live log, read, close."""
    code = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
        " print(c.execute('SELECT count(*) FROM tasks').fetchone()[0]); c.close()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, path], check=True, capture_output=True, text=True, timeout=30
    )
    return int(out.stdout)


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_another_process_closing_the_log_leaves_the_brokers_wal_alone(tmp_path, synchronous):
    # Given an open log with one task committed
    s = Store(tmp_path / "t.db", synchronous=synchronous)
    add_task(s)
    s.sync()
    # When another process opens the log, reads it and closes it
    assert open_and_close_elsewhere(s.path) == 1
    # Then it did not take itself for the last connection: SQLite's SHARED lock on
    # the database file still stood, so it neither checkpointed nor deleted the WAL
    # (a store that closed a descriptor of the file of its own had lost that lock)
    assert os.path.exists(f"{s.path}-wal")
    # And what the store commits and syncs from now on is in the log's WAL, where
    # a restart finds it, not in a deleted file
    add_task(s)
    s.sync()
    assert open_and_close_elsewhere(s.path) == 2
    s.close()


def test_a_log_that_is_not_a_database_is_refused_and_its_lock_let_go(tmp_path):
    # Given a file that is not a SQLite database where the log should be
    path = tmp_path / "t.db"
    path.write_bytes(b"not a database, " * 512)
    # When a store opens it, Then SQLite's refusal comes through
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        Store(path)
    # And the file is as it was, and the log's lock is free for the next broker
    assert path.read_bytes() == b"not a database, " * 512
    LogLock(str(path), wait_s=0).close()


def test_a_symbolic_link_in_place_of_the_lock_file_is_not_followed(tmp_path):
    # Given a symbolic link where the log's lock file goes, to a file of value
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    os.symlink(victim, tmp_path / "t.db.lock")
    # When a store opens the log, Then it refuses, and the file is untouched
    with pytest.raises(OSError):
        Store(tmp_path / "t.db")
    assert victim.read_text() == "keep me\n"


def test_a_lock_file_deleted_under_an_open_log_is_taken_again(tmp_path):
    # Given an open log, whose lock file a cleaner of old files then deletes
    s = Store(tmp_path / "t.db")
    lock = tmp_path / "t.db.lock"
    assert s.keep_ownership() is True
    lock.unlink()
    # When the store checks, as the broker does every second
    assert s.keep_ownership() is False
    # Then the file is back, held by this process: a second broker is refused
    assert lock.read_text() == f"{os.getpid()}\n"
    with pytest.raises(LogInUse):
        LogLock(str(tmp_path / "t.db"), wait_s=0)
    assert s.keep_ownership() is True
    s.close()


def test_a_store_whose_lock_file_another_broker_took_says_so(tmp_path):
    # Given an open log whose lock file was deleted, and a second broker that then
    # locked a new one at its path
    s = Store(tmp_path / "t.db")
    (tmp_path / "t.db.lock").unlink()
    other = LogLock(str(tmp_path / "t.db"), wait_s=0)
    # When the store checks, Then it learns that it no longer owns the log
    with pytest.raises(LogInUse, match=r"another broker took task log .* over"):
        s.keep_ownership()
    other.close()
    s.close()


def test_a_lock_taken_on_a_file_deleted_meanwhile_counts_for_nothing(tmp_path, monkeypatch):
    # Given an open log, and a second broker that opened its lock file and waits
    s = Store(tmp_path / "t.db")
    path = str(tmp_path / "t.db")
    old_file = os.open(path + ".lock", os.O_RDWR)
    # When the file is deleted, the first store takes a new one, and the second
    # broker's lock on the old file then succeeds (nobody holds that one any more)
    (tmp_path / "t.db.lock").unlink()
    assert s.keep_ownership() is False
    opened = iter([old_file])
    real_open = LogLock._open
    monkeypatch.setattr(LogLock, "_open", lambda self: next(opened, None) or real_open(self))
    # Then the second broker sees that it locked a file no longer at the path, tries
    # the one there now, and is refused
    with pytest.raises(LogInUse):
        LogLock(path, wait_s=0)
    s.close()


def test_after_a_failed_sync_the_next_start_copies_the_log_into_the_database_file(tmp_path):
    # Given a log as a broker killed after a failed sync leaves it: a commit still
    # only in the WAL (copied while the store is open, as a crash would leave it),
    # and the marker of the failed sync beside it
    s = Store(tmp_path / "t.db")
    add_task(s)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{s.path}{suffix}", crashed / f"t.db{suffix}")
    s.close()
    assert os.path.getsize(crashed / "t.db-wal") > 0
    (crashed / "t.db.sync-failed").write_text("1.0 [Errno 5] Input/output error\n")
    # When a store opens it
    again = Store(crashed / "t.db")
    # Then before anything else it copied the WAL into the database file and
    # emptied it: the database file alone has the task
    assert os.path.getsize(crashed / "t.db-wal") == 0
    assert not (crashed / "t.db.sync-failed").exists()
    alone = tmp_path / "alone.db"
    shutil.copyfile(crashed / "t.db", alone)
    again.close()
    conn = sqlite3.connect(alone)
    assert conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 1
    conn.close()


def test_a_failed_sync_does_not_write_its_marker_through_a_planted_link(tmp_path):
    # Given a symbolic link where a failed sync's marker goes, to a file of value
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    s = Store(tmp_path / "t.db")
    os.symlink(victim, tmp_path / "t.db.sync-failed")
    assert s.syncer is not None
    # When a sync fails
    s.syncer._leave_marker(OSError(5, "Input/output error"))
    # Then the file is untouched, and the link still counts at the next start
    assert victim.read_text() == "keep me\n"
    s.close()
    Store(tmp_path / "t.db").close()
    assert victim.read_text() == "keep me\n"


def test_the_wal_is_looked_at_only_after_a_turn_that_wrote(tmp_path, monkeypatch):
    # Given a full log, its checkpointer counting how often the loop asks it
    s = Store(tmp_path / "t.db", synchronous="full")
    asked: list[int] = []
    assert s.checkpointer is not None
    monkeypatch.setattr(s.checkpointer, "finish_checkpoint", lambda conn: asked.append(1))
    # When a turn writes, then the loop finishes two turns that wrote nothing
    add_task(s)
    s.finish_checkpoint()
    with s.turn():
        pass
    s.finish_checkpoint()
    s.finish_checkpoint()
    # Then only the turn that wrote made it look at the WAL
    assert asked == [1]
    add_task(s)
    s.finish_checkpoint()
    assert asked == [1, 1]
    s.close()
