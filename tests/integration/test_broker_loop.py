"""The broker's loop stepped by hand: real sockets in this process, a fake clock.

Each test drives `Broker.poll_once(now)` with DEALER peers that speak the
wire protocol directly, so every rule is checked at the frame level.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from taskring import protocol as p
from taskring.broker import Broker, BrokerSettings, ownership, server
from taskring.broker.store import ID_BLOCK

HEARTBEAT_S = 1.0
LIVENESS = 3


OPEN_PEERS: list[Peer] = []


class Peer:
    """A DEALER speaking taskring frames; recv fails with a sentence instead of hanging."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, identity: bytes, protocol: bytes):
        OPEN_PEERS.append(self)
        self.protocol = protocol
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.connect(endpoint)
        self.seq = 0

    def send(self, command: bytes, body: dict[str, Any]) -> None:
        self.socket.send_multipart(p.frames(self.protocol, command, body))

    def request(self, command: bytes, body: dict[str, Any]) -> int:
        self.seq += 1
        self.send(command, {"seq": self.seq, **body})
        return self.seq

    def recv(
        self, broker: Broker, now: float, timeout_s: float = 2.0
    ) -> tuple[bytes, dict[str, Any]]:
        """Step the broker until this peer has a message."""
        for _ in range(int(timeout_s / 0.02)):
            if self.socket.poll(0):
                return p.decode_reply(self.socket.recv_multipart(), self.protocol)
            broker.poll_once(now=now, timeout_s=0.02)
        raise AssertionError(f"no message reached {self.socket.getsockopt(zmq.IDENTITY)!r}")

    def expect(self, broker: Broker, now: float, command: bytes) -> dict[str, Any]:
        """The next message that is not a heartbeat must be `command`."""
        while True:
            got, body = self.recv(broker, now)
            if got != p.HEARTBEAT:
                assert got == command, f"expected {command!r}, got {got!r}: {body}"
                return body

    def drain(
        self, broker: Broker, now: float, turns: int = 5
    ) -> list[tuple[bytes, dict[str, Any]]]:
        out = []
        for _ in range(turns):
            broker.poll_once(now=now, timeout_s=0.01)
            while self.socket.poll(0):
                out.append(p.decode_reply(self.socket.recv_multipart(), self.protocol))
        return out


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    while OPEN_PEERS:
        OPEN_PEERS.pop().socket.close(linger=0)
    context.destroy(linger=0)


def make_broker(tmp_path: Path, ctx: zmq.Context[Any], **settings: Any) -> Broker:
    """A broker on a free loopback port with a log in tmp_path; `settings` override."""
    defaults: dict[str, Any] = {
        "endpoint": "tcp://127.0.0.1:*",
        "db_path": str(tmp_path / "tasks.db"),
        "heartbeat_s": HEARTBEAT_S,
        "liveness": LIVENESS,
        "synchronous": "normal",
    }
    return Broker(BrokerSettings(**(defaults | settings)), context=ctx)


@pytest.fixture
def short_lock_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker gives up on a log another one holds within 0.2 s, not 2 s."""
    monkeypatch.setattr(ownership, "WAIT_S", 0.2)


@pytest.fixture(params=["normal", "full"])
def synchronous(request: pytest.FixtureRequest) -> str:
    """Every rule holds in both modes; "full" also sends only what the WAL sync made durable."""
    return str(request.param)


@pytest.fixture
def broker(tmp_path: Path, ctx: zmq.Context[Any], synchronous: str) -> Iterator[Broker]:
    b = make_broker(tmp_path, ctx, synchronous=synchronous)
    yield b
    b.close()


def client(ctx: zmq.Context[Any], broker: Broker, name: bytes = b"c-test") -> Peer:
    return Peer(ctx, broker.endpoint, name, p.PROTOCOL_CLIENT)


def worker(
    ctx: zmq.Context[Any],
    broker: Broker,
    now: float,
    name: bytes = b"w1",
    capacity: int = 2,
    held: list[list[int]] | None = None,
    tasks: tuple[str, ...] = ("t.add",),
    concurrency: int | None = None,
    incarnation: str | None = None,
) -> Peer:
    w = Peer(ctx, broker.endpoint, name, p.PROTOCOL_WORKER)
    body = ready_body(capacity, held, tasks, incarnation)
    if concurrency is not None:
        body["concurrency"] = concurrency
    w.request(p.READY, body)
    w.expect(broker, now, p.WELCOME)
    return w


def ready_body(
    capacity: int = 2,
    held: list[list[int]] | None = None,
    tasks: tuple[str, ...] = ("t.add",),
    incarnation: str | None = None,
    pid: int = 1,
) -> dict[str, Any]:
    names = dict.fromkeys(tasks, 3)
    body = {"capacity": capacity, "tasks": names, "held": held or [], "pid": pid, "host": "h"}
    if incarnation is not None:
        body["incarnation"] = incarnation
    return body


def task(name: str = "t.add", key: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "payload": p.pack([[1, 2], {}]), "key": key, **extra}


def submit(c: Peer, broker: Broker, now: float, tasks: list[dict[str, Any]]) -> list[int]:
    c.request(p.SUBMIT, {"tasks": tasks})
    return list(c.expect(broker, now, p.REPLY)["ids"])


def db_rows(broker: Broker, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(broker.store.path) as conn:
        return conn.execute(sql, args).fetchall()


def result(w: Peer, task_id: int, attempt: int, value: Any = 3, ok: bool = True) -> int:
    item = {"id": task_id, "attempt": attempt, "ok": ok, "value": p.pack(value)}
    if not ok:
        item.update(value=None, error="boom", retry=True)
    return w.request(p.RESULT, {"results": [item]})


def test_submit_is_acknowledged_after_commit_and_a_resend_creates_no_second_task(broker, ctx):
    # Given a client
    c = client(ctx, broker)
    # When it submits, then resends the identical frames (same seq)
    body = {"seq": 7, "tasks": [task(), task()]}
    c.send(p.SUBMIT, body)
    first = c.expect(broker, 0.0, p.REPLY)
    assert len(db_rows(broker, "SELECT id FROM tasks")) == 2  # committed before the reply
    c.send(p.SUBMIT, body)
    second = c.expect(broker, 0.0, p.REPLY)
    # Then both replies carry the same ids and the log holds two tasks, not four
    assert first["ids"] == second["ids"] and len(first["ids"]) == 2
    assert len(db_rows(broker, "SELECT id FROM tasks")) == 2


def test_a_turn_reads_a_bounded_number_of_submits_and_leaves_the_rest_queued(broker, ctx):
    # Given ten SUBMITs waiting in the broker's socket
    c = client(ctx, broker)
    for _ in range(10):
        c.request(p.SUBMIT, {"tasks": [task()]})
    time.sleep(0.3)  # loopback delivers them well within this
    # When the broker runs turns until it has answered all of them
    read = []
    while sum(read) < 10:
        read.append(broker.poll_once(now=0.0, timeout_s=0.05))
    # Then no turn took more than its bound of SUBMITs, the first took that many,
    # and every SUBMIT got its own task
    bound = broker.settings.max_submits_per_turn
    assert bound < 10 and read[0] == bound and max(read) == bound
    replies = [body for cmd, body in c.drain(broker, 0.0) if cmd == p.REPLY]
    assert sorted(r["seq"] for r in replies) == list(range(1, 11))
    assert len(db_rows(broker, "SELECT id FROM tasks")) == 10


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The broker's WAL syncs and sends from now on, in order: "sync", "send TASK"..."""
    real_sync = os.fdatasync if hasattr(os, "fdatasync") else os.fsync
    real_send = p.send_frames
    noted: list[str] = []

    def noted_sync(fd: int) -> None:
        noted.append("sync")
        real_sync(fd)

    def noted_send(socket: Any, parts: Any, flags: int = 0) -> None:
        noted.append(f"send {parts[2].decode()}")
        real_send(socket, parts, flags)

    monkeypatch.setattr("taskring.broker.durability._datasync", noted_sync)
    monkeypatch.setattr(p, "send_frames", noted_send)
    return noted


def test_with_full_durability_nothing_is_answered_before_the_wal_is_synced(tmp_path, ctx, steps):
    # Given a broker in "full" mode whose WAL syncs and sends are noted, in order
    b = make_broker(tmp_path, ctx, synchronous="full")
    steps.clear()  # the start's own sync
    try:
        # When a client submits, and another asks about the task (a turn that writes nothing)
        c = client(ctx, b)
        c.request(p.SUBMIT, {"tasks": [task()]})
        assert c.expect(b, 0.0, p.REPLY)["ids"] == [1]
        other = client(ctx, b, b"c-other")
        other.request(p.GET, {"ids": [1]})
        assert other.expect(b, 0.0, p.REPLY)["tasks"][0]["state"] == "queued"
        # Then the commit was synced once, before its REPLY left, and the turn that
        # wrote nothing synced nothing
        assert steps == ["sync", "send REPLY", "send REPLY"]
        assert b.store.syncer is not None
        assert b.store.syncer.synced == b.store.generation == 1
    finally:
        b.close()


def test_with_full_durability_a_task_leaves_before_the_sync_and_the_reply_after(
    tmp_path, ctx, steps
):
    # Given a full-durability broker with an idle worker
    b = make_broker(tmp_path, ctx, synchronous="full")
    try:
        w = worker(ctx, b, 0.0, capacity=2)
        c = client(ctx, b)
        steps.clear()
        # When a client submits the log's first task, which reserves a block of ids
        assert submit(c, b, 0.0, [task()]) == [1]
        # Then its TASK waits for the sync too: the id must not reach a worker before
        # its reservation is on disk
        assert steps == ["sync", "send TASK", "send REPLY"]
        # When it submits a second one, from the block
        steps.clear()
        assert submit(c, b, 0.0, [task()]) == [2]
        # Then the TASK left between the commit and the WAL sync, and the REPLY
        # that acknowledges the submit only after the sync
        assert steps == ["send TASK", "sync", "send REPLY"]
        assert [t["id"] for t in w.expect(b, 0.0, p.TASK)["tasks"]] == [1]
        assert [t["id"] for t in w.expect(b, 0.0, p.TASK)["tasks"]] == [2]
        assert db_rows(b, "SELECT state, attempt FROM tasks") == [("running", 1)] * 2
    finally:
        b.close()


def lose_power_back_to(snapshot: Path, db: Path) -> None:
    """The log as the disk held it at `snapshot`: what no sync covered is gone."""
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    os.replace(snapshot, db)


def snapshot_of(db: Path, snapshot: Path) -> None:
    with sqlite3.connect(db) as live, sqlite3.connect(snapshot) as copy:
        live.backup(copy)
    live.close()
    copy.close()


def test_an_id_a_worker_saw_is_not_given_to_another_task_after_a_power_loss(tmp_path, ctx, steps):
    # Given a full-durability broker that dispatched task 1, and the log as synced then
    b = make_broker(tmp_path, ctx, synchronous="full")
    db, snapshot = tmp_path / "tasks.db", tmp_path / "synced.db"
    try:
        w = worker(ctx, b, 0.0, capacity=2)
        a = client(ctx, b, b"c-a")
        assert submit(a, b, 0.0, [task()]) == [1]
        w.expect(b, 0.0, p.TASK)
        snapshot_of(db, snapshot)
        # When task 2's TASK leaves ahead of its turn's sync, and the power goes
        # before that sync (the client never heard of task 2)
        steps.clear()
        a.request(p.SUBMIT, {"tasks": [task()]})
        assert [t["id"] for t in w.expect(b, 0.0, p.TASK)["tasks"]] == [2]
        assert steps[:2] == ["send TASK", "sync"]
    finally:
        b.close()
    lose_power_back_to(snapshot, db)
    # Then the next broker gives another client's task an id past the reserved block,
    # never the 2 the worker saw (its task code may have keyed work on it)
    again = make_broker(tmp_path, ctx, synchronous="full")
    try:
        assert submit(client(ctx, again, b"c-b"), again, 0.0, [task()]) == [ID_BLOCK + 1]
        assert db_rows(again, "SELECT id FROM tasks") == [(1,), (ID_BLOCK + 1,)]
    finally:
        again.close()


def test_a_broker_that_stops_cleanly_gives_its_unused_ids_back(tmp_path, ctx):
    # Given a broker that gave out task 1 and stops when asked
    b = make_broker(tmp_path, ctx)
    try:
        assert submit(client(ctx, b), b, 0.0, [task()]) == [1]
        b.stop()
        b.run()
    finally:
        b.close()
    # When the next broker serves the log, Then its first task is 2, not past the block
    again = make_broker(tmp_path, ctx)
    try:
        assert submit(client(ctx, again, b"c-2"), again, 0.0, [task()]) == [2]
    finally:
        again.close()


def test_a_task_behind_an_ack_to_its_worker_waits_for_the_sync(tmp_path, ctx, steps):
    # Given a full-durability broker, a worker of one slot running task 1, task 2 queued
    b = make_broker(tmp_path, ctx, synchronous="full")
    try:
        w = worker(ctx, b, 0.0, capacity=1)
        c = client(ctx, b)
        assert submit(c, b, 0.0, [task(), task()]) == [1, 2]
        assert [t["id"] for t in w.expect(b, 0.0, p.TASK)["tasks"]] == [1]
        steps.clear()
        # When the worker sends task 1's result, which frees its slot for task 2
        seq = result(w, 1, 1)
        assert w.expect(b, 0.0, p.ACK)["seq"] == seq
        # Then task 2's TASK came after the ACK, both after the sync: sent first,
        # it would reach a worker that still counts task 1 in its only slot
        assert steps == ["sync", "send ACK", "send TASK"]
        assert [t["id"] for t in w.expect(b, 0.0, p.TASK)["tasks"]] == [2]
    finally:
        b.close()


def test_a_failed_wal_sync_stops_the_broker_and_sends_nothing(tmp_path, ctx, monkeypatch):
    # Given a full-durability broker whose disk refuses the sync
    b = make_broker(tmp_path, ctx, synchronous="full")

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("taskring.broker.durability._datasync", failing)
    try:
        c = client(ctx, b)
        c.request(p.SUBMIT, {"tasks": [task()]})
        # When the loop commits the submit, Then it stops with a database error
        with pytest.raises(sqlite3.OperationalError, match="fsync of the task log failed"):
            for _ in range(200):
                b.poll_once(now=0.0, timeout_s=0.01)
        # And the submit was never acknowledged, even by a later turn: one failure is final
        with pytest.raises(sqlite3.OperationalError, match="fsync of the task log failed"):
            b.poll_once(now=0.0, timeout_s=0.01)
        assert not c.socket.poll(50)
    finally:
        b.close()
    # And it left a mark beside the log, for the next start
    marker = tmp_path / "tasks.db.sync-failed"
    assert "Input/output error" in marker.read_text()
    # When a broker starts again on the log, with the disk working again
    monkeypatch.undo()
    again = make_broker(tmp_path, ctx, synchronous="full")
    try:
        # Then it serves, with the marker gone and the unacknowledged submit queued
        # (closing the first broker let SQLite checkpoint here already; the copy
        # of a WAL a crash left is checked in tests/unit/test_store.py)
        assert not marker.exists()
        assert again.counts[p.QUEUED] == 1
    finally:
        again.close()


def test_idempotency_key_dedups_across_clients(broker, ctx):
    a, b = client(ctx, broker, b"c-a"), client(ctx, broker, b"c-b")
    ids_a = submit(a, broker, 0.0, [task(idem="order-1")])
    ids_b = submit(b, broker, 0.0, [task(idem="order-1"), task(idem="order-2")])
    assert ids_b[0] == ids_a[0] and ids_b[1] != ids_a[0]
    assert len(db_rows(broker, "SELECT id FROM tasks")) == 2


def test_unknown_name_is_flagged_and_strict_submit_rejected_without_writing(broker, ctx):
    c = client(ctx, broker)
    c.request(p.SUBMIT, {"tasks": [task("t.nope")], "strict": True})
    error = c.expect(broker, 0.0, p.ERROR)
    assert error["code"] == p.E_UNKNOWN_TASK and "t.nope" in error["message"]
    assert db_rows(broker, "SELECT count(*) FROM tasks") == [(0,)]
    c.request(p.SUBMIT, {"tasks": [task("t.nope")]})
    assert c.expect(broker, 0.0, p.REPLY)["unknown"] == ["t.nope"]


def test_dispatch_never_exceeds_credit_and_results_free_it(broker, ctx):
    # Given a worker of capacity 2 and five queued tasks
    w = worker(ctx, broker, 0.0, capacity=2)
    c = client(ctx, broker)
    ids = submit(c, broker, 0.0, [task() for _ in range(5)])
    # When the broker dispatches
    got = w.expect(broker, 0.0, p.TASK)["tasks"]
    assert [t["id"] for t in got] == ids[:2]
    assert all(t["attempt"] == 1 for t in got)
    # Then no more arrive until a result frees a slot
    assert [m for m in w.drain(broker, 0.0) if m[0] == p.TASK] == []
    seq = result(w, got[0]["id"], 1)
    assert w.expect(broker, 0.0, p.ACK) == {"seq": seq, "stale": []}
    assert [t["id"] for t in w.expect(broker, 0.0, p.TASK)["tasks"]] == [ids[2]]
    assert db_rows(broker, "SELECT state, attempt FROM tasks WHERE id = ?", ids[0]) == [
        ("succeeded", 1)
    ]


def test_a_heartbeat_sent_before_the_ack_does_not_take_the_freed_slot(broker, ctx):
    # Given a worker of capacity 1 that finished its task
    w = worker(ctx, broker, 0.0, capacity=1)
    ids = submit(client(ctx, broker), broker, 0.0, [task() for _ in range(3)])
    first = w.expect(broker, 0.0, p.TASK)["tasks"][0]
    # When its RESULT is followed by a HEARTBEAT sent before it read the ACK
    # (so the finished task is still listed as held)
    result(w, first["id"], 1)
    w.send(p.HEARTBEAT, {"dseq": 1, "held": [[first["id"], 1]]})
    assert w.expect(broker, 0.0, p.ACK)["stale"] == []
    # Then the freed slot gets the next task at once, not after the next heartbeat
    second = w.expect(broker, 0.0, p.TASK)["tasks"][0]
    assert second["id"] == ids[1]
    # And once the worker holds only that one, the third task still waits for credit
    w.send(p.HEARTBEAT, {"dseq": 2, "held": [[second["id"], 1]]})
    assert [m for m in w.drain(broker, 0.0) if m[0] == p.TASK] == []
    # While a held pair the broker never acknowledged still fills a slot
    w.send(p.HEARTBEAT, {"dseq": 2, "held": [[second["id"], 1], [999, 1]]})
    result(w, second["id"], 1)
    assert w.expect(broker, 0.0, p.ACK)["stale"] == []
    assert [m for m in w.drain(broker, 0.0) if m[0] == p.TASK] == []


SMALL = dataclasses.replace(p.DEFAULT_LIMITS, max_message_bytes=16_384, max_result_bytes=9_000)


@pytest.fixture
def small_messages(tmp_path: Path, ctx: zmq.Context[Any]) -> Iterator[Broker]:
    """A broker whose messages may be 16 KiB, and results 9,000 bytes."""
    b = make_broker(tmp_path, ctx, limits=SMALL)
    yield b
    b.close()


def history_pages(c: Peer, broker: Broker, task_id: int) -> list[tuple[int, dict[str, Any]]]:
    """Every REPLY to HISTORY, page after page, with its size on the wire."""
    pages: list[tuple[int, dict[str, Any]]] = []
    after, more = 0, True
    while more:
        c.request(p.HISTORY, {"id": task_id, "after": after})
        broker.poll_once(now=0.0, timeout_s=0.5)
        frames = c.socket.recv_multipart()
        pages.append((sum(len(f) for f in frames), p.unpack(frames[2])))
        after, more = pages[-1][1]["events"][-1]["n"], pages[-1][1]["more"]
    return pages


def checkpointed_task(c: Peer, broker: Broker, count: int, result: bytes | None = None) -> int:
    """A task with `count` checkpoint events in its log, and then `result` if given."""
    (task_id,) = submit(c, broker, 0.0, [task()])
    with broker.store.turn():
        for n in range(1, count + 1):
            broker.store.event(task_id, "checkpointed", 1, "w1", f"checkpoint {n}", 1.0)
        if result is not None:
            broker.store.finish(task_id, 0, "w1", "succeeded", result, None, 1.0)
    return task_id


def three_watched_running(b: Broker, ctx: zmq.Context[Any]) -> tuple[Peer, Peer, list[Any]]:
    """A watching client, and a worker running the client's three tasks (TASK items)."""
    w = worker(ctx, b, 0.0, capacity=3)
    c = client(ctx, b)
    c.request(p.SUBMIT, {"tasks": [task() for _ in range(3)], "watch": True})
    c.expect(b, 0.0, p.REPLY)
    return c, w, w.expect(b, 0.0, p.TASK)["tasks"]


def test_notify_is_split_so_no_message_outgrows_the_size_limit(small_messages, ctx):
    # Given a broker whose messages may be 16 KiB, and three tasks whose results are 5 KB
    b = small_messages
    c, w, got = three_watched_running(b, ctx)
    # When all three finish in one turn
    for t in got:
        result(w, t["id"], t["attempt"], value=b"x" * 5_000)
    b.poll_once(now=0.0, timeout_s=0.5)
    # Then the views arrive over several NOTIFYs, each under the limit
    sizes, seen = [], []
    for _ in range(20):
        b.poll_once(now=0.0, timeout_s=0.01)
        while c.socket.poll(0):
            frames = c.socket.recv_multipart()
            if frames[1] == p.NOTIFY:
                sizes.append(sum(len(f) for f in frames))
                seen += [v["id"] for v in p.unpack(frames[2])["tasks"]]
    assert sorted(seen) == sorted(t["id"] for t in got)
    assert len(sizes) >= 2 and max(sizes) < SMALL.max_message_bytes


def test_notify_counts_errors_in_bytes_not_characters(small_messages, ctx):
    # Given three tasks that fail with 2,000 emoji each (8,000 bytes)
    b = small_messages
    c, w, got = three_watched_running(b, ctx)
    for t in got:  # one RESULT each: together, over the limit
        item = {"id": t["id"], "attempt": 1, "ok": False, "retry": False}
        w.request(p.RESULT, {"results": [item | {"error": "\U0001f600" * 2000}]})
    time.sleep(0.05)  # all three read in one turn, so their views share the NOTIFYs
    # When all three are announced, Then no NOTIFY outgrows the limit
    notes = [body for command, body in c.drain(b, 0.0, turns=10) if command == p.NOTIFY]
    sizes = [len(p.pack(body)) for body in notes]
    assert len(sizes) >= 2 and max(sizes) < SMALL.max_message_bytes


def test_a_long_history_comes_in_pages_under_the_size_limit(small_messages, ctx):
    # Given a task with 400 checkpoint events
    c = client(ctx, small_messages)
    task_id = checkpointed_task(c, small_messages, 400)
    # When a client reads its history, page after page
    pages = history_pages(c, small_messages, task_id)
    # Then every event arrives once, in order, over several REPLYs under the limit
    numbers = [e["n"] for _, reply in pages for e in reply["events"]]
    assert numbers == sorted(set(numbers))
    details = [e["detail"] for _, reply in pages for e in reply["events"]]
    assert details == [None] + [f"checkpoint {n}" for n in range(1, 401)]
    assert len(pages) >= 3 and max(size for size, _ in pages) < SMALL.max_message_bytes


def test_a_history_page_leaves_room_for_the_task_view(small_messages, ctx):
    # Given a task whose 8,000-byte result rides in every page's view
    c = client(ctx, small_messages)
    task_id = checkpointed_task(c, small_messages, 59, result=b"r" * 8_000)
    # When its history is read, Then every page, view included, fits the limit
    pages = history_pages(c, small_messages, task_id)
    assert len(pages) >= 2 and max(size for size, _ in pages) < SMALL.max_message_bytes


def test_history_of_an_unknown_task_is_empty_and_complete(broker, ctx):
    c = client(ctx, broker)
    c.request(p.HISTORY, {"id": 999})
    assert c.expect(broker, 0.0, p.REPLY) | {"seq": 0} == {
        "seq": 0,
        "task": None,
        "events": [],
        "more": False,
    }


def test_duplicate_result_is_acknowledged_and_applied_once(broker, ctx):
    w = worker(ctx, broker, 0.0)
    (task_id,) = submit(client(ctx, broker), broker, 0.0, [task()])
    w.expect(broker, 0.0, p.TASK)
    for _ in range(2):
        result(w, task_id, 1)
        assert w.expect(broker, 0.0, p.ACK)["stale"] == []
    kinds = [k for (k,) in db_rows(broker, "SELECT kind FROM events WHERE task_id = ?", task_id)]
    assert kinds == ["submitted", "leased", "succeeded"]


def test_dead_worker_loses_its_leases_and_the_next_attempt_is_fenced(broker, ctx):
    # Given a task leased to w1 and a second worker w2
    c = client(ctx, broker)
    w1 = worker(ctx, broker, 0.0, b"w1", capacity=1)
    (task_id,) = submit(c, broker, 0.0, [task()])
    assert w1.expect(broker, 0.0, p.TASK)["tasks"][0]["attempt"] == 1
    w2 = worker(ctx, broker, 0.0, b"w2", capacity=1)
    # When w1 stays silent past the liveness window while w2 keeps beating
    later = HEARTBEAT_S * LIVENESS + 0.5
    w2.send(p.HEARTBEAT, {"dseq": 0, "held": []})
    got = w2.expect(broker, later, p.TASK)["tasks"][0]
    # Then the task moves to w2 with attempt 2
    assert (got["id"], got["attempt"]) == (task_id, 2)
    # And w1's late result is acknowledged, recorded as stale, and not applied
    result(w1, task_id, 1, value="late")
    assert w1.expect(broker, later, p.ACK)["stale"] == [task_id]
    assert db_rows(broker, "SELECT state FROM tasks WHERE id = ?", task_id) == [("running",)]
    result(w2, task_id, 2, value=42)
    assert w2.expect(broker, later, p.ACK)["stale"] == []
    assert db_rows(broker, "SELECT state, result FROM tasks WHERE id = ?", task_id) == [
        ("succeeded", p.pack(42))
    ]
    kinds = [k for (k,) in db_rows(broker, "SELECT kind FROM events WHERE task_id = ?", task_id)]
    assert kinds == ["submitted", "leased", "retried", "leased", "stale", "succeeded"]


def test_task_is_dead_lettered_when_attempts_run_out(broker, ctx):
    c = client(ctx, broker)
    (task_id,) = submit(c, broker, 0.0, [task(max_attempts=2)])
    now = 0.0
    for attempt in (1, 2):
        w = worker(ctx, broker, now, f"w{attempt}".encode(), capacity=1)
        assert w.expect(broker, now, p.TASK)["tasks"][0]["attempt"] == attempt
        now += HEARTBEAT_S * LIVENESS + 0.5
        broker.poll_once(now=now, timeout_s=0)
    state, error = db_rows(broker, "SELECT state, error FROM tasks WHERE id = ?", task_id)[0]
    assert state == "dead" and "2 of 2 attempts" in error


def test_a_dead_worker_costs_no_attempt_to_the_tasks_waiting_behind_its_running_ones(broker, ctx):
    # Given a worker that runs one task at a time and holds three, and three tasks
    # that each allow a single attempt, all leased to it
    c = client(ctx, broker)
    w1 = worker(ctx, broker, 0.0, b"w1", capacity=3, concurrency=1)
    ids = submit(c, broker, 0.0, [task(max_attempts=1) for _ in range(3)])
    sent = w1.expect(broker, 0.0, p.TASK)["tasks"]
    assert [(t["id"], t["attempt"]) for t in sent] == [(i, 1) for i in ids]
    # When the worker dies
    later = HEARTBEAT_S * LIVENESS + 0.5
    broker.poll_once(now=later, timeout_s=0)
    # Then the task it ran used up its attempt, and the two waiting behind it did not
    rows = db_rows(broker, "SELECT state, spared, error FROM tasks ORDER BY id")
    assert [(state, spared) for state, spared, _ in rows] == [
        ("dead", 0),
        ("queued", 1),
        ("queued", 1),
    ]
    assert "gave up after 1 of 1 attempts" in rows[0][2]
    assert all("not counted against max_attempts" in error for _, _, error in rows[1:])
    # And another worker runs them as their second lease, their first counted attempt
    w2 = worker(ctx, broker, later, b"w2", capacity=2)
    sent = w2.expect(broker, later, p.TASK)["tasks"]
    assert sorted((t["id"], t["attempt"]) for t in sent) == [(i, 2) for i in ids[1:]]
    for t in sent:
        result(w2, t["id"], t["attempt"])
        w2.expect(broker, later, p.ACK)
    states = db_rows(broker, "SELECT state FROM tasks ORDER BY id")
    assert states == [("dead",), ("succeeded",), ("succeeded",)]


def checkpoints(task_id: int, attempt: int, *numbered: tuple[int, Any]) -> dict[str, Any]:
    """A CHECKPOINT body (without seq) of one task: (number, state) pairs."""
    items = [
        {"id": task_id, "attempt": attempt, "number": n, "state": p.pack(s)} for n, s in numbered
    ]
    return {"checkpoints": items}


def test_checkpoint_is_stored_numbered_and_handed_to_the_next_attempt(broker, ctx):
    c = client(ctx, broker)
    w1 = worker(ctx, broker, 0.0, b"w1", capacity=1)
    (task_id,) = submit(c, broker, 0.0, [task()])
    w1.expect(broker, 0.0, p.TASK)
    seq = w1.request(p.CHECKPOINT, checkpoints(task_id, 1, (1, 1000)))
    assert w1.expect(broker, 0.0, p.ACK) == {"seq": seq, "stale": []}
    # A lower number never overwrites a higher one
    w1.request(p.CHECKPOINT, checkpoints(task_id, 1, (2, 2000)))
    w1.expect(broker, 0.0, p.ACK)
    w1.request(p.CHECKPOINT, checkpoints(task_id, 1, (1, 1000)))
    w1.expect(broker, 0.0, p.ACK)
    assert db_rows(broker, "SELECT checkpoint, checkpoint_no FROM tasks") == [(p.pack(2000), 2)]
    # When w1 dies, w2's attempt starts from checkpoint 2
    later = HEARTBEAT_S * LIVENESS + 0.5
    w2 = worker(ctx, broker, later, b"w2", capacity=1)
    got = w2.expect(broker, later, p.TASK)["tasks"][0]
    assert (got["attempt"], got["state"], got["number"]) == (2, p.pack(2000), 2)
    # And a checkpoint from the superseded attempt is refused
    w1.request(p.CHECKPOINT, checkpoints(task_id, 1, (3, 3)))
    assert w1.expect(broker, later, p.ACK)["stale"] == [task_id]
    assert db_rows(broker, "SELECT checkpoint_no FROM tasks") == [(2,)]


def test_one_checkpoint_message_carries_many_tasks_and_names_only_the_stale(broker, ctx):
    # Given a worker running two tasks, and a third task id that does not exist
    c = client(ctx, broker)
    w1 = worker(ctx, broker, 0.0, b"w1", capacity=2)
    first, second = submit(c, broker, 0.0, [task(), task()])
    w1.expect(broker, 0.0, p.TASK)
    # When one CHECKPOINT carries a checkpoint of each, two of the first, and one of the stranger
    body = checkpoints(first, 1, (1, "a1"), (2, "a2"))
    body["checkpoints"] += checkpoints(second, 1, (1, "b1"))["checkpoints"]
    body["checkpoints"] += checkpoints(second + 100, 1, (1, "x"))["checkpoints"]
    seq = w1.request(p.CHECKPOINT, body)
    # Then one ACK answers it, naming only the stranger stale, and each task keeps its last
    assert w1.expect(broker, 0.0, p.ACK) == {"seq": seq, "stale": [second + 100]}
    rows = db_rows(broker, "SELECT id, checkpoint, checkpoint_no FROM tasks ORDER BY id")
    assert rows == [(first, p.pack("a2"), 2), (second, p.pack("b1"), 1)]
    events = db_rows(broker, "SELECT task_id, detail FROM events WHERE kind = 'checkpointed'")
    assert sorted(events) == [
        (first, "checkpoint 1"),
        (first, "checkpoint 2"),
        (second, "checkpoint 1"),
    ]


def tasks_sent(w: Peer, broker: Broker, now: float) -> list[tuple[int, str]]:
    """(id, name) of every task in the TASK messages that reach `w` within a few turns."""
    return [
        (t["id"], t["name"]) for command, body in w.drain(broker, now) if command == p.TASK
        for t in body["tasks"]
    ]  # fmt: skip


def test_a_task_goes_only_to_a_worker_that_runs_its_name(broker, ctx):
    # Given two workers with room, each running a task name of its own
    c = client(ctx, broker)
    w_img = worker(ctx, broker, 0.0, b"w-img", capacity=4, tasks=("img.resize",))
    w_mail = worker(ctx, broker, 0.0, b"w-mail", capacity=4, tasks=("mail.send",))
    # When tasks of both names arrive, keyed and not (the ring alone would mix them)
    keys = [None, "alice", "bob"]
    ids = submit(c, broker, 0.0, [task("img.resize", key=k) for k in keys])
    ids += submit(c, broker, 0.0, [task("mail.send", key=k) for k in keys])
    # Then each worker is sent its own names, all of them, and nothing else
    got = {w: tasks_sent(peer, broker, 0.0) for w, peer in (("img", w_img), ("mail", w_mail))}
    assert sorted(got["img"]) == [(i, "img.resize") for i in ids[:3]]
    assert sorted(got["mail"]) == [(i, "mail.send") for i in ids[3:]]


def test_a_task_no_worker_runs_stays_queued_until_one_registers_its_name(broker, ctx):
    # Given a worker that runs img.resize only
    c = client(ctx, broker)
    w_img = worker(ctx, broker, 0.0, b"w-img", capacity=4, tasks=("img.resize",))
    # When pdf.render tasks arrive, before and after an img.resize task
    first = submit(c, broker, 0.0, [task("pdf.render"), task("img.resize"), task("pdf.render")])
    # Then the worker gets only its own task, and the others wait, queued (they used to be
    # sent to it anyway, and failed there for good as an unknown task)
    assert tasks_sent(w_img, broker, 0.0) == [(first[1], "img.resize")]
    states = db_rows(broker, "SELECT id, state, attempt FROM tasks ORDER BY id")
    assert states == [(first[0], "queued", 0), (first[1], "running", 1), (first[2], "queued", 0)]
    # ... also when more arrive later
    (later,) = submit(c, broker, 0.0, [task("pdf.render")])
    assert tasks_sent(w_img, broker, 0.0) == []
    # When a worker that runs pdf.render registers, it gets every one of them
    w_pdf = worker(ctx, broker, 0.0, b"w-pdf", capacity=4, tasks=("pdf.render",))
    got = tasks_sent(w_pdf, broker, 0.0)
    assert sorted(got) == [
        (first[0], "pdf.render"),
        (first[2], "pdf.render"),
        (later, "pdf.render"),
    ]


@pytest.fixture
def small_window(tmp_path: Path, ctx: zmq.Context[Any]) -> Iterator[Broker]:
    """A broker that keeps 4 queued tasks in memory, the rest in SQLite."""
    b = make_broker(tmp_path, ctx, queue_window=4)
    yield b
    b.close()


def run_each(w: Peer, broker: Broker, count: int) -> list[int]:
    """Ids of the next `count` tasks sent to w, each answered with a result as it arrives."""
    ran: list[int] = []
    for _ in range(30):
        for task_id, _name in tasks_sent(w, broker, 0.0):
            ran.append(task_id)
            result(w, task_id, 1)
        if len(ran) >= count:
            break
    return ran


def test_many_tasks_no_worker_runs_hold_up_no_others_and_all_run_later(small_window, ctx):
    broker = small_window
    c = client(ctx, broker)
    w_img = worker(ctx, broker, 0.0, b"w-img", capacity=8, tasks=("img.resize",))
    # When 10 tasks nobody runs are queued ahead of 2 that w-img runs
    waiting = submit(c, broker, 0.0, [task("pdf.render") for _ in range(10)])
    mine = submit(c, broker, 0.0, [task("img.resize"), task("img.resize")])
    # Then w-img gets its 2 all the same, a window's worth of skipping per turn
    got = tasks_sent(w_img, broker, 0.0) + tasks_sent(w_img, broker, 0.0)
    assert sorted(got) == [(i, "img.resize") for i in mine]
    # And a worker that runs pdf.render later gets all 10, read again from the log
    w_pdf = worker(ctx, broker, 0.0, b"w-pdf", capacity=10, tasks=("pdf.render",))
    got = tasks_sent(w_pdf, broker, 0.0) + tasks_sent(w_pdf, broker, 0.0)
    assert sorted(got) == [(i, "pdf.render") for i in waiting]


def test_a_long_backlog_of_one_name_holds_up_no_other_and_all_of_it_runs(small_window, ctx):
    # Given a worker with one slot for img.resize and an idle one for mail.send
    broker = small_window
    c = client(ctx, broker)
    w_img = worker(ctx, broker, 0.0, b"w-img", capacity=1, tasks=("img.resize",))
    w_mail = worker(ctx, broker, 0.0, b"w-mail", capacity=2, tasks=("mail.send",))
    # When 10 img.resize tasks are queued ahead of a mail.send task
    imgs = submit(c, broker, 0.0, [task("img.resize") for _ in range(10)])
    (mail,) = submit(c, broker, 0.0, [task("mail.send")])
    # Then the mail.send task goes out at once, past the img.resize backlog
    assert tasks_sent(w_mail, broker, 0.0) == [(mail, "mail.send")]
    # And every img.resize task runs, one at a time, as its worker's slot frees
    assert sorted(run_each(w_img, broker, len(imgs))) == imgs


def test_a_long_backlog_for_one_key_owner_holds_up_no_other_owner(small_window, ctx):
    # Given two workers, one with a single slot
    broker = small_window
    c = client(ctx, broker)
    w1 = worker(ctx, broker, 0.0, b"w1", capacity=1)
    w2 = worker(ctx, broker, 0.0, b"w2", capacity=2)
    keys = [f"k{i}" for i in range(100)]
    mine = next(k for k in keys if broker.placement.ring.owner(k) == "w1")
    theirs = next(k for k in keys if broker.placement.ring.owner(k) == "w2")
    # When 10 tasks of a key w1 owns are queued ahead of one of a key w2 owns
    backlog = submit(c, broker, 0.0, [task(key=mine) for _ in range(10)])
    (other,) = submit(c, broker, 0.0, [task(key=theirs)])
    # Then w2's task goes out at once, past w1's backlog
    assert tasks_sent(w2, broker, 0.0) == [(other, "t.add")]
    # And every task of w1's key runs on w1, as its one slot frees
    assert sorted(run_each(w1, broker, len(backlog))) == backlog
    assert tasks_sent(w2, broker, 0.0) == []


def test_a_busy_worker_holds_up_no_task_of_another_name(broker, ctx):
    # Given a worker with one slot for img.resize, and one with room for mail.send
    c = client(ctx, broker)
    w_img = worker(ctx, broker, 0.0, b"w-img", capacity=1, tasks=("img.resize",))
    w_mail = worker(ctx, broker, 0.0, b"w-mail", capacity=2, tasks=("mail.send",))
    # When two img.resize tasks come first in the queue, then a mail.send task
    ids = submit(c, broker, 0.0, [task("img.resize"), task("img.resize"), task("mail.send")])
    # Then the mail.send task does not wait behind the second img.resize task
    assert tasks_sent(w_img, broker, 0.0) == [(ids[0], "img.resize")]
    assert tasks_sent(w_mail, broker, 0.0) == [(ids[2], "mail.send")]
    # ... which goes out as soon as its worker's slot is free
    result(w_img, ids[0], 1)
    assert [(i, n) for i, n in tasks_sent(w_img, broker, 0.0)] == [(ids[1], "img.resize")]


def test_get_and_tasks_answer_only_as_many_views_as_fit_in_one_message(tmp_path, ctx):
    # Given a broker whose messages hold 8 KiB, and 5 tasks whose results are 1,000 bytes
    limits = dataclasses.replace(p.DEFAULT_LIMITS, max_message_bytes=8192)
    broker = make_broker(tmp_path, ctx, limits=limits)
    try:
        c = client(ctx, broker)
        w = worker(ctx, broker, 0.0, capacity=5)
        ids = submit(c, broker, 0.0, [task() for _ in range(5)])
        w.expect(broker, 0.0, p.TASK)
        for i in ids:
            result(w, i, 1, value="x" * 1000)
            w.expect(broker, 0.0, p.ACK)
        # When a client asks for all 5 at once
        c.request(p.GET, {"ids": ids, "watch": True})
        views = c.expect(broker, 0.0, p.REPLY)["tasks"]
        # Then the reply carries the first ones that fit in half a message, in order
        assert 1 <= len(views) < 5
        assert [v["id"] for v in views] == ids[: len(views)]
        assert all(p.unpack(v["result"]) == "x" * 1000 for v in views)
        # ... and so does a listing
        c.request(p.TASKS, {"limit": 5})
        listed = c.expect(broker, 0.0, p.REPLY)["tasks"]
        assert 1 <= len(listed) < 5 and [v["id"] for v in listed] == ids[::-1][: len(listed)]
        # And a listing without results holds all 5, every other field as it was
        c.request(p.TASKS, {"limit": 5, "results": False})
        reply = c.expect(broker, 0.0, p.REPLY)
        assert [v["id"] for v in reply["tasks"]] == ids[::-1] and reply["more"] is False
        assert all(v["result"] is None and v["state"] == "succeeded" for v in reply["tasks"])
        assert reply["tasks"][: len(listed)] == [{**v, "result": None} for v in listed]
    finally:
        broker.close()


@pytest.mark.parametrize(
    "parts",
    [
        [b"TRC01"],
        [b"NOPE1", p.SUBMIT, p.pack({})],
        [p.PROTOCOL_CLIENT, b"FLY", p.pack({})],
        [p.PROTOCOL_CLIENT, p.SUBMIT, b"\xc1garbage"],
        [p.PROTOCOL_CLIENT, p.SUBMIT, p.pack({"seq": 1, "tasks": "no"})],
        [p.PROTOCOL_WORKER, p.RESULT, p.pack({"seq": True, "results": []})],
    ],
)
def test_malformed_message_gets_an_error_and_the_broker_keeps_serving(broker, ctx, parts):
    bad = client(ctx, broker, b"c-bad")
    bad.socket.send_multipart(parts)
    replies = []
    for _ in range(5):
        broker.poll_once(now=0.0, timeout_s=0.01)
        while bad.socket.poll(0):
            replies.append(bad.socket.recv_multipart())
    assert [frames[1] for frames in replies] == [p.ERROR]
    assert p.unpack(replies[0][2])["code"] in {
        p.E_BAD_FRAMES,
        p.E_BAD_PROTOCOL,
        p.E_UNKNOWN_COMMAND,
        p.E_BAD_BODY,
    }
    assert len(submit(client(ctx, broker), broker, 0.0, [task()])) == 1


def test_keyed_tasks_wait_for_their_owner(broker, ctx):
    c = client(ctx, broker)
    w1 = worker(ctx, broker, 0.0, b"w1", capacity=1)
    w2 = worker(ctx, broker, 0.0, b"w2", capacity=1)
    key = next(
        k for k in (f"user-{i}" for i in range(100)) if broker.placement.ring.owner(k) == "w1"
    )
    ids = submit(c, broker, 0.0, [task(key=key) for _ in range(3)])
    first = w1.expect(broker, 0.0, p.TASK)["tasks"]
    assert [t["id"] for t in first] == ids[:1]
    assert [m for m in w2.drain(broker, 0.0) if m[0] == p.TASK] == []  # w2 idle, key waits
    result(w1, ids[0], 1)
    w1.expect(broker, 0.0, p.ACK)
    assert [t["id"] for t in w1.expect(broker, 0.0, p.TASK)["tasks"]] == ids[1:2]


def test_only_the_tasks_a_dead_worker_had_not_started_keep_their_attempts(broker, ctx):
    # Given a worker that runs one task at a time and holds two: A runs, B waits
    c = client(ctx, broker)
    w = worker(ctx, broker, 0.0, b"w1", capacity=2, concurrency=1)
    a, b = submit(c, broker, 0.0, [task(max_attempts=1), task(max_attempts=1)])
    assert len(w.expect(broker, 0.0, p.TASK)["tasks"]) == 2
    # When A finishes, B starts, and C comes to wait behind it
    (c_id,) = submit(c, broker, 0.0, [task(max_attempts=1)])
    result(w, a, 1)
    w.expect(broker, 0.0, p.ACK)
    assert [t["id"] for t in w.expect(broker, 0.0, p.TASK)["tasks"]] == [c_id]
    # And the worker dies
    broker.poll_once(now=HEARTBEAT_S * LIVENESS + 0.5, timeout_s=0)
    # Then B, which was running, used up its attempt; C, which was waiting, did not
    rows = db_rows(broker, "SELECT id, state, spared FROM tasks ORDER BY id")
    assert rows == [(a, "succeeded", 0), (b, "dead", 0), (c_id, "queued", 1)]


def hand_back(w: Peer, broker: Broker, task_id: int, attempt: int) -> None:
    item = {"id": task_id, "attempt": attempt, "ok": False, "error": "stopping", "started": False}
    w.request(p.RESULT, {"results": [item]})
    assert w.expect(broker, 0.0, p.ACK)["stale"] == []


def test_hand_backs_are_not_bound_by_max_attempts_but_by_max_spared(broker, ctx, monkeypatch):
    monkeypatch.setattr(server, "MAX_SPARED", 3)
    # Given a task of one attempt
    w = worker(ctx, broker, 0.0, capacity=1)
    (task_id,) = submit(client(ctx, broker), broker, 0.0, [task(max_attempts=1)])
    # When its worker hands it back unstarted three times (say, three rolling restarts)
    for attempt in (1, 2, 3):
        assert w.expect(broker, 0.0, p.TASK)["tasks"][0]["attempt"] == attempt
        hand_back(w, broker, task_id, attempt)
    # Then it is still to run, not dead
    assert w.expect(broker, 0.0, p.TASK)["tasks"][0]["attempt"] == 4
    assert db_rows(broker, "SELECT state, spared FROM tasks") == [("running", 3)]
    # And a fourth hand-back, past MAX_SPARED, counts: a worker that refuses a task
    # forever cannot keep it circling forever
    hand_back(w, broker, task_id, 4)
    state, error = db_rows(broker, "SELECT state, error FROM tasks")[0]
    assert state == "dead" and "gave up after 1 of 1 attempts" in error


def test_a_task_its_worker_hands_back_unstarted_keeps_its_attempts(broker, ctx):
    # Given a task of one attempt, leased
    w = worker(ctx, broker, 0.0, capacity=1)
    (task_id,) = submit(client(ctx, broker), broker, 0.0, [task(max_attempts=1)])
    w.expect(broker, 0.0, p.TASK)
    # When the worker hands it back, never started
    hand_back(w, broker, task_id, 1)
    # Then it is queued again, not dead, and leased again at once
    got = w.expect(broker, 0.0, p.TASK)["tasks"][0]
    assert (got["id"], got["attempt"]) == (task_id, 2)
    assert db_rows(broker, "SELECT state, spared FROM tasks") == [("running", 1)]
    (detail,) = db_rows(broker, "SELECT detail FROM events WHERE kind = 'retried'")
    assert detail == ("not counted against max_attempts (it never started): stopping",)
    # And a failure of that attempt, which started, uses up its one counted attempt
    result(w, task_id, 2, ok=False)
    w.expect(broker, 0.0, p.ACK)
    assert db_rows(broker, "SELECT state FROM tasks") == [("dead",)]


def test_lease_lost_in_transit_is_requeued_and_spared_at_most_max_attempts_times(broker, ctx):
    # Given a task of one attempt, leased
    w = worker(ctx, broker, 0.0, capacity=1)
    (task_id,) = submit(client(ctx, broker), broker, 0.0, [task(max_attempts=1)])
    dseq = w.expect(broker, 0.0, p.TASK)["dseq"]
    # When the worker says it saw TASK dseq but does not hold the task
    w.send(p.HEARTBEAT, {"dseq": dseq, "held": []})
    # Then the task comes again: it most likely never reached the worker
    got = w.expect(broker, 0.0, p.TASK)
    assert (got["tasks"][0]["id"], got["tasks"][0]["attempt"]) == (task_id, 2)
    # When that lease is lost in transit too
    w.send(p.HEARTBEAT, {"dseq": got["dseq"], "held": []})
    broker.poll_once(now=0.0, timeout_s=0.05)
    # Then it is dead-lettered: a worker also lets go of a task whose result the broker
    # refused, so this is a guess, and a guess spares a task at most max_attempts times
    state, spared, error = db_rows(broker, "SELECT state, spared, error FROM tasks")[0]
    assert (state, spared) == ("dead", 1)
    assert "gave up after 1 of 1 attempts" in error


def test_restart_readopts_leases_the_worker_still_holds(tmp_path, ctx, synchronous):
    # Given two tasks leased to w1, then the broker stops
    b1 = make_broker(tmp_path, ctx, synchronous=synchronous)
    c = client(ctx, b1)
    w = worker(ctx, b1, 0.0, b"w1", capacity=2)
    ids = submit(c, b1, 0.0, [task(), task()])
    w.expect(b1, 0.0, p.TASK)
    b1.close()
    # When a new broker starts on the same log and w1 registers holding only the first
    b2 = make_broker(tmp_path, ctx, synchronous=synchronous)
    w2 = worker(ctx, b2, 0.0, b"w1", capacity=2, held=[[ids[0], 1]])
    # Then the first lease is re-adopted, the second is dispatched again with attempt 2
    got = w2.expect(b2, 0.0, p.TASK)["tasks"]
    assert [(t["id"], t["attempt"]) for t in got] == [(ids[1], 2)]
    result(w2, ids[0], 1, value="kept")
    assert w2.expect(b2, 0.0, p.ACK)["stale"] == []
    assert db_rows(b2, "SELECT state FROM tasks WHERE id = ?", ids[0]) == [("succeeded",)]
    b2.close()


def test_leases_adopted_after_a_restart_keep_the_order_the_worker_got_them(
    tmp_path, ctx, synchronous
):
    # Given a worker that runs one task at a time, holding two tasks of one attempt
    # each, across a broker restart; it got the later id first (the earlier one came
    # back to the queue and was leased again after it, say)
    b1 = make_broker(tmp_path, ctx, synchronous=synchronous)
    w = worker(ctx, b1, 0.0, b"w1", capacity=2, concurrency=1)
    first, second = submit(client(ctx, b1), b1, 0.0, [task(max_attempts=1)] * 2)
    w.expect(b1, 0.0, p.TASK)
    b1.close()
    b2 = make_broker(tmp_path, ctx, synchronous=synchronous)
    worker(ctx, b2, 0.0, b"w1", capacity=2, concurrency=1, held=[[second, 1], [first, 1]])
    # When the worker dies
    b2.poll_once(now=HEARTBEAT_S * LIVENESS + 0.5, timeout_s=0)
    # Then the one it got first (and ran) used up its attempt, the other was spared
    rows = db_rows(b2, "SELECT id, state, spared FROM tasks ORDER BY id")
    assert rows == [(first, "queued", 1), (second, "dead", 0)]
    b2.close()


def test_restart_requeues_leases_nobody_claims_within_the_liveness_window(
    tmp_path, ctx, synchronous
):
    b1 = make_broker(tmp_path, ctx, synchronous=synchronous)
    w = worker(ctx, b1, 0.0, b"gone", capacity=1)
    (task_id,) = submit(client(ctx, b1), b1, 0.0, [task()])
    w.expect(b1, 0.0, p.TASK)
    b1.close()
    b2 = make_broker(tmp_path, ctx, synchronous=synchronous)
    start = b2.started
    w2 = worker(ctx, b2, start, b"other", capacity=1)
    assert [m for m in w2.drain(b2, start) if m[0] == p.TASK] == []  # waits for "gone"
    later = start + HEARTBEAT_S * LIVENESS + 0.1
    w2.send(p.HEARTBEAT, {"dseq": 0, "held": []})
    got = w2.expect(b2, later, p.TASK)["tasks"][0]
    assert (got["id"], got["attempt"]) == (task_id, 2)
    b2.close()


def test_notify_reaches_a_watching_client(broker, ctx):
    c = client(ctx, broker)
    w = worker(ctx, broker, 0.0)
    c.request(p.SUBMIT, {"tasks": [task()], "watch": True})
    (task_id,) = c.expect(broker, 0.0, p.REPLY)["ids"]
    w.expect(broker, 0.0, p.TASK)
    result(w, task_id, 1, value=3)
    note = c.expect(broker, 0.0, p.NOTIFY)["tasks"][0]
    assert (note["id"], note["state"], p.unpack(note["result"])) == (task_id, "succeeded", 3)


def test_status_history_and_listing(broker, ctx):
    c = client(ctx, broker)
    w = worker(ctx, broker, 0.0, capacity=4)
    ids = submit(c, broker, 0.0, [task(), task()])
    w.expect(broker, 0.0, p.TASK)
    c.request(p.STATUS, {})
    status = c.expect(broker, 0.0, p.REPLY)
    assert status["states"] == {"running": 2}
    assert [(x["name"], x["load"]) for x in status["workers"]] == [("w1", 2)]
    assert status["workers"][0]["share"] == pytest.approx(1.0)
    c.request(p.HISTORY, {"id": ids[0]})
    history = c.expect(broker, 0.0, p.REPLY)
    assert [e["kind"] for e in history["events"]] == ["submitted", "leased"]
    c.request(p.TASKS, {"state": "running", "limit": 1})
    assert [t["id"] for t in c.expect(broker, 0.0, p.REPLY)["tasks"]] == [ids[1]]


def test_retryable_failures_use_up_attempts_then_the_task_is_dead(broker, ctx):
    w = worker(ctx, broker, 0.0, capacity=1)
    (task_id,) = submit(client(ctx, broker), broker, 0.0, [task(max_attempts=2)])
    for attempt in (1, 2):
        got = w.expect(broker, 0.0, p.TASK)["tasks"][0]
        assert got["attempt"] == attempt
        result(w, task_id, attempt, ok=False)
        w.expect(broker, 0.0, p.ACK)
    state, error = db_rows(broker, "SELECT state, error FROM tasks WHERE id = ?", task_id)[0]
    assert state == "dead" and error.startswith("boom") and "2 of 2 attempts" in error


def test_non_retryable_error_fails_at_once(broker, ctx):
    w = worker(ctx, broker, 0.0, capacity=1)
    (task_id,) = submit(client(ctx, broker), broker, 0.0, [task(max_attempts=5)])
    w.expect(broker, 0.0, p.TASK)
    item = {"id": task_id, "attempt": 1, "ok": False, "error": "unknown task", "retry": False}
    w.request(p.RESULT, {"results": [item]})
    w.expect(broker, 0.0, p.ACK)
    assert db_rows(broker, "SELECT state, attempt FROM tasks WHERE id = ?", task_id) == [
        ("failed", 1)
    ]


def ready(w: Peer, capacity: int, held: list[list[int]], incarnation: str, dseq: int) -> None:
    w.request(
        p.READY,
        {
            "capacity": capacity,
            "tasks": {"t.add": 3},
            "held": held,
            "incarnation": incarnation,
            "dseq": dseq,
        },
    )


def test_the_same_process_registering_again_keeps_leases_still_in_flight(broker, ctx):
    # Given a worker process that registered and was sent a TASK it has not seen yet
    w = Peer(ctx, broker.endpoint, b"w1", p.PROTOCOL_WORKER)
    ready(w, 2, [], "proc-a", 0)
    assert w.expect(broker, 0.0, p.WELCOME)["dseq"] == 0
    (task_id,) = submit(client(ctx, broker), broker, 0.0, [task()])
    # When the same process sends READY again, written before that TASK arrived
    ready(w, 2, [], "proc-a", 0)
    # Then the lease survives, the TASK still arrives, and numbering goes on
    assert w.expect(broker, 0.0, p.TASK)["dseq"] == 1
    assert w.expect(broker, 0.0, p.WELCOME)["dseq"] == 1
    assert db_rows(broker, "SELECT state, attempt FROM tasks WHERE id = ?", task_id) == [
        ("running", 1)
    ]


def test_a_restarted_process_with_the_same_name_loses_what_it_does_not_hold(broker, ctx):
    w = Peer(ctx, broker.endpoint, b"w1", p.PROTOCOL_WORKER)
    ready(w, 1, [], "proc-a", 0)
    w.expect(broker, 0.0, p.WELCOME)
    (task_id,) = submit(client(ctx, broker), broker, 0.0, [task()])
    w.expect(broker, 0.0, p.TASK)
    ready(w, 1, [], "proc-b", 0)  # a new process: it cannot be running the task
    assert w.expect(broker, 0.0, p.WELCOME)["dseq"] == 0
    got = w.expect(broker, 0.0, p.TASK)["tasks"][0]
    assert (got["id"], got["attempt"]) == (task_id, 2)


def test_a_draining_worker_gets_no_new_tasks_and_leaves_the_ring(broker, ctx):
    # Given two workers and a draining announcement from w1
    w1 = worker(ctx, broker, 0.0, b"w1", capacity=2)
    w2 = worker(ctx, broker, 0.0, b"w2", capacity=2)
    w1.send(p.HEARTBEAT, {"dseq": 0, "held": [], "draining": True})
    w1.drain(broker, 0.0)
    # When tasks arrive, keyed ones included
    ids = submit(client(ctx, broker), broker, 0.0, [task(key=f"k{i}") for i in range(2)])
    # Then all go to w2, and w1 owns no part of the ring
    got = w2.expect(broker, 0.0, p.TASK)["tasks"]
    assert sorted(t["id"] for t in got) == ids
    assert [m for m in w1.drain(broker, 0.0) if m[0] == p.TASK] == []
    assert "w1" not in broker.placement.ring


def test_rejections_are_counted_and_logged_once_per_peer_per_interval(broker, ctx, caplog):
    caplog.set_level("WARNING", logger="taskring.broker.server")
    bad = client(ctx, broker, b"c-flood")
    oversize = {"seq": 1, "tasks": [task(payload=b"x" * (p.DEFAULT_LIMITS.max_payload_bytes + 1))]}
    for _ in range(5):
        bad.send(p.SUBMIT, oversize)
    # (each reply waited for: a fixed number of turns missed the last on a loaded machine)
    replies = [bad.recv(broker, 0.0) for _ in range(5)]
    errors = [m for m in replies if m[0] == p.ERROR]
    # Every violation is answered with an error naming the limit, and counted...
    assert len(errors) == 5
    assert all("max_payload_bytes" in body["message"] for _, body in errors)
    assert broker.rejected[p.E_TOO_LARGE] == 5
    # ...but logged once for this peer in this interval
    assert len([r for r in caplog.records if "c-flood" in r.getMessage()]) == 1
    c = client(ctx, broker)
    c.request(p.STATUS, {})
    assert c.expect(broker, 0.0, p.REPLY)["broker"]["rejected"] == {p.E_TOO_LARGE: 5}


def test_watches_are_bounded(broker, ctx, monkeypatch):
    monkeypatch.setattr("taskring.broker.server.MAX_WATCHED_TASKS", 2)
    c = client(ctx, broker)
    c.request(p.SUBMIT, {"tasks": [task() for _ in range(3)], "watch": True})
    ids = c.expect(broker, 0.0, p.REPLY)["ids"]
    assert sorted(broker.watchers) == ids[:2]


# ---------------------------------------------------------------- cancel


def cancel(c: Peer, broker: Broker, *ids: int) -> list[str | None]:
    c.request(p.CANCEL, {"ids": list(ids)})
    return list(c.expect(broker, 0.0, p.REPLY)["states"])


def kinds(broker: Broker, task_id: int) -> list[str]:
    return [k for (k,) in db_rows(broker, "SELECT kind FROM events WHERE task_id = ?", task_id)]


def test_a_cancelled_queued_task_is_never_dispatched(broker, ctx):
    # Given two queued tasks and no worker yet
    c = client(ctx, broker)
    first, second = submit(c, broker, 0.0, [task(), task()])
    # When the first is cancelled, along with an id that does not exist
    assert cancel(c, broker, first, 999) == ["cancelled", None]
    # Then a worker that joins gets only the second, and the log says why
    w = worker(ctx, broker, 0.0, capacity=4)
    assert [t["id"] for t in w.expect(broker, 0.0, p.TASK)["tasks"]] == [second]
    assert [m for m in w.drain(broker, 0.0) if m[0] == p.TASK] == []
    assert kinds(broker, first) == ["submitted", "cancelled"]
    c.request(p.STATUS, {})
    assert c.expect(broker, 0.0, p.REPLY)["states"] == {"cancelled": 1, "running": 1}


def test_a_cancelled_running_task_hears_stale_and_its_result_is_refused(broker, ctx):
    # Given a running task a client watches
    c = client(ctx, broker)
    w = worker(ctx, broker, 0.0, capacity=1)
    c.request(p.SUBMIT, {"tasks": [task()], "watch": True})
    (task_id,) = c.expect(broker, 0.0, p.REPLY)["ids"]
    w.expect(broker, 0.0, p.TASK)
    # When it is cancelled
    c.request(p.CANCEL, {"ids": [task_id]})
    replies = dict(c.drain(broker, 0.0))
    # Then the watcher hears it ended, cancelled
    assert replies[p.REPLY]["states"] == ["cancelled"]
    assert [(v["id"], v["state"]) for v in replies[p.NOTIFY]["tasks"]] == [(task_id, "cancelled")]
    # ... its slot stays taken while the worker still runs it
    (waiting,) = submit(c, broker, 0.0, [task()])
    assert [m for m in w.drain(broker, 0.0) if m[0] == p.TASK] == []
    # ... the worker's next checkpoint and its result are answered stale, and change nothing
    w.request(p.CHECKPOINT, checkpoints(task_id, 1, (1, "half")))
    assert w.expect(broker, 0.0, p.ACK)["stale"] == [task_id]
    result(w, task_id, 1)
    assert w.expect(broker, 0.0, p.ACK)["stale"] == [task_id]
    # ... and once the worker has let it go, the slot takes the next task
    assert [t["id"] for t in w.expect(broker, 0.0, p.TASK)["tasks"]] == [waiting]
    assert db_rows(broker, "SELECT state, checkpoint_no FROM tasks WHERE id = ?", task_id) == [
        ("cancelled", 0)
    ]
    assert kinds(broker, task_id) == ["submitted", "leased", "cancelled", "stale", "stale"]


def running_task(broker: Broker, ctx: zmq.Context[Any]) -> tuple[Peer, Peer, int]:
    """A client, and a worker running the client's one task."""
    c = client(ctx, broker)
    w = worker(ctx, broker, 0.0)
    (task_id,) = submit(c, broker, 0.0, [task()])
    w.expect(broker, 0.0, p.TASK)
    return c, w, task_id


def test_the_worker_s_heartbeats_name_a_cancelled_attempt_it_still_runs(broker, ctx):
    # Given a running task, cancelled
    c, w, task_id = running_task(broker, ctx)
    assert cancel(c, broker, task_id) == ["cancelled"]
    # When the worker reports it still runs it, and the broker's next heartbeat is due
    w.send(p.HEARTBEAT, {"dseq": 1, "held": [[task_id, 1]]})
    beats = [body for command, body in w.drain(broker, 60.0) if command == p.HEARTBEAT]
    # Then the broker names it stale, so its task can stop before its next checkpoint
    assert beats and beats[-1]["stale"] == [[task_id, 1]]


def test_a_finished_task_is_not_cancelled(broker, ctx):
    c, w, task_id = running_task(broker, ctx)
    result(w, task_id, 1)
    w.expect(broker, 0.0, p.ACK)
    assert cancel(c, broker, task_id) == ["succeeded"]
    assert kinds(broker, task_id) == ["submitted", "leased", "succeeded"]


def test_a_cancel_read_in_the_same_turn_as_the_result_leaves_the_task_succeeded(broker, ctx):
    # Given a running task
    c, w, task_id = running_task(broker, ctx)
    # When its result and then a cancel reach the broker before its next turn
    result(w, task_id, 1)
    time.sleep(0.05)
    c.request(p.CANCEL, {"ids": [task_id]})
    time.sleep(0.05)
    broker.poll_once(now=0.0, timeout_s=0.5)
    # Then the result, first, wins: one final event, and the cancel says it came too late
    assert c.expect(broker, 0.0, p.REPLY)["states"] == ["succeeded"]
    assert w.expect(broker, 0.0, p.ACK)["stale"] == []
    assert kinds(broker, task_id) == ["submitted", "leased", "succeeded"]


@pytest.mark.parametrize("key", ["k", None], ids=["set-aside-for-its-owner", "in-the-queue"])
def test_a_cancelled_task_waiting_in_memory_is_dropped(broker, ctx, key):
    # Given a worker of capacity 1 running one task, and two more waiting in memory
    c = client(ctx, broker)
    w = worker(ctx, broker, 0.0, capacity=1)
    first, second, third = submit(c, broker, 0.0, [task(key=key) for _ in range(3)])
    assert [t["id"] for t in w.expect(broker, 0.0, p.TASK)["tasks"]] == [first]
    w.drain(broker, 0.0)
    # When the second is cancelled and the first finishes
    assert cancel(c, broker, second) == ["cancelled"]
    result(w, first, 1)
    # Then the freed slot goes to the third
    got = [b for cmd, b in w.drain(broker, 0.0) if cmd == p.TASK]
    assert [t["id"] for b in got for t in b["tasks"]] == [third]


def test_a_cancelled_task_still_in_flight_to_its_worker_keeps_its_slot(broker, ctx):
    # Given a worker of one slot whose task is cancelled before the worker read its TASK
    c = client(ctx, broker)
    w = worker(ctx, broker, 0.0, capacity=1)
    (first,) = submit(c, broker, 0.0, [task()])
    assert w.expect(broker, 0.0, p.TASK)["dseq"] == 1
    assert cancel(c, broker, first) == ["cancelled"]
    # When a heartbeat sent before that TASK arrived says the worker holds nothing
    w.send(p.HEARTBEAT, {"dseq": 0, "held": []})
    w.drain(broker, 0.0)
    (second,) = submit(c, broker, 0.0, [task()])
    # Then the slot stays taken: the worker will run the cancelled task
    assert [m for m in w.drain(broker, 0.0) if m[0] == p.TASK] == []
    # And once a heartbeat shows it saw the TASK and let it go, the slot is free
    w.send(p.HEARTBEAT, {"dseq": 1, "held": []})
    assert [t["id"] for t in w.expect(broker, 0.0, p.TASK)["tasks"]] == [second]


def test_ids_of_cancelled_tasks_nobody_runs_do_not_pile_up_in_memory(tmp_path, ctx):
    # Given 200 queued tasks no worker runs, let go from memory
    b = make_broker(tmp_path, ctx, queue_window=40)
    try:
        c = client(ctx, b)
        w = worker(ctx, b, 0.0, capacity=2)
        ids = submit(c, b, 0.0, [task(name="t.nobody") for _ in range(200)])
        w.drain(b, 0.0)
        # When all are cancelled
        assert set(cancel(c, b, *ids)) == {"cancelled"}
        w.drain(b, 0.0, turns=20)
        # Then the broker keeps no list of them: it read the queue again instead
        assert len(b.placement._forgotten) <= b.settings.queue_window
        # And a task of a name the worker runs still goes out
        (runs,) = submit(c, b, 0.0, [task()])
        assert [t["id"] for t in w.expect(b, 0.0, p.TASK)["tasks"]] == [runs]
    finally:
        b.close()


def test_a_broker_that_cannot_bind_leaves_no_checkpoint_thread_or_log_open(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    # Given a broker serving a port, in normal mode (which checkpoints from a thread)
    (tmp_path / "a").mkdir()
    first = make_broker(tmp_path / "a", ctx)
    before = {t for t in threading.enumerate() if t.name == "taskring-checkpoint"}
    try:
        # When a second broker, on another log, asks for the same port
        with pytest.raises(zmq.ZMQError):
            make_broker(tmp_path, ctx, endpoint=first.endpoint)
        # Then its checkpoint thread is gone, and its log closed: the WAL went with it
        after = {t for t in threading.enumerate() if t.name == "taskring-checkpoint"}
        assert after == before
        assert not (tmp_path / "tasks.db-wal").exists()
    finally:
        first.close()


@pytest.mark.usefixtures("short_lock_wait")
def test_a_second_broker_on_the_same_log_is_refused_and_changes_nothing(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    # Given a broker serving a log, with one task queued
    first = make_broker(tmp_path, ctx)
    try:
        c = client(ctx, first)
        (queued,) = submit(c, first, 0.0, [task()])
        # When a second broker, on another endpoint, opens the same log
        with pytest.raises(ownership.LogInUse) as refused:
            make_broker(tmp_path, ctx)
        # Then it is refused with who holds the log, before it read or wrote anything
        assert str(refused.value) == (
            f"task log {str(tmp_path / 'tasks.db')!r} is in use by another broker "
            f"(pid {os.getpid()}); stop that one first, or give this one another --db"
        )
        # And the first still serves: its task is there, and it takes another
        (second,) = submit(c, first, 0.0, [task()])
        assert second == queued + 1
    finally:
        first.close()
    # And once the first has closed, a broker opens the log and finds both tasks
    again = make_broker(tmp_path, ctx)
    try:
        assert again.counts[p.QUEUED] == 2
    finally:
        again.close()


@pytest.mark.usefixtures("short_lock_wait")
def test_a_broker_that_fails_after_opening_its_log_lets_go_of_it(
    tmp_path: Path, ctx: zmq.Context[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a log whose names cannot be read back at start (a bug, say)

    def broken(self: Any) -> dict[str, int]:
        raise RuntimeError("cannot read names")

    with monkeypatch.context() as m:
        m.setattr(server.Store, "known_names", broken)
        # When a broker starts on it, Then it fails
        with pytest.raises(RuntimeError, match="cannot read names"):
            make_broker(tmp_path, ctx)
    # And it closed the log and let go of its lock: the next broker starts
    make_broker(tmp_path, ctx).close()


def test_a_task_id_given_out_again_is_not_leased_as_the_attempt_a_worker_still_holds(broker, ctx):
    # Given a worker that still holds task 1 attempt 1 from before the log went back
    # (restored from a copy, say), and a client whose new task gets id 1 again
    c = client(ctx, broker)
    w = worker(ctx, broker, 0.0, b"w1", capacity=2, held=[[1, 1]])
    (task_id,) = submit(c, broker, 0.0, [task()])
    assert task_id == 1
    # Then the new task is not leased to that worker as attempt 1 while it holds that
    assert db_rows(broker, "SELECT state FROM tasks WHERE id = 1") == [("queued",)]
    # When the worker reports the result of what it ran as task 1 attempt 1
    result(w, 1, 1, value="the old task's result")
    # Then that result is recorded as stale, not applied to the new task
    assert w.expect(broker, 0.0, p.ACK)["stale"] == [1]
    assert db_rows(broker, "SELECT result FROM tasks WHERE id = 1") == [(None,)]
    # And if that ACK was lost and the worker sends the old result again, it is
    # still stale: the new task is not leased as (1, 1) until the worker's
    # heartbeat no longer lists the pair
    result(w, 1, 1, value="the old task's result")
    assert w.expect(broker, 0.0, p.ACK)["stale"] == [1]
    assert db_rows(broker, "SELECT state, result FROM tasks WHERE id = 1") == [("queued", None)]
    # And once it does, the new task goes out, and its own result counts
    w.send(p.HEARTBEAT, {"dseq": 0, "held": []})
    sent = w.expect(broker, 0.0, p.TASK)["tasks"]
    assert [(t["id"], t["attempt"]) for t in sent] == [(1, 1)]
    result(w, 1, 1, value="the new task's result")
    assert w.expect(broker, 0.0, p.ACK)["stale"] == []
    assert db_rows(broker, "SELECT state, result FROM tasks WHERE id = 1") == [
        ("succeeded", p.pack("the new task's result"))
    ]


@pytest.mark.usefixtures("short_lock_wait")
def test_the_broker_takes_its_log_s_lock_file_again_within_a_second(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    # Given a serving broker whose log's lock file is deleted
    b = make_broker(tmp_path, ctx)
    try:
        b.poll_once(now=0.0, timeout_s=0)
        (tmp_path / "tasks.db.lock").unlink()
        # When it runs a turn a second later
        b.poll_once(now=server.OWNERSHIP_CHECK_S, timeout_s=0)
        # Then the file is back and held: a second broker on the log is refused
        assert (tmp_path / "tasks.db.lock").exists()
        with pytest.raises(ownership.LogInUse):
            make_broker(tmp_path, ctx)
    finally:
        b.close()


# ---------------------------------------------------------------- prune


def finished_tasks(c: Peer, w: Peer, broker: Broker, n: int) -> list[int]:
    """n tasks submitted, run by `w` and succeeded."""
    ids = submit(c, broker, 0.0, [task() for _ in range(n)])
    assert sorted(t["id"] for t in w.expect(broker, 0.0, p.TASK)["tasks"]) == ids
    for task_id in ids:
        result(w, task_id, 1)
        w.expect(broker, 0.0, p.ACK)
    return ids


def test_prune_deletes_what_ended_over_an_hour_ago_and_nothing_live(broker, ctx, monkeypatch):
    # Given two tasks that succeeded and one still running
    c, w = client(ctx, broker), worker(ctx, broker, 0.0, capacity=2)
    done = finished_tasks(c, w, broker, 2)
    (running,) = submit(c, broker, 0.0, [task()])
    w.expect(broker, 0.0, p.TASK)
    # When, two hours later by the broker's clock, a client prunes what ended an hour ago
    later = time.time() + 7200
    monkeypatch.setattr(server, "wall_clock", lambda: later)
    c.request(p.PRUNE, {"before": later - 3600})
    reply = c.expect(broker, 0.0, p.REPLY)
    # Then both finished tasks are gone, and the scan reached the end of the log
    assert (reply["deleted"], reply["next"]) == (2, None)
    c.request(p.GET, {"ids": [*done, running]})
    views = c.expect(broker, 0.0, p.REPLY)["tasks"]
    assert views[:2] == [None, None] and views[2]["state"] == "running"
    c.request(p.STATUS, {})
    assert c.expect(broker, 0.0, p.REPLY)["states"] == {"running": 1}
    # And the running task still finishes, under an id never given out before
    result(w, running, 1)
    w.expect(broker, 0.0, p.ACK)
    assert db_rows(broker, "SELECT id, state FROM tasks") == [(running, "succeeded")]
    assert submit(c, broker, 0.0, [task()]) == [running + 1]


def test_a_prune_of_what_ended_within_the_hour_is_refused_and_deletes_nothing(broker, ctx):
    c, w = client(ctx, broker), worker(ctx, broker, 0.0, capacity=2)
    finished_tasks(c, w, broker, 2)
    seq = c.request(p.PRUNE, {"before": time.time() - 600})
    error = c.expect(broker, 0.0, p.ERROR)
    assert (error["seq"], error["code"]) == (seq, p.E_BAD_BODY)
    assert "at least 3600 s ago" in error["message"]
    assert db_rows(broker, "SELECT count(*) FROM tasks WHERE state = 'succeeded'") == [(2,)]


def test_a_turn_reads_one_prune_and_leaves_the_rest_for_the_next(broker, ctx, monkeypatch):
    # Given two GETs, two PRUNEs and a GET waiting in the broker's socket
    later = time.time() + 7200
    monkeypatch.setattr(server, "wall_clock", lambda: later)
    c = client(ctx, broker)
    for command in (p.GET, p.GET, p.PRUNE, p.PRUNE, p.GET):
        c.request(command, {"ids": [1]} if command == p.GET else {"before": later - 3600})
    time.sleep(0.3)  # loopback delivers them well within this
    # When the broker runs turns until it has read all five
    read = []
    while sum(read) < 5:
        read.append(broker.poll_once(now=0.0, timeout_s=0.05))
    # Then each PRUNE ended its turn's reading (a prune can take 10 ms or more),
    # and the other messages still came several to a turn
    assert read == [3, 1, 1]
    replies = [body for cmd, body in c.drain(broker, 0.0) if cmd == p.REPLY]
    assert sorted(r["seq"] for r in replies) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- one name, two processes


def test_a_heartbeat_of_a_second_process_of_a_name_is_ignored_and_told_to_stop(broker, ctx):
    # Given w1, registered by the process of incarnation "a", running task 1
    w = worker(ctx, broker, 0.0, incarnation="a")
    c = client(ctx, broker)
    (task_id,) = submit(c, broker, 0.0, [task()])
    dseq = w.expect(broker, 0.0, p.TASK)["dseq"]
    # When a HEARTBEAT in that name comes from a process of incarnation "b", holding nothing
    w.send(p.HEARTBEAT, {"dseq": dseq, "held": [], "incarnation": "b"})
    # Then it is answered name-taken for "b", and task 1's lease stands (taken as
    # w1's, that heartbeat would have lost it in transit)
    error = w.expect(broker, 2.0, p.ERROR)
    assert (error["seq"], error["code"], error["incarnation"]) == (None, p.E_NAME_TAKEN, "b")
    # (nor does it count as a sign of w1's life: if "a" died, w1 must expire)
    assert broker.workers["w1"].last_heard == 0.0
    assert "'w1' is taken by another live process (pid 1 on h)" in error["message"]
    assert db_rows(broker, "SELECT state, attempt FROM tasks") == [("running", 1)]
    # And the registered process's heartbeats, and one with no incarnation (a worker of
    # an earlier version), are taken as they were
    for extra in ({"incarnation": "a"}, {}):
        w.send(p.HEARTBEAT, {"dseq": dseq, "held": [[task_id, 1]], **extra})
    assert [m for m in w.drain(broker, 0.0) if m[0] == p.ERROR] == []
    assert broker.workers["w1"].leases.keys() == {task_id}


def test_a_process_that_registers_again_after_another_replaced_it_is_told_to_stop(broker, ctx):
    # Given w1 registered by process "a", then by process "b" (a restart, as far as
    # the broker can tell: "a" may be dead)
    worker(ctx, broker, 0.0, incarnation="a")
    worker(ctx, broker, 0.0, incarnation="b")
    # When "a" registers again: it is alive, beside "b"
    a = Peer(ctx, broker.endpoint, b"w1", p.PROTOCOL_WORKER)
    a.request(p.READY, ready_body(incarnation="a", pid=2))
    # Then it gets name-taken for "a", and "b" stays registered
    error = a.expect(broker, 0.0, p.ERROR)
    assert (error["code"], error["incarnation"]) == (p.E_NAME_TAKEN, "a")
    assert broker.workers["w1"].incarnation == "b"
    # When "b" falls silent past the liveness window, Then the name is free again,
    # for "a" too
    broker.poll_once(now=100.0, timeout_s=0.01)
    assert "w1" not in broker.workers
    a.request(p.READY, ready_body(incarnation="a", pid=2))
    assert a.expect(broker, 100.0, p.WELCOME)
    assert broker.workers["w1"].incarnation == "a"


def test_a_replaced_process_may_take_the_name_once_the_registered_one_fell_silent(broker, ctx):
    # Given w1 registered by process "a", then replaced by process "b", which then dies
    worker(ctx, broker, 0.0, incarnation="a")
    worker(ctx, broker, 0.0, incarnation="b")
    # When "a" registers again two heartbeats later, before "b" expires
    a = Peer(ctx, broker.endpoint, b"w1", p.PROTOCOL_WORKER)
    a.request(p.READY, ready_body(incarnation="a", pid=2))
    # Then it is welcomed: "b" no longer counts as alive, and the name is served
    assert a.expect(broker, 2.5, p.WELCOME)
    assert broker.workers["w1"].incarnation == "a"
