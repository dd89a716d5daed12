"""The broker: one ROUTER socket, one thread, one SQLite transaction per loop turn.

Each turn of `poll_once` reads a batch of messages, applies all of them
inside one transaction, runs the timers (dead workers, unclaimed leases),
dispatches queued tasks to workers with credit, commits, and only then sends
what the turn produced: acknowledgements, replies and TASK messages. A crash
anywhere before the commit leaves nothing acknowledged that is not in the
log, and nothing dispatched under a lease the log does not know.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from taskring import __version__
from taskring import protocol as p
from taskring.broker.endpoints import refuse_a_live_ipc_endpoint
from taskring.broker.jobs import Job, Lease, TaskQueue
from taskring.broker.placement import Placement
from taskring.broker.registry import WorkerState
from taskring.broker.settings import BrokerSettings
from taskring.broker.store import Store
from taskring.clock import wall_clock
from taskring.security import CurveServer, is_loopback

log = logging.getLogger(__name__)

Handler = Callable[[p.Envelope, float, float], None]

COMPLAINT_INTERVAL_S = 10.0  # one log line per misbehaving peer per interval
# Tasks with a NOTIFY watch at once: a million queued and watched tasks would
# otherwise cost the broker hundreds of MB (bench/deep_queue.py).
MAX_WATCHED_TASKS = 100_000
# Attempts a worker says never started are not counted, up to this many per task:
# a worker that refuses a task forever must not keep it circling forever.
MAX_SPARED = 100
# Why an attempt is spared: known, or guessed (which a task that kills its worker as
# it starts can fake, so a guess spares a task at most max_attempts times).
NEVER_STARTED = "it never started"
LIKELY_WAITING = "it was likely still waiting for a slot"

# A message as read: its frames, and with CURVE the sender's public key.
Received = tuple[list[bytes], str | None]
CANCEL_REASON = "cancelled by a client"
# Messages a waiting caller's round trip goes through: work for a worker, and
# the news that a task finished.
_ON_A_WAITING_PATH = frozenset((p.TASK, p.NOTIFY))
# Tasks a PRUNE looks at: deleting a task and its events writes several pages,
# and a turn of thousands would hold every other peer's messages for long.
PRUNE_SCAN_ROWS = 1_000
# Replaced incarnations remembered per worker name (Broker._on_ready).
MAX_REPLACED = 16
# Heartbeat intervals the registered process of a name may be silent and still
# count as alive when a replaced one registers again (Broker._on_ready).
ALIVE_BEATS = 2
# Worker messages that carry the sending process's incarnation.
_SAYS_WHICH_PROCESS = frozenset((p.READY, p.HEARTBEAT))
# How often the broker makes sure its log's lock file is still there (a stat).
OWNERSHIP_CHECK_S = 1.0


class Broker:
    def __init__(
        self, settings: BrokerSettings, *, context: zmq.Context[Any] | None = None
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        # Before the log is opened (or created): a broker that cannot serve leaves it be.
        refuse_a_live_ipc_endpoint(settings.endpoint)
        # A broker that cannot start leaves no file, lock, thread or socket open.
        self.store = Store(settings.db_path, synchronous=settings.synchronous)
        try:
            self._open_socket(settings, context)
        except BaseException:
            self.store.close()
            raise
        try:
            self.workers: dict[str, WorkerState] = {}
            # By name, the incarnations a newer process's READY replaced while the name
            # stayed registered: one that registers again is alive beside that newer one.
            self._replaced: dict[str, set[str]] = {}
            self.leases: dict[int, Lease] = {}  # every running task, by id
            self.orphans: dict[int, Lease] = {}  # leases loaded at start, not yet reclaimed
            self.orphan_deadline = 0.0  # all of them: one liveness window after the start
            self.queue = TaskQueue(settings.queue_window, self._load_queued)
            self.placement = Placement(self.queue, parked_limit=settings.queue_window)
            self.watchers: dict[int, set[bytes]] = {}
            self.names = self.store.known_names()
            # Tasks by state, kept by the broker (the only writer) rather than
            # counted in SQLite for every STATUS.
            self.counts: collections.Counter[str] = collections.Counter(self.store.count_by_state())
            self.started = time.monotonic()
            self._ownership_due = 0.0  # when to check the log's lock file next
            self._outbox: list[list[bytes]] = []
            self._notices: dict[bytes, list[dict[str, Any]]] = {}
            self._new_leases: list[tuple[int, int, str]] = []
            self._successes: list[tuple[int, int, str, bytes | None]] = []
            self._complaints: dict[bytes, float] = {}  # identity -> last log line about it
            self.rejected: collections.Counter[str] = collections.Counter()  # by error code
            self._worker_keys: dict[str, str] = {}  # worker name -> the key that registered it
            self._peer_key: str | None = None  # CURVE key of the message being handled
            self._reload = False
            self._disconnects: dict[bytes, float] = {}  # identity -> last DISCONNECT sent
            self._stop = threading.Event()
            self._handlers: dict[tuple[bytes, bytes], Handler] = {
                (p.PROTOCOL_CLIENT, p.SUBMIT): self._on_submit,
                (p.PROTOCOL_CLIENT, p.GET): self._on_get,
                (p.PROTOCOL_CLIENT, p.STATUS): self._on_status,
                (p.PROTOCOL_CLIENT, p.TASKS): self._on_tasks,
                (p.PROTOCOL_CLIENT, p.HISTORY): self._on_history,
                (p.PROTOCOL_CLIENT, p.CANCEL): self._on_cancel,
                (p.PROTOCOL_CLIENT, p.PRUNE): self._on_prune,
                (p.PROTOCOL_WORKER, p.READY): self._on_ready,
                (p.PROTOCOL_WORKER, p.HEARTBEAT): self._on_heartbeat,
                (p.PROTOCOL_WORKER, p.RESULT): self._on_result,
                (p.PROTOCOL_WORKER, p.CHECKPOINT): self._on_checkpoint,
                (p.PROTOCOL_WORKER, p.DISCONNECT): self._on_disconnect,
            }
            self._recover(time.monotonic())
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ lifecycle

    def _open_socket(self, settings: BrokerSettings, context: zmq.Context[Any] | None) -> None:
        self._own_context = context is None
        self.context: zmq.Context[Any] = context or zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.curve: CurveServer | None = None
        self._allowed: frozenset[str] = frozenset()
        try:
            self.socket.setsockopt(zmq.LINGER, 0)
            # A worker keeps its routing id across reconnects; without handover
            # libzmq would refuse the new pipe while it still holds the old one.
            self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self.socket.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
            self.socket.setsockopt(zmq.SNDHWM, 100_000)
            self.socket.setsockopt(zmq.RCVHWM, 100_000)
            if settings.curve is not None:
                self.curve = CurveServer(self.context, settings.curve)
                self.curve.apply(self.socket)
                self._allowed = self.curve.allowed()
            elif not is_loopback(settings.endpoint):
                log.warning(
                    "serving %s without CURVE: anyone who reaches it can submit tasks and "
                    "speak for a worker; see SECURITY.md (--curve-secret, --allow-keys)",
                    settings.endpoint,
                )
            self.socket.bind(settings.endpoint)
        except BaseException:
            self._close_sockets()
            raise
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)

    def _recover(self, now: float) -> None:
        """Leases in the log wait one liveness window for their worker to claim them."""
        self.orphan_deadline = now + self.settings.expiry_s
        for *fields, worker in self.store.running():
            lease = Lease(Job(*fields), worker or "", dseq=0)
            self.leases[lease.job.id] = lease
            self.orphans[lease.job.id] = lease
        if self.orphans:
            log.info("%d running tasks wait for their workers to re-register", len(self.orphans))

    def _load_queued(self, after_id: int, limit: int) -> list[Job]:
        return [Job(*row) for row in self.store.queued(after_id, limit)]

    def stop(self) -> None:
        """Ask `run` to return after the current turn (thread-safe)."""
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
        try:
            self.store.release_ids()
        except sqlite3.Error as e:
            log.warning("unused task ids not given back (%s): the next start skips them", e)

    def reload_keys(self) -> None:
        """Read the allow folder again at the next turn (safe to call from a signal handler)."""
        self._reload = True

    def _close_sockets(self) -> None:
        self.socket.close(linger=0)
        if self.curve is not None:
            self.curve.stop()  # its ZAP socket would keep the context from terminating
        if self._own_context:
            self.context.term()

    def close(self) -> None:
        try:
            self._close_sockets()
        finally:
            self.store.close()

    # ------------------------------------------------------------ the loop

    def poll_once(self, now: float | None = None, timeout_s: float | None = None) -> int:
        """One turn: read, apply in one transaction, commit, send the TASKs, sync, send the rest.

        Returns the number of messages read.
        """
        if timeout_s is None:
            timeout_s = self._until_next_timer(time.monotonic() if now is None else now)
        if self._reload and self.curve is not None:
            self._reload = False
            self._allowed = self.curve.allowed()
            log.info("allowed keys reloaded: %d", len(self._allowed))
        # Rounded up: a timer 0.4 ms away must not become a poll(0) spin.
        ready = dict(self.poller.poll(max(0, math.ceil(timeout_s * 1000))))
        messages: list[Received] = []
        if self.socket in ready:
            submits = 0
            for _ in range(self.settings.max_messages_per_turn):
                if messages and not p.has_message(self.socket):
                    break
                try:
                    received = self._recv()
                except zmq.Again:
                    break
                messages.append(received)
                frames = received[0]
                command = frames[2] if len(frames) > 2 else b""
                if command == p.SUBMIT:
                    submits += 1
                    if submits >= self.settings.max_submits_per_turn:
                        break  # the rest wait in the socket for the next turn
                elif command == p.PRUNE:
                    break  # up to 1,000 tasks deleted, 10 ms or so: one a turn
        now = time.monotonic() if now is None else now
        wall = wall_clock()
        try:
            self._turn(messages, now, wall)
        except BaseException:
            # Nothing of a turn that did not commit and sync may ever leave (but
            # its TASKs, once it committed: _send_tasks_ahead).
            self._outbox, self._notices = [], {}
            raise
        self._send_outbox()
        self._send_heartbeats(now)
        self.store.finish_checkpoint()
        if now >= self._ownership_due:
            self._ownership_due = now + OWNERSHIP_CHECK_S
            try:
                if not self.store.keep_ownership():
                    log.error("the lock file of task log %s was gone; taken again", self.store.path)
            except OSError as e:
                # The old lock still holds; a folder gone read-only is no reason to stop.
                log.warning("cannot check the lock file of task log %s: %s", self.store.path, e)
        return len(messages)

    def _turn(self, messages: list[Received], now: float, wall: float) -> None:
        """Apply the messages, commit, send the TASKs that may go, make the commit durable."""
        with self.store.turn():
            for parts, key in messages:
                if self.curve is not None and key not in self._allowed:
                    # Revoked since it connected: libzmq only checks keys at the handshake.
                    if self._may_complain(parts[0], now):
                        log.warning("dropped a message from revoked key %s", key)
                    continue
                self._peer_key = key
                self._handle(parts, now, wall)
            self._expire(now, wall)
            self._dispatch()
            self._flush_writes(wall)
        self._seal_turn()
        if not self.store.ids_not_synced:
            self._outbox = self._send_tasks_ahead(self._outbox)
        self.store.sync()  # before anything else leaves that tells of the turn's commit

    def _recv(self) -> Received:
        """One message, and with CURVE the sender's public key (Z85) from ZAP's User-Id."""
        if self.curve is None:
            return p.recv_frames(self.socket, p.NOBLOCK), None
        frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        key = frames[-1].get("User-Id")
        return [f.bytes for f in frames], key if isinstance(key, str) else None

    def _until_next_timer(self, now: float) -> float:
        hb = self.settings.heartbeat_s
        due = now + hb
        for worker in self.workers.values():
            due = min(due, worker.last_sent + hb, worker.last_heard + self.settings.expiry_s)
        if self.orphans:  # one deadline for all: no scan of thousands of leases per turn
            due = min(due, self.orphan_deadline)
        return max(0.0, due - now)

    def _handle(self, parts: list[bytes], now: float, wall: float) -> None:
        identity = parts[0] if parts else b""
        try:
            envelope = p.open_envelope(parts, self.limits)
        except p.ProtocolError as e:
            reply_protocol = parts[1] if len(parts) > 1 else b""
            if reply_protocol not in (p.PROTOCOL_CLIENT, p.PROTOCOL_WORKER):
                reply_protocol = p.PROTOCOL_CLIENT
            self._reject(identity, reply_protocol, None, e, now)
            return
        if envelope.protocol == p.PROTOCOL_WORKER:
            name = _name(identity)
            if self.curve is not None and not self._may_speak_for(name, envelope.command):
                error = p.ProtocolError(
                    p.E_FORBIDDEN, f"worker name {name!r} belongs to another key"
                )
                self._reject(identity, envelope.protocol, _seq(envelope), error, now)
                return
            worker = self.workers.get(name)
            if worker is not None and envelope.command not in _SAYS_WHICH_PROCESS:
                worker.last_heard = now  # READY and HEARTBEAT: once known to be its own
        try:
            self._handlers[(envelope.protocol, envelope.command)](envelope, now, wall)
        except p.ProtocolError as e:
            self._reject(identity, envelope.protocol, _seq(envelope), e, now)
        except sqlite3.DatabaseError:
            raise  # the log is in trouble: crash, and let a restart recover from the log
        except Exception as e:
            # A bug must not stop the broker for everyone, nor make it crash
            # again on every resend of the message that found it.
            if self._may_complain(identity, now):
                log.exception("internal error on %s from %r", envelope.command, identity[:32])
            error = p.ProtocolError(p.E_INTERNAL, f"internal error: {type(e).__name__}")
            self._reject(identity, envelope.protocol, _seq(envelope), error, now)

    def _reject(
        self, identity: bytes, protocol: bytes, seq: int | None, error: p.ProtocolError, now: float
    ) -> None:
        self.rejected[error.code] += 1
        if self._may_complain(identity, now):
            log.warning("rejected message from %r: %s (%s)", identity[:32], error, error.code)
        self._outbox.append(
            [identity, protocol, p.ERROR, p.pack(p.error_body(seq, error.code, error.message))]
        )

    def _may_speak_for(self, name: str, command: bytes) -> bool:
        """With CURVE, a worker name belongs to the first key that registers it."""
        if self._peer_key is None:
            return False
        owner = self._worker_keys.get(name)
        if owner is None and command == p.READY:
            self._worker_keys[name] = self._peer_key
            return True
        return owner == self._peer_key

    def _may_complain(self, identity: bytes, now: float) -> bool:
        """One log line per peer per interval: a flood must not fill the disk."""
        if now - self._complaints.get(identity, -COMPLAINT_INTERVAL_S) < COMPLAINT_INTERVAL_S:
            return False
        if len(self._complaints) > 10_000:
            self._complaints.clear()  # bounded memory under a flood of identities
        self._complaints[identity] = now
        return True

    def _reply(self, identity: bytes, body: Mapping[str, Any]) -> None:
        self._outbox.append([identity, p.PROTOCOL_CLIENT, p.REPLY, p.pack(body)])

    def _to_worker(self, worker: WorkerState, command: bytes, body: Mapping[str, Any]) -> None:
        self._outbox.append([worker.identity, p.PROTOCOL_WORKER, command, p.pack(body)])

    def _seal_turn(self) -> None:
        """The turn's NOTIFYs join its other messages."""
        for identity, views in self._notices.items():
            for chunk in p.split_by_size(views, _view_bytes, self.limits):
                body = {"tasks": chunk}
                self._outbox.append([identity, p.PROTOCOL_CLIENT, p.NOTIFY, p.pack(body)])
        self._notices.clear()

    def _send_tasks_ahead(self, outbox: list[list[bytes]]) -> list[list[bytes]]:
        """Send the TASKs that open their worker's messages now, between the commit
        and the WAL sync; the rest of the outbox waits for the sync.

        With full durability the sync (0.2 to 0.5 ms) then overlaps the TASK's trip
        and the task's run instead of coming before them. A TASK acknowledges
        nothing, and its lease is committed, so a kill -9 of the broker loses
        neither. Only a power loss before the sync can undo it, and then the
        worker's result meets a log without that lease: refused as stale, as
        after a power loss with --synchronous normal, and the (id, attempt) is
        not leased to that worker again while it may hold it (_dispatch). The
        task runs again, from the log or, if its submit was lost too, when its
        client, never answered, submits again: at least once, as after any lost
        attempt. Its id is never given to another task: ids are reserved durably
        a block at a time, and no TASK goes ahead of the sync that makes a new
        block's reservation durable (Store.allocate_id).

        A TASK behind an ACK or a WELCOME to the same worker waits with them: the
        worker frees a slot when the ACK of its result arrives, and would refuse a
        TASK that came first into a full one.
        """
        rest: list[list[bytes]] = []
        held_back: set[bytes] = set()
        for frames in outbox:
            peer = frames[0]
            if peer not in held_back and frames[2] == p.TASK and frames[1] == p.PROTOCOL_WORKER:
                p.send_frames(self.socket, frames)
            else:
                held_back.add(peer)
                rest.append(frames)
        return rest

    def _send_outbox(self) -> None:
        """The turn's messages once its commit is durable, each peer's in their order.

        Peers given work (TASK) or a finished task (NOTIFY) come first: the first
        send of a turn wakes libzmq's I/O thread, which costs tens of µs here, and
        those messages are on the path of a caller waiting for its result, while
        replies and ACKs are not.
        """
        for frames in waiting_path_first(self._outbox):
            p.send_frames(self.socket, frames)
        self._outbox = []

    def _send_heartbeats(self, now: float) -> None:
        heartbeat = [p.PROTOCOL_WORKER, p.HEARTBEAT, p.pack({})]
        for worker in self.workers.values():
            if now - worker.last_sent >= self.settings.heartbeat_s:
                frames = heartbeat
                if worker.foreign:
                    # Attempts it holds whose lease is gone (superseded or cancelled): it
                    # may tell their tasks now, not at their next checkpoint.
                    stale = sorted(worker.foreign)[: self.limits.max_batch]
                    frames = [p.PROTOCOL_WORKER, p.HEARTBEAT, p.pack({"stale": stale})]
                p.send_frames(self.socket, [worker.identity, *frames])
                worker.last_sent = now

    # ------------------------------------------------------------ clients

    def _on_submit(self, envelope: p.Envelope, now: float, wall: float) -> None:
        request = p.decode_submit(envelope.body, self.limits)
        unknown = sorted({t.name for t in request.tasks} - self.names.keys())
        if unknown and request.strict:
            raise p.ProtocolError(
                p.E_UNKNOWN_TASK,
                f"no worker has registered {', '.join(unknown)}; known tasks: "
                f"{', '.join(sorted(self.names)) or 'none yet'}",
            )
        client = envelope.identity.hex()
        if self._peer_key is not None:  # who submitted it: the key, then the connection
            client = f"{self._peer_key}/{client}"
        earlier = self.store.find_request(client, request.seq)
        if earlier is not None and len(earlier) != len(request.tasks):
            # Not a resend: a resend carries the very same frames. Refuse it rather
            # than let the second (client, seq) row fail the whole turn's commit.
            raise p.ProtocolError(
                p.E_BAD_BODY,
                f"seq {request.seq} was already used for a SUBMIT of {len(earlier)} tasks",
            )
        if earlier is not None:
            # A resend: the first copy was committed and answered (the answer was lost).
            self._reply_submit(envelope.identity, request.seq, earlier, unknown)
            if request.watch:
                self._watch(envelope.identity, earlier, set(), wall)
            return
        keys = {t.idempotency_key for t in request.tasks if t.idempotency_key is not None}
        by_key = self.store.find_idempotency_keys(keys) if keys else {}
        ids: list[int] = []
        rows = []
        jobs = []
        for index, new in enumerate(request.tasks):
            if new.idempotency_key in by_key:
                ids.append(by_key[new.idempotency_key])
                continue
            task_id = self.store.allocate_id()
            max_attempts = (
                new.max_attempts or self.names.get(new.name) or self.settings.default_max_attempts
            )
            rows.append(
                (
                    task_id,
                    new.name,
                    new.payload,
                    new.key,
                    max_attempts,
                    client,
                    request.seq,
                    index,
                    new.idempotency_key,
                )
            )
            jobs.append(
                Job(task_id, new.name, new.payload, new.key, 0, max_attempts, None, 0, wall, 0)
            )
            if new.idempotency_key is not None:
                by_key[new.idempotency_key] = task_id
            ids.append(task_id)
        if rows:
            self.store.insert_tasks(rows, wall)
            self.counts[p.QUEUED] += len(rows)
            for job in jobs:
                self.queue.add_new(job)
        self.store.remember_request(client, request.seq, ids, wall)
        self._reply_submit(envelope.identity, request.seq, ids, unknown)
        if request.watch:
            fresh = {job.id for job in jobs}
            self._watch(envelope.identity, [i for i in ids if i not in fresh], fresh, wall)

    def _add_watcher(self, task_id: int, identity: bytes) -> None:
        """Remember who wants a NOTIFY, within a bound: a watch costs memory per task, and
        NOTIFY is only a hint (clients poll with GET when no task finishes for a while)."""
        watchers = self.watchers.get(task_id)
        if watchers is not None:
            watchers.add(identity)
        elif len(self.watchers) < MAX_WATCHED_TASKS:
            self.watchers[task_id] = {identity}

    def _reply_submit(self, identity: bytes, seq: int, ids: list[int], unknown: list[str]) -> None:
        reply: dict[str, Any] = {"seq": seq, "ids": ids, "unknown": unknown}
        if unknown:
            reply["known"] = sorted(self.names)
        self._reply(identity, reply)

    def _watch(self, identity: bytes, ids: list[int], fresh: set[int], wall: float) -> None:
        """Register for NOTIFY; tasks already final are announced right away."""
        for task_id in fresh:
            self._add_watcher(task_id, identity)
        if not ids:
            return
        self._flush_writes(wall)
        views = self.store.views(ids)
        for task_id in ids:
            row = views.get(task_id)
            if row is None:
                continue
            if row["state"] in p.FINAL_STATES:
                self._notices.setdefault(identity, []).append(p.task_view(row))
            else:
                self._add_watcher(task_id, identity)

    def _on_get(self, envelope: p.Envelope, now: float, wall: float) -> None:
        request = p.decode_get(envelope.body, self.limits)
        # Results applied earlier in this turn must be visible, or a watch would
        # be set on a task whose NOTIFY already went out.
        self._flush_writes(wall)
        views = self.store.views(request.ids)
        tasks = [p.task_view(views[i]) if i in views else None for i in request.ids]
        # The views of the first ids that fit in one message: the client asks again
        # for the rest. A thousand results of a MiB each would be a GiB otherwise.
        tasks = p.first_message(tasks, _view_bytes, self.limits)
        self._reply(envelope.identity, {"seq": request.seq, "tasks": tasks})
        if request.watch:
            for view in tasks:
                if view is not None and view["state"] not in p.FINAL_STATES:
                    self._add_watcher(view["id"], envelope.identity)

    def _on_status(self, envelope: p.Envelope, now: float, wall: float) -> None:
        request = p.decode_status(envelope.body, self.limits)
        shares = self.placement.ring.shares()
        workers = [
            {
                "name": w.name,
                "host": w.host,
                "pid": w.pid,
                "pool": w.pool,
                "capacity": w.capacity,
                "load": len(w.leases),
                "share": shares.get(w.name, 0.0),
                "tasks": sorted(w.tasks),
                "last_seen_s": round(now - w.last_heard, 3),
                "draining": w.draining,
            }
            for w in sorted(self.workers.values(), key=lambda w: w.name)
        ]
        broker = {
            "version": __version__,
            "uptime_s": round(now - self.started, 3),
            "db": self.store.path,
            "endpoint": self.endpoint,
            "orphaned_leases": len(self.orphans),
            "rejected": dict(self.rejected),
            "curve": self.curve is not None,
            # So a client can size its requests: over max_message_bytes, the
            # answer is an ERROR without seq or, past ZMQ_MAXMSGSIZE, a dropped
            # connection.
            "limits": dataclasses.asdict(self.limits),
        }
        states = {state: count for state, count in self.counts.items() if count}
        self._reply(
            envelope.identity,
            {"seq": request.seq, "workers": workers, "states": states, "broker": broker},
        )

    def _on_tasks(self, envelope: p.Envelope, now: float, wall: float) -> None:
        request = p.decode_tasks(envelope.body, self.limits)
        rows = self.store.list_tasks(
            request.state, request.name, request.limit, request.before_id, results=request.results
        )
        views = p.first_message([p.task_view(r) for r in rows], _view_bytes, self.limits)
        # `more`: cut short by size, so fewer than `limit` listed though more match.
        more = len(views) < len(rows)
        self._reply(envelope.identity, {"seq": request.seq, "tasks": views, "more": more})

    def _on_history(self, envelope: p.Envelope, now: float, wall: float) -> None:
        request = p.decode_history(envelope.body, self.limits)
        row = self.store.views([request.id]).get(request.id)
        view = p.task_view(row) if row else None
        # One more than a page can hold, so `more` is known without a second query.
        limit = self.limits.max_batch + 1
        rows = self.store.history(request.id, request.after, limit) if row else []
        # The view travels with every page (its result may be 1 MiB): the events
        # get what is left of the budget.
        events = p.first_message(
            [dict(e) for e in rows], _event_bytes, self.limits, reserved=_view_bytes(view)
        )
        self._reply(
            envelope.identity,
            {"seq": request.seq, "task": view, "events": events, "more": len(events) < len(rows)},
        )

    def _on_cancel(self, envelope: p.Envelope, now: float, wall: float) -> None:
        """Queued and running tasks become `cancelled`; a final task stays as it is.

        A running task's lease ends here, as if it were superseded: the worker
        hears `stale` in our next HEARTBEAT or at its next checkpoint (the task
        sees ctx.lease_lost), and its result is refused. The slot stays taken
        until the worker stops reporting the task as held.
        """
        request = p.decode_cancel(envelope.body, self.limits)
        self._flush_writes(wall)  # results applied earlier this turn: the log must show them
        found = self.store.owners(request.ids)
        if self._peer_key is not None:
            # With CURVE, only the key that submitted a task may cancel it.
            mine = f"{self._peer_key}/"
            for task_id, row in found.items():
                if not (row["client"] or "").startswith(mine):
                    raise p.ProtocolError(
                        p.E_FORBIDDEN, f"task {task_id} was submitted by another key"
                    )
        cancelled: list[tuple[int, int, str | None]] = []
        for task_id in dict.fromkeys(request.ids):  # an id named twice is cancelled once
            row = found.get(task_id)
            state, attempt = (row["state"], row["attempt"]) if row else (None, 0)
            worker = None
            if state == p.RUNNING:
                lease = self.leases.get(task_id)
                if lease is not None:
                    worker = lease.worker
                    self._end_lease(lease)
                    holder = self.workers.get(worker)
                    if holder is not None:
                        # It runs until it hears: a task sent to the slot now would be
                        # refused, and every refusal costs that task an attempt.
                        holder.lease_cancelled((task_id, attempt), lease.dseq)
            elif state == p.QUEUED:
                self.placement.forget(task_id)
            else:
                continue
            self._move(state, p.CANCELLED)
            cancelled.append((task_id, attempt, worker))
        self.store.cancel(cancelled, CANCEL_REASON, wall)
        watched = [task_id for task_id, _, _ in cancelled if task_id in self.watchers]
        for task_id, row in self.store.views(watched).items():
            self._notify(task_id, p.task_view(row))
        done = {task_id for task_id, _, _ in cancelled}
        states = [
            p.CANCELLED if i in done else found[i]["state"] if i in found else None
            for i in request.ids
        ]
        self._reply(envelope.identity, {"seq": request.seq, "states": states})

    def _on_prune(self, envelope: p.Envelope, now: float, wall: float) -> None:
        """Delete final tasks that ended before `before`, PRUNE_SCAN_ROWS tasks a request.

        Only final tasks: no lease, watch or queue entry names them. With CURVE,
        only the tasks the caller's key submitted.
        """
        request = p.decode_prune(envelope.body, self.limits)
        if request.before > wall - p.PRUNE_MIN_AGE_S:
            raise p.ProtocolError(
                p.E_BAD_BODY,
                f"'before' must be at least {p.PRUNE_MIN_AGE_S:.0f} s ago: tasks that ended "
                "within the last hour are kept, as a client may still resend their SUBMIT",
            )
        mine = f"{self._peer_key}/" if self._peer_key is not None else None
        deleted, go_on = self.store.prune(
            request.before, request.states, request.after_id, PRUNE_SCAN_ROWS, mine
        )
        for state, n in deleted.items():
            self.counts[state] -= n
        if deleted:
            log.info("pruned %s", ", ".join(f"{n} {state}" for state, n in sorted(deleted.items())))
        body = {"seq": request.seq, "deleted": deleted.total(), "next": go_on}
        self._reply(envelope.identity, body)

    # ------------------------------------------------------------ workers

    def _on_ready(self, envelope: p.Envelope, now: float, wall: float) -> None:
        request = p.decode_ready(envelope.body, self.limits)
        name = _name(envelope.identity)
        current = self.workers.get(name)
        if (
            current is not None
            and request.incarnation not in ("", current.incarnation)
            and request.incarnation in self._replaced.get(name, ())
            and now - current.last_heard < ALIVE_BEATS * self.settings.heartbeat_s
        ):
            # Two live processes of one name: each reconnect hands the routing id to
            # the other (ROUTER_HANDOVER), and each READY would cost the other its
            # leases. The one registered stays; this one is told to stop.
            self._name_taken(envelope.identity, current, request.incarnation, now)
            return
        previous = self.workers.pop(name, None)
        # The same process registering again (a lost WELCOME, a reconnect)
        # keeps its TASK numbering, so leases still in flight to it survive.
        same_process = (
            previous is not None
            and request.incarnation != ""
            and request.incarnation == previous.incarnation
        )
        worker = WorkerState(
            name=name,
            identity=envelope.identity,
            capacity=request.capacity,
            concurrency=request.concurrency,
            tasks=dict(request.tasks),
            host=request.host,
            pid=request.pid,
            pool=request.pool,
            incarnation=request.incarnation,
            last_heard=now,
            last_sent=now,
            registered_at=now,
            dseq=previous.dseq if same_process and previous else 0,
        )
        if same_process and previous is not None:
            worker.cancelled = previous.cancelled  # their TASKs may still be in flight
        elif previous is not None and previous.incarnation:
            replaced = self._replaced.setdefault(name, set())
            if len(replaced) >= MAX_REPLACED:
                replaced.clear()  # bounded: a name restarted all day long is no duplicate
            replaced.add(previous.incarnation)
        self.workers[name] = worker
        if any(self.names.get(n) != m for n, m in request.tasks.items()):
            self.store.remember_names(request.tasks, wall)
            self.names.update(request.tasks)
        held = set(request.held)
        lost = []
        for lease in list(previous.leases.values()) if previous else []:
            job = lease.job
            if (job.id, job.attempt) in held or (same_process and lease.dseq > request.dseq):
                if not same_process:
                    lease.dseq = 0  # its number belongs to the old process's numbering
                worker.leases[job.id] = lease
            else:
                lost.append(lease)
        if previous is not None and lost:
            reason = f"worker {name} registered again without it"
            if same_process:  # as in a HEARTBEAT: its TASK came, and the task is not held
                for lease in lost:
                    self._lease_lost(lease, reason, wall, waiting=lease.dseq > 0)
            else:
                self._leases_lost(previous, lost, reason, wall)
        # In the order the worker holds them, which is the order it got them.
        position = {pair: i for i, pair in enumerate(request.held)}
        mine = [o for o in self.orphans.values() if o.worker == name]
        mine.sort(key=lambda o: position.get((o.job.id, o.job.attempt), len(position)))
        for lease in mine:
            job = lease.job
            if (job.id, job.attempt) in held:  # re-adopted after a broker restart
                del self.orphans[job.id]
                worker.leases[job.id] = lease
                self.store.event(job.id, "adopted", job.attempt, name, None, wall)
            else:
                self._lease_lost(lease, f"worker {name} returned without it", wall)
        worker.update_foreign(held, request.dseq)
        log.info(
            "worker %s registered (capacity %d, holding %d)", name, request.capacity, len(held)
        )
        self._to_worker(
            worker,
            p.WELCOME,
            {
                "seq": request.seq,
                "heartbeat_ms": int(self.settings.heartbeat_s * 1000),
                "liveness": self.settings.liveness,
                "dseq": worker.dseq,
                "limits": dataclasses.asdict(self.limits),
            },
        )
        self.placement.join(name, request.capacity, request.tasks)

    def _on_heartbeat(self, envelope: p.Envelope, now: float, wall: float) -> None:
        beat = p.decode_worker_heartbeat(envelope.body, self.limits)
        worker = self._registered(envelope.identity, now)
        if worker is None:
            return
        if beat.incarnation and worker.incarnation and beat.incarnation != worker.incarnation:
            # Another live process under this name: the routing id goes to whichever
            # connected last (ROUTER_HANDOVER), and its `held` would pass for this
            # registration's and cost its leases. Ignored, and told to stop.
            self._name_taken(envelope.identity, worker, beat.incarnation, now)
            return
        worker.last_heard = now
        if beat.draining and not worker.draining:
            worker.draining = True
            self.placement.leave(worker.name)  # its keys move on now, not when it is gone
            log.info("worker %s is draining", worker.name)
        held = set(beat.held)
        for lease in list(worker.leases.values()):
            # The worker has seen the TASK that carried this lease, yet does
            # not hold it: the message was lost in a reconnect.
            if 0 < lease.dseq <= beat.dseq and (lease.job.id, lease.job.attempt) not in held:
                # Not certain it never ran: a worker also lets go of a task whose
                # result the broker refused.
                self._lease_lost(lease, "lease lost in transit", wall, waiting=True)
        worker.update_foreign(held, beat.dseq)

    def _name_taken(
        self, identity: bytes, worker: WorkerState, incarnation: str, now: float
    ) -> None:
        """ERROR name-taken, naming the incarnation it is for: the routing id may
        reach the registered process by the time it arrives, which must not stop."""
        message = (
            f"worker name {worker.name!r} is taken by another live process (pid {worker.pid} "
            f"on {worker.host}); give each worker its own --name"
        )
        self.rejected[p.E_NAME_TAKEN] += 1
        if self._may_complain(identity, now):
            log.warning("%s: a second process (incarnation %s) uses it", message, incarnation)
        body = {**p.error_body(None, p.E_NAME_TAKEN, message), "incarnation": incarnation}
        self._outbox.append([identity, p.PROTOCOL_WORKER, p.ERROR, p.pack(body)])

    def _on_result(self, envelope: p.Envelope, now: float, wall: float) -> None:
        request = p.decode_result(envelope.body, self.limits)
        name = _name(envelope.identity)
        stale = []
        for outcome in request.results:
            lease = self._current(outcome.id, outcome.attempt, name)
            if lease is None:
                if self._refuse(outcome.id, outcome.attempt, name, "result", wall, ok=outcome.ok):
                    stale.append(outcome.id)
                continue
            self._apply(lease, outcome, wall)
        self._ack(envelope.identity, request.seq, stale)
        worker = self._registered(envelope.identity, now)
        if worker is not None:
            # The ACK goes out before any TASK of this turn: the worker frees these slots first.
            worker.results_acked({(o.id, o.attempt) for o in request.results})

    def _on_checkpoint(self, envelope: p.Envelope, now: float, wall: float) -> None:
        request = p.decode_checkpoint(envelope.body, self.limits)
        name = _name(envelope.identity)
        stale = []
        applied: list[tuple[int, int, str, int, bytes]] = []
        for checkpoint in request.checkpoints:
            lease = self._current(checkpoint.id, checkpoint.attempt, name)
            if lease is None:
                if self._refuse(
                    checkpoint.id,
                    checkpoint.attempt,
                    name,
                    "checkpoint",
                    wall,
                    number=checkpoint.number,
                ):
                    stale.append(checkpoint.id)
            elif checkpoint.number > lease.job.checkpoint_no:  # equal: a resend, already applied
                job = lease.job
                applied.append((job.id, job.attempt, name, checkpoint.number, checkpoint.state))
                job.checkpoint, job.checkpoint_no = checkpoint.state, checkpoint.number
        self.store.checkpoints(applied, wall)
        self._ack(envelope.identity, request.seq, stale)
        self._registered(envelope.identity, now)

    def _on_disconnect(self, envelope: p.Envelope, now: float, wall: float) -> None:
        request = p.decode_worker_disconnect(envelope.body, self.limits)
        worker = self.workers.get(_name(envelope.identity))
        if worker is not None:
            self._remove_worker(worker, f"worker {worker.name} left: {request.reason}", wall)

    def _registered(self, identity: bytes, now: float) -> WorkerState | None:
        """The worker, or None after telling an unknown one to register again."""
        worker = self.workers.get(_name(identity))
        if (
            worker is None
            and now - self._disconnects.get(identity, -1e9) >= self.settings.heartbeat_s
        ):
            if len(self._disconnects) > 10_000:
                self._disconnects.clear()
            self._disconnects[identity] = now
            self._outbox.append(
                [identity, p.PROTOCOL_WORKER, p.DISCONNECT, p.pack({"reason": "unknown worker"})]
            )
        return worker

    def _ack(self, identity: bytes, seq: int, stale: list[int]) -> None:
        self._outbox.append(
            [identity, p.PROTOCOL_WORKER, p.ACK, p.pack({"seq": seq, "stale": stale})]
        )

    def _current(self, task_id: int, attempt: int, worker: str) -> Lease | None:
        lease = self.leases.get(task_id)
        if lease is None or lease.job.attempt != attempt or lease.worker != worker:
            return None
        return lease

    def _refuse(
        self,
        task_id: int,
        attempt: int,
        worker: str,
        what: str,
        wall: float,
        *,
        ok: bool = False,
        number: int = 0,
    ) -> bool:
        """Record a message of a superseded attempt; False for a resend of what was applied."""
        row = self.store.outcome(task_id)
        if row is None:
            return True  # no such task: nothing to record it against
        if row["attempt"] == attempt and row["worker"] == worker:
            # Same attempt, but its lease is gone: a resend only if the log shows
            # this very message applied. A late checkpoint or result of a lease
            # that was lost meanwhile was not applied and must be called stale,
            # or its sender would believe it saved.
            if what == "checkpoint" and row["checkpoint_no"] >= number:
                return False
            if what == "result" and ok and row["state"] == p.SUCCEEDED:
                return False
            if what == "result" and not ok and row["state"] in (p.FAILED, p.DEAD, p.QUEUED):
                return False  # a failure needs no more than being retried or final
        current = self.leases.get(task_id)
        detail = f"{what} of attempt {attempt} refused; task is {row['state']}"
        if current is not None:
            detail += f", attempt {current.job.attempt} held by {current.worker}"
        self.store.event(task_id, "stale", attempt, worker, detail, wall)
        return True

    def _apply(self, lease: Lease, outcome: p.TaskOutcome, wall: float) -> None:
        job = lease.job
        self._end_lease(lease)
        if outcome.ok:
            self._move(p.RUNNING, p.SUCCEEDED)
            self._successes.append((job.id, job.attempt, lease.worker, outcome.value))
            self._announce(job, p.SUCCEEDED, outcome.value, None, lease.worker, wall)
        elif outcome.retry:
            error = outcome.error or "failed without a message"
            self._retry(lease, error, wall, None if outcome.started else NEVER_STARTED)
        else:  # another attempt cannot help: fail now, whatever attempts are left
            self._move(p.RUNNING, p.FAILED)
            self.store.finish(
                job.id, job.attempt, lease.worker, p.FAILED, None, outcome.error, wall
            )
            self._announce(job, p.FAILED, None, outcome.error, lease.worker, wall)

    def _end_lease(self, lease: Lease) -> None:
        task_id = lease.job.id
        self.leases.pop(task_id, None)
        self.orphans.pop(task_id, None)
        worker = self.workers.get(lease.worker)
        if worker is not None:
            worker.leases.pop(task_id, None)

    def _lease_lost(self, lease: Lease, reason: str, wall: float, *, waiting: bool = False) -> None:
        """The attempt ended without a result; `waiting`: it likely never started."""
        self._end_lease(lease)
        self._retry(lease, reason, wall, LIKELY_WAITING if waiting else None)

    def _retry(self, lease: Lease, reason: str, wall: float, unstarted: str | None = None) -> None:
        """Queue the job again, or dead-letter it once its attempts are used up.

        `unstarted`, NEVER_STARTED or LIKELY_WAITING: the attempt is spared, not
        counted against max_attempts, within its bound. A task that kills every
        worker it runs on is still dead-lettered, after at most twice its attempts.
        """
        job = lease.job
        bound = MAX_SPARED if unstarted == NEVER_STARTED else job.max_attempts
        spare = unstarted is not None and job.spared < bound
        if spare:
            job.spared += 1
            # First, so that no error text of the task's own can pass for it.
            reason = f"{p.SPARED_NOTE} ({unstarted}): {reason}"
        counted = job.attempt - job.spared
        if counted >= job.max_attempts:
            error = f"{reason}; gave up after {counted} of {job.max_attempts} attempts"
            self._move(p.RUNNING, p.DEAD)
            self.store.finish(job.id, job.attempt, lease.worker, p.DEAD, None, error, wall)
            self._announce(job, p.DEAD, None, error, lease.worker, wall)
        else:
            self._move(p.RUNNING, p.QUEUED)
            self.store.requeue(job.id, job.attempt, lease.worker, reason, wall, spared=spare)
            self.placement.requeue(job)

    def _announce(
        self,
        job: Job,
        state: str,
        result: bytes | None,
        error: str | None,
        worker: str,
        wall: float,
    ) -> None:
        if job.id not in self.watchers:
            return
        view = {
            "id": job.id,
            "name": job.name,
            "state": state,
            "key": job.key,
            "attempt": job.attempt,
            "max_attempts": job.max_attempts,
            "spared": job.spared,
            "worker": worker,
            "result": result,
            "error": error,
            "created_at": job.created_at,
            "updated_at": wall,
        }
        self._notify(job.id, view)

    def _notify(self, task_id: int, view: dict[str, Any]) -> None:
        """The watchers of a task that reached a final state get its view in a NOTIFY."""
        for identity in self.watchers.pop(task_id, ()):
            self._notices.setdefault(identity, []).append(view)

    # ------------------------------------------------------------ timers

    def _expire(self, now: float, wall: float) -> None:
        expiry = self.settings.expiry_s
        for worker in [w for w in self.workers.values() if now - w.last_heard > expiry]:
            silent = now - worker.last_heard
            self._remove_worker(worker, f"worker {worker.name} lost (silent {silent:.1f} s)", wall)
        for lease in list(self.orphans.values()) if now >= self.orphan_deadline else []:
            self._lease_lost(lease, f"worker {lease.worker} did not return after restart", wall)

    def _remove_worker(self, worker: WorkerState, reason: str, wall: float) -> None:
        log.warning("%s; %d tasks go back to the queue", reason, len(worker.leases))
        del self.workers[worker.name]
        self._replaced.pop(worker.name, None)  # the name is free: any process may take it
        self.placement.leave(worker.name)
        self._leases_lost(worker, list(worker.leases.values()), reason, wall)

    def _leases_lost(
        self, worker: WorkerState, lost: list[Lease], reason: str, wall: float
    ) -> None:
        """Leases lost with a worker process.

        A worker starts its tasks in the order they came, so of those it still
        held, the oldest `concurrency` were running and the rest most likely
        still waited for a slot. A finished task whose result had not left yet
        also takes a place among the oldest, so the task that started in its
        slot, and may have killed the process, is taken as waiting: the guess
        can spare a task that ran, which is why it is capped.
        """
        rank = {task_id: i for i, task_id in enumerate(worker.leases)}
        for lease in lost:
            waiting = rank[lease.job.id] >= worker.concurrency
            self._lease_lost(lease, reason, wall, waiting=waiting)

    # ------------------------------------------------------------ dispatch

    def _dispatch(self) -> None:
        """Lease queued jobs to workers with credit; one TASK message per worker."""
        batches: dict[str, list[Lease]] = {}
        granted = 0
        for job, worker in self.placement.place(self.workers):
            if worker.may_hold((job.id, job.attempt + 1)):
                # The worker still holds this very attempt of a task with this id, from
                # before the log went back (restored from a copy, or a power loss with
                # --synchronous normal) and the id was given out again; or its stale
                # result was ACKed and it may not have heard yet. Its result (again)
                # would pass for this lease's. The job waits until the worker's
                # heartbeat no longer lists the pair. Meanwhile it takes that worker's
                # spare credit in every placement: a rare case, kept simple.
                self.placement.requeue(job)
                continue
            self._grant(job, worker, batches)
            granted += 1
        self.counts[p.QUEUED] -= granted
        self.counts[p.RUNNING] += granted
        for name, leases in batches.items():
            self._send_tasks(self.workers[name], leases)

    def _move(self, before: str, after: str) -> None:
        self.counts[before] -= 1
        self.counts[after] += 1

    def _grant(self, job: Job, worker: WorkerState, batches: dict[str, list[Lease]]) -> None:
        job.attempt += 1
        lease = Lease(job, worker.name, dseq=0)
        self.leases[job.id] = lease
        worker.leases[job.id] = lease
        self._new_leases.append((job.id, job.attempt, worker.name))
        batches.setdefault(worker.name, []).append(lease)

    def _send_tasks(self, worker: WorkerState, leases: list[Lease]) -> None:
        """TASK messages of at most max_batch tasks and half of max_message_bytes each."""
        for chunk in p.split_by_size(leases, _lease_bytes, self.limits):
            worker.dseq += 1
            tasks = []
            for lease in chunk:
                lease.dseq = worker.dseq
                job = lease.job
                tasks.append(
                    p.assignment_body(
                        job.id,
                        job.attempt,
                        job.name,
                        job.payload,
                        job.checkpoint,
                        job.checkpoint_no,
                    )
                )
            self._to_worker(worker, p.TASK, {"dseq": worker.dseq, "tasks": tasks})

    def _flush_writes(self, wall: float) -> None:
        """Writes gathered during the turn, in bulk, still inside its transaction."""
        if self._new_leases:
            self.store.lease(self._new_leases, wall)
            self._new_leases.clear()
        if self._successes:
            self.store.finish_many(self._successes, wall)
            self._successes.clear()


def waiting_path_first(outbox: list[list[bytes]]) -> list[list[bytes]]:
    """The outbox with the peers that get a TASK or a NOTIFY first, each peer's
    messages still in their order (frame 0 is the peer's routing id)."""
    if len(outbox) < 2:
        return outbox
    first = {frames[0] for frames in outbox if frames[2] in _ON_A_WAITING_PATH}
    if not first:
        return outbox
    return [f for f in outbox if f[0] in first] + [f for f in outbox if f[0] not in first]


def _lease_bytes(lease: Lease) -> int:
    job = lease.job
    return len(job.payload) + len(job.checkpoint or b"") + len(job.name) + 64


def _view_bytes(view: dict[str, Any] | None) -> int:
    # A client's socket drops a message over its size limit without a word
    # (ZMQ_MAXMSGSIZE), and a thousand large results would be over it.
    if view is None:  # an unknown id in a REPLY to GET
        return 16
    # Names and keys are short; an error may be 8192 characters of any script,
    # so it is counted in bytes (a success has none: the hot path pays nothing).
    text = len(view["name"]) + len(view["key"] or "") + len(view["worker"] or "")
    error = view["error"]
    error_bytes = len(error.encode()) if error else 0
    return len(view["result"] or b"") + error_bytes + text + 128


def _event_bytes(event: dict[str, Any]) -> int:
    # A task that checkpointed for a day has a history of megabytes. Bytes, not
    # characters: a detail may quote an error in any script.
    text = event["kind"] + (event["worker"] or "") + (event["detail"] or "")
    return len(text.encode()) + 48


def _seq(envelope: p.Envelope) -> int | None:
    seq = envelope.body.get("seq")
    valid = isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63
    return seq if valid else None


def _name(identity: bytes) -> str:
    """A worker's name is its routing id; ids that are not UTF-8 are shown in hex."""
    try:
        return identity.decode("utf-8")
    except UnicodeDecodeError:
        return identity.hex()
