"""Fuzzing the broker over the wire while well-behaved peers keep working (issue 5, item 5).

A real broker process on a loopback TCP port, a real worker process and a
well-behaved client thread run throughout. Meanwhile hypothesis sends
thousands of hostile messages from several DEALER identities (random frames,
valid headers with garbage bodies, the right fields with the wrong types,
forged RESULTs, CHECKPOINTs, heartbeats and READYs naming the good client's
running tasks, duplicate and out-of-order seqs) and opens raw TCP connections
that write garbage, cut greetings, huge length prefixes and ZMTP/1.0 messages.

Then: the broker is alive and answers STATUS, every good task succeeded with
its own result, the log passes `PRAGMA integrity_check`, every state change in
the log was made by the real worker (forged messages appear only as `stale`
events), every task a fuzz peer created comes from a SUBMIT that decodes, and
the broker's log stayed small.

Shrinking is off: the broker's state carries over between examples, so a
smaller replay proves nothing. After each batch a probe asks for STATUS, so
the example hypothesis prints is the batch after which the broker stopped
answering. The tests at the end pin down what the fuzz found, one input each.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cluster import Cluster, wait_for
from support import fuzzwire as fw
from taskring import protocol as p
from taskring.broker import Broker, BrokerSettings
from taskring.broker.placement import MAX_RING_WEIGHT
from taskring.broker.server import COMPLAINT_INTERVAL_S
from taskring.client import Client

pytestmark = [
    pytest.mark.timeout(180),
    # A failing batch is printed whole, however long: it is the input to replay.
    pytest.mark.filterwarnings(
        "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"
    ),
]

REAL_WORKER = "good-worker"
EXAMPLES = 200
HEARTBEAT_S = 0.5
LIVENESS = 4
# DEALER identities of the fuzz: imposters of other workers and of clients. Never
# the real worker's name: a plaintext ROUTER lets that take over its connection.
POOL = (
    b"w-imposter-1",
    b"w-imposter-2",
    b"good-worker-2",
    b"GOOD-WORKER",
    b"good-worker\x00",
    b"\xff\xfeimposter",
    b"c-" + b"0" * 32,
    b"c-fuzz",
    b"y" * 255,
)
CRUNCH_N, CRUNCH_EVERY = 3_000_000, 300_000
LOG_LIMIT_BYTES = 2 * 1024 * 1024
# Kinds of event that change a task's state or checkpoint.
CHANGES = ("leased", "adopted", "checkpointed", "succeeded", "failed", "retried", "dead")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GoodClient(threading.Thread):
    """Submits small batches until told to stop; remembers what each task must return."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(name="good-client", daemon=True)
        self.endpoint = endpoint
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ids: list[int] = []
        self.expected: dict[int, Any] = {}
        self.crunch: list[int] = []
        self.running: list[tuple[int, int]] = []  # (id, attempt) leased to the real worker
        self.identity = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.endpoint, timeout_s=30) as client:
                self.identity = client.identity
                turn = 0
                while not self.stop.is_set():
                    args = [(10 * turn + k, k) for k in range(10)]
                    key = (lambda a: f"key-{a[0] % 7}") if turn % 2 else None
                    ids = client.submit_many("tt_tasks.add", args, key=key)
                    found = {i: a + b for i, (a, b) in zip(ids, args, strict=True)}
                    # Every fourth turn a task that runs a while and checkpoints.
                    long = [(CRUNCH_N, CRUNCH_EVERY)] if turn % 4 == 0 else []
                    long_ids = client.submit_many("tt_tasks.crunch", long) if long else []
                    found.update(dict.fromkeys(long_ids, CRUNCH_N))
                    with self.lock:
                        self.ids.extend(found)
                        self.crunch.extend(long_ids)
                        self.expected.update(found)
                    turn += 1
                    self.stop.wait(0.05)
        except BaseException as e:  # reported by the test, not lost in a thread
            self.error = e

    def pick(self, ref: fw.TaskRef | fw.HeldAttempt) -> int:
        """A task id or attempt for a placeholder in a fuzz message."""
        with self.lock:
            running = self.running
            if isinstance(ref, fw.HeldAttempt):
                held = running[ref.index % len(running)][1] if running else 1
                return max(0, held + ref.delta)
            if ref.among == "running" and running:
                return running[ref.index % len(running)][0]
            ids = {"recent": self.ids[-32:], "long": self.crunch[-2:]}.get(ref.among, self.ids)
            return ids[ref.index % len(ids)] if ids else ref.index + 1


@dataclasses.dataclass
class Ledger:
    """What the fuzz sent, for the report and for accounting of the tasks it created."""

    messages: int = 0
    dropped: int = 0
    raw_conns: int = 0
    raw_bytes: int = 0
    valid: collections.Counter[bytes] = dataclasses.field(default_factory=collections.Counter)
    forged: collections.Counter[bytes] = dataclasses.field(default_factory=collections.Counter)
    # (identity, seq) -> most tasks one valid SUBMIT with that seq carried; identity
    # None for a ZMTP/1.0 peer without one (the ROUTER makes one up).
    submits: dict[tuple[bytes | None, int], int] = dataclasses.field(default_factory=dict)
    answers: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


def expand(
    identity: bytes | None, msg: fw.Msg, good: GoodClient, ledger: Ledger
) -> list[list[bytes]]:
    """The frames to send for `msg`, after the two rewrites that keep the test meaningful.

    A valid READY registers a worker, and the broker leases any task to any
    worker with credit: an imposter that never answers would cost good tasks
    attempts through the front door, which is no forgery. So every valid READY
    claims as many held tasks as its capacity (credit 0) and is followed at once
    by a draining HEARTBEAT (credit 0 until the next READY).
    """
    frames = [fw.resolve(f, good.pick) for f in msg.frames]
    packed = [p.pack(f) if isinstance(f, dict) else f for f in frames]
    out = [packed]
    try:
        envelope = p.open_envelope([identity or b"\x00auto", *packed])
        decode = {
            p.SUBMIT: p.decode_submit,
            p.READY: p.decode_ready,
            p.RESULT: p.decode_result,
            p.CHECKPOINT: p.decode_checkpoint,
            p.HEARTBEAT: p.decode_worker_heartbeat,
        }.get(envelope.command)
        request = decode(envelope.body) if decode else None
    except p.ProtocolError:
        return out
    ledger.valid[envelope.command] += 1
    if isinstance(request, p.Submit):
        assert not any(t.name.startswith("tt_tasks.") for t in request.tasks)
        key = (identity, request.seq)
        ledger.submits[key] = max(ledger.submits.get(key, 0), len(request.tasks))
    elif isinstance(request, p.Ready):
        assert not any(n.startswith("tt_tasks.") for n in request.tasks)
        held = list(dict.fromkeys(request.held))
        filler = 2**62
        while len(held) < request.capacity:
            if (filler, 1) not in held:
                held.append((filler, 1))
            filler += 1
        body = dict(envelope.body) | {"held": [list(pair) for pair in held]}
        beat = {"draining": True, "held": body["held"]}
        out = [
            [p.PROTOCOL_WORKER, p.READY, p.pack(body)],
            [p.PROTOCOL_WORKER, p.HEARTBEAT, p.pack(beat)],
        ]
    elif isinstance(request, p.Result):
        ledger.forged[p.RESULT] += sum(1 for o in request.results if o.id in good.expected)
    elif isinstance(request, p.Checkpoints):
        ledger.forged[p.CHECKPOINT] += sum(1 for c in request.checkpoints if c.id in good.expected)
    return out


class Fuzzer:
    """The fuzz peers: a pool of DEALERs, one-off DEALERs and raw TCP connections."""

    def __init__(self, port: int, good: GoodClient) -> None:
        self.port = port
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.good = good
        self.ledger = Ledger()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.pool = [self._dealer(identity) for identity in POOL]
        self.spy_socket = self._dealer(b"fuzz-spy")
        self.probe_seq = 0

    def _dealer(self, identity: bytes) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.connect(self.endpoint)
        return sock

    def send(self, messages: list[fw.Msg]) -> bool:
        """Send the batch, then a STATUS behind it on every socket it used.

        Messages of one socket are handled in order, so once each of those
        STATUSes is answered the broker has handled the whole batch: True. False
        if one stays unanswered, which makes the batch hypothesis prints the one
        after which the broker stopped answering.
        """
        fresh: dict[bytes, zmq.Socket[Any]] = {}
        used: dict[int, zmq.Socket[Any]] = {}
        try:
            for msg in messages:
                if isinstance(msg.sender, int):
                    identity, sock = POOL[msg.sender], self.pool[msg.sender]
                else:
                    identity = msg.sender
                    if identity not in fresh:
                        fresh[identity] = self._dealer(identity)
                    sock = fresh[identity]
                used[id(sock)] = sock
                for frames in expand(identity, msg, self.good, self.ledger):
                    self.ledger.messages += 1
                    try:
                        sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        self.ledger.dropped += 1
            return self.answers_status(*used.values())
        finally:
            for sock in fresh.values():
                sock.close(linger=0)

    def raw(self, conn: fw.RawConn) -> bool:
        """Write the connection's bytes and close it; False if the broker stopped answering.

        A connection that speaks ZMTP/1.0 ends with a STATUS, and is read until
        its REPLY comes back: then the broker has handled the messages before it.
        """
        data = bytearray(conn.prefix)
        probe = b""
        if conn.identity is not None:
            data += fw.zmtp10([conn.identity])
            for msg in conn.messages:
                for frames in expand(conn.identity or None, msg, self.good, self.ledger):
                    self.ledger.messages += 1
                    data += fw.zmtp10(frames)
            self.probe_seq += 1
            seq = 2**62 + self.probe_seq
            data += fw.zmtp10(p.frames(p.PROTOCOL_CLIENT, p.STATUS, {"seq": seq}))
            probe = b"\xa3seq\xcf" + seq.to_bytes(8, "big")  # how the REPLY's seq is packed
        self.ledger.raw_conns += 1
        self.ledger.raw_bytes += len(data)
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        except OSError as e:
            raise AssertionError(f"the broker refused a TCP connection: {e}") from e
        received = bytearray()
        with s, contextlib.suppress(OSError):  # the broker may hang up on garbage
            s.sendall(data)
            while probe and probe not in received:
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
        return probe in received

    def spy(self) -> None:
        """Ask which tasks run now, and under which attempt: the fencing tokens to forge."""
        self.probe_seq += 1
        seq = 2**62 + self.probe_seq
        body = {"seq": seq, "state": p.RUNNING, "limit": 100}
        self.spy_socket.send_multipart(p.frames(p.PROTOCOL_CLIENT, p.TASKS, body))
        while self.spy_socket.poll(10_000):
            command, reply = p.decode_reply(self.spy_socket.recv_multipart(), p.PROTOCOL_CLIENT)
            if command == p.REPLY and reply.get("seq") == seq:
                running = [(t["id"], t["attempt"]) for t in reply["tasks"]]
                with self.good.lock:
                    self.good.running = running
                return
        raise AssertionError("the broker did not answer TASKS")

    def extremes(self) -> None:
        """The few inputs too big to generate often: sent once, before the random ones."""
        sock = self.pool[0]
        limit = p.DEFAULT_LIMITS.max_message_bytes
        # One frame above ZMQ_MAXMSGSIZE: libzmq drops the connection, the DEALER reconnects.
        sock.send_multipart([p.PROTOCOL_CLIENT, p.STATUS, b"\x80" * (limit + 1)])
        # Each frame below it, all of them above max_message_bytes: rejected as too-large.
        sock.send_multipart([p.PROTOCOL_CLIENT, p.STATUS, b"\x80" * (limit - 5)])
        # max_batch forged outcomes for the good client's tasks, from an imposter.
        ids = list(self.good.ids) or [1]
        results = [
            {"id": ids[i % len(ids)], "attempt": 1, "ok": True, "value": p.pack("forged")}
            for i in range(p.DEFAULT_LIMITS.max_batch)
        ]
        sock.send_multipart(p.frames(p.PROTOCOL_WORKER, p.RESULT, {"seq": 1, "results": results}))
        self.ledger.messages += 3
        self.ledger.forged[p.RESULT] += len(results)

    def answers_status(self, *socks: zmq.Socket[Any], timeout_s: float = 10.0) -> bool:
        """True once the broker answers a STATUS sent on each socket, False after `timeout_s`."""
        waiting = {}
        for sock in socks:
            self.probe_seq += 1
            seq = 2**62 + self.probe_seq  # above the seqs the fuzz reuses
            sock.send_multipart(p.frames(p.PROTOCOL_CLIENT, p.STATUS, {"seq": seq}))
            waiting[seq] = sock
        deadline = time.monotonic() + timeout_s
        for seq, sock in waiting.items():
            while sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                if self._read(sock) == seq:
                    break
            else:
                return False
        return True

    def drain(self) -> None:
        """Read what the broker sent the pool since the last batch."""
        for sock in self.pool:
            while sock.poll(0):
                self._read(sock)

    def _read(self, sock: zmq.Socket[Any]) -> int | None:
        """Count one message by command and error code; the seq of a REPLY to STATUS."""
        parts = sock.recv_multipart()
        label = parts[1].decode(errors="replace") if len(parts) > 1 else "?"
        body: Any = {}
        with contextlib.suppress(p.ProtocolError, IndexError):
            body = p.unpack(parts[2])
        if label == "ERROR" and isinstance(body, dict):
            label += f":{body.get('code')}"
        self.ledger.answers[label] += 1
        if label == "REPLY" and isinstance(body, dict) and "workers" in body:
            return body.get("seq")  # type: ignore[no-any-return]
        return None

    def close(self) -> None:
        for sock in [*self.pool, self.spy_socket]:
            sock.close(linger=0)
        self.ctx.destroy(linger=0)


def test_hostile_wire_input_changes_nothing_and_good_peers_finish(cluster: Cluster) -> None:
    # Given a broker on a TCP port, a real worker and a client submitting throughout
    port = free_port()
    cluster.endpoint = f"tcp://127.0.0.1:{port}"
    cluster.heartbeat_s, cluster.liveness = HEARTBEAT_S, LIVENESS
    broker = cluster.start_broker("--synchronous", "normal")
    cluster.start_worker(REAL_WORKER, concurrency=4)
    cluster.wait_workers(REAL_WORKER)
    good = GoodClient(cluster.endpoint)
    good.start()
    wait_for(lambda: good.ids or good.error, 10, "the good client's first tasks")
    fuzzer = Fuzzer(port, good)
    avoid = frozenset({REAL_WORKER.encode(), good.identity, *POOL, b"fuzz-spy"})
    started = time.monotonic()

    failures: list[str] = []

    # When hypothesis sends its batches of hostile messages and raw connections
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        messages=fw.batches(len(POOL), avoid),
        raws=st.lists(fw.raw_conns(), max_size=3),
    )
    def fuzz(messages: list[fw.Msg], raws: list[fw.RawConn]) -> None:
        # Hypothesis runs a failing example again to print it: fail the same way.
        assert not failures, failures[0]
        try:
            fuzzer.drain()
            fuzzer.spy()
            assert fuzzer.send(messages), "the broker stopped answering"
            for conn in raws:
                answered = fuzzer.raw(conn)
                assert answered or conn.identity is None, "the broker stopped answering"
            assert broker.poll() is None, "the broker died"
            assert good.error is None, f"the good client failed: {good.error!r}"
        except AssertionError as e:
            code = broker.poll()
            failures.append(f"{e} (broker exit code {code}; its log is printed below)")
            raise

    try:
        fuzzer.extremes()
        fuzz()
        fuzz_s = time.monotonic() - started
        # Then the good client's tasks all succeed with their own results
        good.stop.set()
        good.join(40)
        assert good.error is None, f"the good client failed: {good.error!r}"
        with cluster.client(timeout_s=30) as client:
            done = client.wait(good.ids, timeout=60)
            status = client.broker_status()
        wrong = {i: (t.state, t.value) for i, t in done.items() if t.value != good.expected[i]}
        assert not wrong, f"good tasks without their result: {dict(list(wrong.items())[:10])}"
        assert {t.worker for t in done.values()} == {REAL_WORKER}
        # ... and the broker is alive and still answers STATUS
        assert broker.poll() is None
        assert REAL_WORKER in {w["name"] for w in status["workers"]}
        time.sleep(HEARTBEAT_S)
        fuzzer.drain()
    finally:
        good.stop.set()
        fuzzer.close()
    assert cluster.stop(cluster.workers[REAL_WORKER]) == 0
    assert cluster.stop(broker) == 0

    ledger = fuzzer.ledger
    with sqlite3.connect(f"file:{cluster.db}?mode=ro", uri=True) as db:
        # ... the log is intact
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        # ... every change of state or checkpoint was made by the real worker
        by_other = db.execute(
            f"SELECT task_id, kind, attempt, worker, detail FROM events"
            f" WHERE kind IN ({','.join('?' * len(CHANGES))}) AND worker IS NOT ?",
            (*CHANGES, REAL_WORKER),
        ).fetchall()
        assert not by_other, f"changes by other workers: {by_other[:10]}"
        kinds = dict(db.execute("SELECT kind, count(*) FROM events GROUP BY kind").fetchall())
        # forged messages that named the very attempt the real worker held at the time
        against_lease = db.execute(
            "SELECT count(*) FROM events WHERE kind = 'stale' AND detail LIKE"
            " '% of attempt ' || attempt || ' refused; task is running, attempt '"
            " || attempt || ' held by ' || ?",
            (REAL_WORKER,),
        ).fetchone()[0]
        assert against_lease > 0, "no forged message named a live lease: the fuzz missed its aim"
        stale_by = dict(
            db.execute(
                "SELECT worker, count(*) FROM events WHERE kind = 'stale' GROUP BY worker"
            ).fetchall()
        )
        # ... each good task was leased and succeeded once per attempt, as the real worker did it
        good_client = good.identity.hex()
        rows = db.execute(
            "SELECT t.id, t.attempt, t.checkpoint, t.checkpoint_no,"
            " (SELECT count(*) FROM events e WHERE e.task_id = t.id AND e.kind = 'leased'),"
            " (SELECT count(*) FROM events e WHERE e.task_id = t.id AND e.kind = 'succeeded'),"
            " (SELECT count(*) FROM events e WHERE e.task_id = t.id AND e.kind = 'checkpointed')"
            " FROM tasks t WHERE t.client = ?",
            (good_client,),
        ).fetchall()
        assert len(rows) == len(good.expected)
        for task_id, attempt, state, number, leased, succeeded, checkpointed in rows:
            assert (leased, succeeded) == (attempt, 1), (task_id, attempt, leased, succeeded)
            if task_id in good.crunch:
                # no forged checkpoint was applied: the state is the real worker's
                saved = p.unpack(state) if state is not None else 0
                assert number == checkpointed and saved == number * CRUNCH_EVERY, task_id
        # ... and every task a fuzz peer created comes from a SUBMIT that decodes
        created = db.execute(
            "SELECT client, client_seq, count(*) FROM tasks WHERE client IS NOT ?"
            " GROUP BY client, client_seq",
            (good_client,),
        ).fetchall()
    for client_hex, seq, count in created:
        identity = bytes.fromhex(client_hex)
        if (identity, seq) not in ledger.submits and len(identity) == 5 and identity[0] == 0:
            identity = None  # made up by the ROUTER for a ZMTP/1.0 peer without one
        assert count <= ledger.submits.get((identity, seq), 0), (client_hex, seq, count)
    # ... and the broker's log stayed small (one complaint per peer per interval)
    log = next(cluster.root.glob("*-broker.log"))
    text = log.read_text(errors="replace")
    assert log.stat().st_size < LOG_LIMIT_BYTES, f"broker log is {log.stat().st_size} bytes"
    assert "internal error" not in text and "Traceback" not in text, text[-3000:]
    complaints_s = time.monotonic() - started
    for identity in POOL:
        lines = text.count(f"rejected message from {identity[:32]!r}:")
        assert lines <= complaints_s / COMPLAINT_INTERVAL_S + 2, (identity, lines, complaints_s)
    assert not any(a.endswith(":internal") for a in ledger.answers), ledger.answers

    print(
        f"\nfuzz: {EXAMPLES} examples in {fuzz_s:.1f} s; {ledger.messages} messages"
        f" ({ledger.dropped} dropped), {ledger.raw_conns} raw TCP connections"
        f" ({ledger.raw_bytes} bytes); valid: {dict(ledger.valid)};"
        f" forged outcomes/checkpoints naming good tasks: {dict(ledger.forged)}"
        f"\ngood tasks: {len(good.expected)} ({len(good.crunch)} crunch);"
        f" fuzz-created tasks: {sum(c for *_, c in created)}; events: {kinds};"
        f" stale events from {len(stale_by)} identities, {against_lease} of them naming"
        f" the attempt the real worker held"
        f"\nanswers to the pool: {dict(ledger.answers)};"
        f" broker log {log.stat().st_size} bytes"
    )


# ---------------------------------------------------------------- what the fuzz found


@pytest.fixture
def stepped(tmp_path: Path) -> Iterator[tuple[Broker, zmq.Context[Any]]]:
    """A broker in this process, stepped by hand, and a context for raw DEALER peers."""
    ctx: zmq.Context[Any] = zmq.Context()
    config = BrokerSettings(
        endpoint="tcp://127.0.0.1:*", db_path=str(tmp_path / "tasks.db"), synchronous="normal"
    )
    broker = Broker(config, context=ctx)
    try:
        yield broker, ctx
    finally:
        while STEPPED_PEERS:
            STEPPED_PEERS.pop().close(linger=0)
        broker.close()
        ctx.destroy(linger=0)


STEPPED_PEERS: list[zmq.Socket[Any]] = []  # closed by `stepped`, before a GC warns


def dealer(ctx: zmq.Context[Any], broker: Broker, identity: bytes) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    STEPPED_PEERS.append(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(broker.endpoint)
    return sock


def answer(
    broker: Broker, sock: zmq.Socket[Any], protocol: bytes, timeout_s: float = 10.0
) -> tuple[bytes, dict[str, Any]]:
    """Step the broker until `sock` has a message other than a heartbeat."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        while sock.poll(0):
            command, body = p.decode_reply(sock.recv_multipart(), protocol)
            if command != p.HEARTBEAT:
                return command, body
        broker.poll_once(timeout_s=0.02)
    raise AssertionError(f"no answer reached {sock.getsockopt(zmq.ROUTING_ID)!r}")


def test_a_submit_reusing_a_seq_with_another_task_count_is_answered(
    stepped: tuple[Broker, zmq.Context[Any]],
) -> None:
    # Given a client whose first SUBMIT, seq 1, was answered
    broker, ctx = stepped
    client = dealer(ctx, broker, b"c-reuses-seq")
    one = {"name": "fuzz.a", "payload": p.pack([[], {}])}
    client.send_multipart(p.frames(p.PROTOCOL_CLIENT, p.SUBMIT, {"seq": 1, "tasks": [one]}))
    assert answer(broker, client, p.PROTOCOL_CLIENT)[0] == p.REPLY
    # When it sends another SUBMIT with seq 1 but two tasks (a broken client: a seq
    # names one message), the broker must answer it, not raise out of its loop:
    # today the INSERT into `requests` fails with sqlite3.IntegrityError (UNIQUE
    # constraint failed: requests.client, requests.seq) and the broker process exits.
    body = {"seq": 1, "tasks": [one, one]}
    client.send_multipart(p.frames(p.PROTOCOL_CLIENT, p.SUBMIT, body))
    command, _ = answer(broker, client, p.PROTOCOL_CLIENT)
    # Then it answered, and goes on serving
    assert command in (p.REPLY, p.ERROR)
    client.send_multipart(p.frames(p.PROTOCOL_CLIENT, p.STATUS, {"seq": 2}))
    assert answer(broker, client, p.PROTOCOL_CLIENT)[0] == p.REPLY


def test_a_ready_at_the_largest_capacity_does_not_stall_the_broker(
    stepped: tuple[Broker, zmq.Context[Any]],
) -> None:
    # Given a broker, and a peer that registers with capacity max_batch (1000),
    # which the protocol allows: a READY of some 40 bytes
    broker, ctx = stepped
    peer = dealer(ctx, broker, b"w-wide")
    body = {"seq": 1, "capacity": p.DEFAULT_LIMITS.max_batch, "tasks": {}}
    peer.send_multipart(p.frames(p.PROTOCOL_WORKER, p.READY, body))
    # When the broker registers it, then answers a STATUS
    assert answer(broker, peer, p.PROTOCOL_WORKER)[0] == p.WELCOME
    client = dealer(ctx, broker, b"c-status")
    client.send_multipart(p.frames(p.PROTOCOL_CLIENT, p.STATUS, {"seq": 1}))
    assert answer(broker, client, p.PROTOCOL_CLIENT)[0] == p.REPLY
    # Then its place on the ring is bounded, not 320 points per unit of capacity:
    # 320,000 BLAKE2b hashes and a re-sort took about 1 s per READY (five such
    # READYs stalled the loop 8 s), and STATUS walked all the points. (Asserted on
    # the ring's size, not on time: timings belong in bench/.)
    ring = broker.placement.ring
    assert ring.weight("w-wide") == MAX_RING_WEIGHT < p.DEFAULT_LIMITS.max_batch
