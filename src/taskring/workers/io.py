"""The worker's I/O loop: the one thread that owns the DEALER socket.

It never runs user code, so heartbeats keep flowing however long a task
computes. Task threads (and the process pool's relay threads) reach it only
through the Inbox; everything else (socket, held leases, unacknowledged
messages) belongs to the loop's thread alone, so nothing here needs a lock.

The loop is steppable: `poll_once(now)` waits for input at most until the next
timer, handles what arrived, then runs the timers, on every turn.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket as _socket
import time
import uuid
from collections.abc import Callable, Mapping
from operator import attrgetter
from typing import Any

import zmq

from taskring import protocol
from taskring.errors import RequestRejected
from taskring.protocol import PROTOCOL_WORKER, Assignment, TaskOutcome
from taskring.reliable import Backoff, Outstanding
from taskring.workers.errors import WorkerConfigError, WorkerStopped
from taskring.workers.inbox import CheckpointRequest, Inbox, Waiter
from taskring.workers.journal import AckJournal
from taskring.workers.runner import failure
from taskring.workers.settings import WorkerSettings

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (task id, attempt): one lease

MAX_RECV_PER_TURN = 1000  # then run the timers, so a flood of messages cannot starve them
# Error codes after which resending the same frames can only fail again.
FATAL_CODES = frozenset(
    {
        protocol.E_BAD_FRAMES,
        protocol.E_BAD_PROTOCOL,
        protocol.E_UNKNOWN_COMMAND,
        protocol.E_BAD_BODY,
        protocol.E_TOO_LARGE,
    }
)


class IOLoop:
    """Registration, heartbeats, dispatch to the pool, results and checkpoints until ACKed."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        settings: WorkerSettings,
        name: str,
        tasks: Mapping[str, int],
        submit: Callable[[Assignment], None],
        *,
        take_waiting: Callable[[], list[Assignment]] = list,
        limits: protocol.Limits = protocol.DEFAULT_LIMITS,
        on_welcome: Callable[[int], None] | None = None,
        journal: AckJournal | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.limits = limits
        self._use_limits(limits)  # the broker's, where smaller, once it WELCOMEs us
        self._context = context
        self._tasks = dict(tasks)  # name -> default max_attempts, as READY announces them
        self._submit = submit
        self._take_waiting = take_waiting  # from the pool: the tasks no slot has started
        self._on_welcome = on_welcome
        self.inbox = Inbox()
        self._poller = zmq.Poller()
        self._poller.register(self.inbox.fileno(), zmq.POLLIN)
        self._socket: zmq.Socket[bytes] | None = None
        # The settings' timing applies until WELCOME brings the broker's.
        self._heartbeat_s = settings.heartbeat_s
        self._liveness = settings.liveness
        self._outstanding = Outstanding(self._backoff())
        self._results: dict[int, list[TaskOutcome]] = {}  # RESULT seq -> the outcomes it carries
        self._journal = journal
        # CHECKPOINT seq -> the checkpoints it carries, whose tasks wait for its ACK
        self._waiters: dict[int, list[CheckpointRequest]] = {}
        self._finished: list[TaskOutcome] = []  # this turn's outcomes, sent as one RESULT
        self.held: dict[Key, None] = {}  # ordered set: running, or result not yet ACKed
        self.running: set[Key] = set()  # handed to the pool, outcome not yet back
        self._ready_seqs: set[int] = set()  # READYs sent on this socket, any may be WELCOMEd
        self._ready_due = 0.0
        self._heartbeat_due = 0.0
        self._last_heard = 0.0
        self.welcomed = False
        self._resend_on_welcome = False
        self._first_delay_s = min(settings.heartbeat_s, settings.reconnect_max_s)
        self._reconnect_delay_s = self._first_delay_s
        self.reconnect_at = -math.inf  # monotonic time of the next connect; first turn at once
        self._dseq = 0
        # A restarted process must not be mistaken for a reconnect of this one.
        self._incarnation = uuid.uuid4().hex
        self.registrations = 0  # WELCOMEs that registered this worker
        # Draining: tell the broker, hand back what has not started, finish the rest.
        self.stopping = False
        self._drain_announced = False
        self.closed = False
        self._stale: set[tuple[int, int]] = set()  # held attempts the broker said are stale
        # Set when the broker says another live process registered this worker's name:
        # the reason, and the Worker stops at once, without a DISCONNECT in that name.
        self.name_taken: str | None = None

    # ------------------------------------------------------------ task side (any thread)

    def finished(self, outcome: TaskOutcome) -> None:
        if not self.inbox.put(outcome):
            log.debug("result of task %s dropped: the worker has stopped", outcome.id)

    def checkpoint(self, task_id: int, attempt: int, number: int, state: bytes) -> bool:
        """Hand a checkpoint to the loop; block until the broker ACKs it. Returns stale."""
        waiter = Waiter()
        if not self.inbox.put(CheckpointRequest(task_id, attempt, number, state, waiter)):
            raise WorkerStopped("the worker stopped; the checkpoint was not stored")
        return waiter.wait()

    @property
    def incarnation(self) -> str:
        """Random per process, sent in READY and HEARTBEAT: tells this process apart
        from another that uses the same name."""
        return self._incarnation

    def is_stale(self, task_id: int, attempt: int) -> bool:
        """True once the broker said this attempt's lease is gone (any thread)."""
        return (task_id, attempt) in self._stale

    def wake(self) -> None:
        self.inbox.wake()

    # ------------------------------------------------------------ the loop

    @property
    def unacked(self) -> int:
        return len(self._outstanding)

    @property
    def connected(self) -> bool:
        return self._socket is not None

    def poll_once(self, now: float | None = None, timeout_s: float | None = None) -> None:
        """One turn: wait for input (at most until the next timer), handle it, run timers."""
        clock = now if now is not None else time.monotonic()
        if timeout_s is None:
            timeout_s = self._until_next_timer(clock)
        events = dict(self._poller.poll(math.ceil(max(0.0, timeout_s) * 1000)))
        clock = now if now is not None else time.monotonic()
        if self._socket is not None and self._socket in events:
            self._read_socket(clock)
        # Only when woken by it: an empty pipe's read raises, and that cost 20 µs
        # in the turn that hands a task to a slot, which waits for the GIL.
        if self.inbox.fileno() in events:
            self._take_inbox(clock)
        # Before the timers, which cost about 15 µs of a waiting caller's round trip
        # here; the hand-backs below come only after them, and go in a RESULT of their own.
        if self._finished:
            self._send_results(clock)
        self._run_timers(clock)
        if self.stopping and self._drain_announced:
            # Only once the HEARTBEAT that says this worker drains has gone (in
            # _run_timers, or with a WELCOME), or the broker could lease these
            # tasks straight back to it. At once after it: a slot that frees
            # meanwhile would start one.
            self._hand_back(self._take_waiting())
            if self._finished:
                self._send_results(clock)

    def _window_s(self) -> float:
        return self._heartbeat_s * self._liveness

    def _backoff(self) -> Backoff:
        # The first resend after one heartbeat; never wait longer than the liveness
        # window, after which a silent broker is replaced by a new connection anyway.
        return Backoff(initial_s=self._heartbeat_s, factor=2.0, max_s=self._window_s())

    def _until_next_timer(self, now: float) -> float:
        if self._socket is None:
            deadlines = [self.reconnect_at]
        else:
            deadlines = [
                self._heartbeat_due if self.welcomed else self._ready_due,
                self._last_heard + self._window_s(),
            ]
        due = self._outstanding.next_due()
        if due is not None:
            deadlines.append(due)
        return min(max(0.0, min(deadlines) - now), self._heartbeat_s)

    def _run_timers(self, now: float) -> None:
        if self._socket is None:
            if now >= self.reconnect_at:
                self._connect(now)
            return
        silent_s = now - self._last_heard
        if silent_s > self._window_s():
            delay_s = self._reconnect_delay_s
            if self.held:
                # A restarted broker waits only one liveness window for our READY before
                # it leases what we hold to someone else. A delay grown to seconds by a
                # long outage made a live worker miss that window, and its task ran
                # twice (tests/chaos/test_crashes.py: leases survive a broker restart).
                # While holding tasks, try again after one heartbeat; libzmq's own
                # RECONNECT_IVL paces the connection attempts in between.
                delay_s = min(delay_s, self._heartbeat_s)
            log.warning(
                "worker %s: broker silent for %.2f s; reconnecting in %.2f s",
                self.name,
                silent_s,
                delay_s,
            )
            self._drop_socket()
            self.reconnect_at = now + delay_s
            self._reconnect_delay_s = min(
                self._reconnect_delay_s * 2, self.settings.reconnect_max_s
            )
            return
        if not self.welcomed and now >= self._ready_due:
            self._send_ready(now)
        # The drain is told at once, not at the next beat: every TASK the broker
        # sends from now on would only delay the stop.
        drain_news = self.stopping and not self._drain_announced
        if self.welcomed and (now >= self._heartbeat_due or drain_news):
            self._send_heartbeat(now)
        if self.welcomed:
            for frames in self._outstanding.due(now):
                self._send(frames)

    def _send_heartbeat(self, now: float) -> None:
        body: dict[str, Any] = {
            "dseq": self._dseq,
            "held": self._held_list(),
            "incarnation": self._incarnation,
        }
        if self.stopping:
            body["draining"] = True
        sent = self._send(protocol.frames(PROTOCOL_WORKER, protocol.HEARTBEAT, body))
        self._drain_announced = self.stopping and sent
        self._heartbeat_due = now + self._heartbeat_s

    # ------------------------------------------------------------ the socket

    def _connect(self, now: float) -> None:
        s = self.settings
        sock: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.name.encode())  # same identity on every reconnect
        if s.curve is not None:
            s.curve.apply(sock)  # keys are read when the connection starts: before connect
        sock.setsockopt(zmq.LINGER, 0)
        # libzmq's own reconnect and heartbeat bring the TCP link back within a
        # second after a network cut heals; its defaults took 25 s.
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(100, min(1000, int(s.reconnect_max_s * 1000))))
        heartbeat_ms = max(1, int(s.heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms * s.liveness)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        try:
            sock.connect(s.endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise WorkerConfigError(f"cannot connect to {s.endpoint!r}: {e}") from e
        self._socket = sock
        self._poller.register(sock, zmq.POLLIN)
        self._last_heard = now
        self.welcomed = False
        self._ready_seqs.clear()
        # Not before the WELCOME: it says the broker's limits, and a message over
        # them makes its socket drop the connection, with the READY's answer.
        self._resend_on_welcome = True
        self._send_ready(now)

    def _drop_socket(self) -> None:
        if self._socket is not None:
            self._poller.unregister(self._socket)
            self._socket.close(linger=0)  # drop whatever the old pipe still queues
            self._socket = None
        self.welcomed = False

    def _send(self, frames: list[bytes]) -> bool:
        if self._socket is None:
            return False
        try:
            protocol.send_frames(self._socket, frames, protocol.NOBLOCK)
        except zmq.Again:
            log.debug("send queue full; the message waits for its resend")
            return False
        return True

    def _send_ready(self, now: float) -> None:
        # A registration in the making: the broker will take this worker as one
        # that does not drain until a HEARTBEAT says so again.
        self._drain_announced = False
        seq = self._outstanding.next_seq()  # one seq space: ACK and ERROR seqs stay unambiguous
        self._ready_seqs.add(seq)
        body = {
            "seq": seq,
            "capacity": self.settings.capacity,
            "concurrency": self.settings.concurrency,
            "tasks": self._tasks,
            "held": self._held_list(),
            "pid": os.getpid(),
            "host": _socket.gethostname(),
            "pool": self.settings.pool,
            "incarnation": self._incarnation,
            "dseq": self._dseq,
        }
        self._send(protocol.frames(PROTOCOL_WORKER, protocol.READY, body))
        self._ready_due = now + self._heartbeat_s

    def _held_list(self) -> list[list[int]]:
        return [[task_id, attempt] for task_id, attempt in self.held]

    def _read_socket(self, now: float) -> None:
        sock = self._socket
        for i in range(MAX_RECV_PER_TURN):
            if sock is None or sock is not self._socket:
                return
            if i and not protocol.has_message(sock):
                return
            try:
                parts = protocol.recv_frames(sock, protocol.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = now  # any message is a sign of life
            try:
                command, body = protocol.decode_reply(parts, PROTOCOL_WORKER)
                self._handle(command, body, now)
            except protocol.ProtocolError as e:
                log.warning("worker %s: bad message from the broker ignored: %s", self.name, e)

    def _handle(self, command: bytes, body: dict[str, Any], now: float) -> None:
        if command == protocol.TASK:
            self._on_dispatch(protocol.decode_dispatch(body))
        elif command == protocol.ACK:
            self._on_ack(protocol.decode_ack(body))
        elif command == protocol.HEARTBEAT:
            # Once stale, always: a new set each time, so task threads read it unlocked.
            stale = self._stale | set(protocol.decode_broker_heartbeat(body))
            self._stale = {key for key in stale if key in self.held}
        elif command == protocol.WELCOME:
            self._on_welcome_message(protocol.decode_welcome(body), now)
        elif command == protocol.DISCONNECT:
            reason = body.get("reason")
            log.info(
                "worker %s: broker does not know us (%s); registering again", self.name, reason
            )
            self._register_again(now)
        elif command == protocol.ERROR:
            self._on_error(body, now)
        else:
            log.warning("worker %s: unknown command %r ignored", self.name, command[:16])

    # ------------------------------------------------------------ broker messages

    def _register_again(self, now: float) -> None:
        self.welcomed = False
        self._ready_seqs.clear()
        self._resend_on_welcome = True  # the broker may have dropped what it did not know
        self._send_ready(now)

    def _on_welcome_message(self, welcome: protocol.Welcome, now: float) -> None:
        if welcome.seq not in self._ready_seqs:
            log.debug("WELCOME for a READY of an older registration ignored")
            return
        first = not self.welcomed
        self.welcomed = True
        # The broker numbers TASK messages from here on; TASKs sent before this
        # WELCOME arrived before it on the same pipe.
        self._dseq = welcome.dseq
        self._heartbeat_s = welcome.heartbeat_s
        self._liveness = welcome.liveness
        self._outstanding.backoff = self._backoff()
        # The reconnect wait starts at the *broker's* heartbeat interval (protocol.md,
        # Heartbeating): after WELCOME the broker's timing rules. It started at the
        # configured 1 s (which `taskring worker` cannot change), 5 times the spec's
        # wait behind a 0.2 s broker (found by tests/chaos/test_crashes.py).
        self._first_delay_s = min(welcome.heartbeat_s, self.settings.reconnect_max_s)
        self._reconnect_delay_s = self._first_delay_s
        self._heartbeat_due = now + self._heartbeat_s
        if self.stopping:
            # Before any resend: a hand-back the broker read first would come
            # straight back to this worker, which it still takes as serving.
            self._send_heartbeat(now)
        limits = _smaller(self.limits, welcome.limits)
        if limits != self._send_limits:
            self._use_limits(limits)
            self._resend_on_welcome = False  # all of it goes below, cut anew
            self._cut_again(now)
        if self._resend_on_welcome:
            self._resend_on_welcome = False
            for frames in self._outstanding.resend_all(now):
                self._send(frames)
        if first:
            self.registrations += 1
            if self._on_welcome is not None:
                self._on_welcome(self.registrations)

    def _on_dispatch(self, dispatch: protocol.Dispatch) -> None:
        self._dseq = dispatch.dseq
        for a in dispatch.tasks:
            key = (a.id, a.attempt)
            if key in self.held:
                log.warning("task %s attempt %s is already held; duplicate ignored", *key)
                continue
            if len(self.held) >= self.settings.capacity:
                # The broker's credit should prevent this; never hold more than capacity.
                reason = f"worker {self.name} is at capacity ({len(self.held)}); task not started"
                log.warning("task %s attempt %s refused: %s", a.id, a.attempt, reason)
                self._finished.append(
                    failure(a, reason, retry=True, started=False, limits=self.limits)
                )
                continue
            self.held[key] = None  # until its outcome is ACKed, whatever the outcome
            if key in self._stale:
                # Called stale while held before, and leased again since: the broker's
                # log went back and gave the attempt out anew. This lease is current.
                # A new set, as task threads read it unlocked.
                self._stale = self._stale - {key}
            if self._drain_announced:
                # Sent before the broker read that this worker drains: another can run it.
                self._hand_back([a])
            else:
                self.running.add(key)
                self._submit(a)

    def _hand_back(self, waiting: list[Assignment]) -> None:
        """Tasks this stopping worker has not started go back: another can run them now."""
        if waiting:
            log.info("worker %s stopping: %d task(s) handed back", self.name, len(waiting))
        reason = f"worker {self.name} stopped before it started the task"
        for a in waiting:
            self.running.discard((a.id, a.attempt))
            self._finished.append(failure(a, reason, retry=True, started=False, limits=self.limits))

    def _on_ack(self, ack: protocol.Ack) -> None:
        if self._outstanding.ack(ack.seq) is None:
            return  # an ACK of a resend we had already seen acknowledged
        outcomes = self._results.pop(ack.seq, None)
        if outcomes is not None:
            for o in outcomes:
                self.held.pop((o.id, o.attempt), None)
                if self._journal is not None:
                    self._journal.result(o.id, o.attempt, o.ok, stale=o.id in ack.stale)
            if ack.stale:
                log.info("results of superseded attempts recorded, not applied: %s", ack.stale)
            return
        for request in self._waiters.pop(ack.seq, []):
            stale = request.task_id in ack.stale
            if self._journal is not None:
                self._journal.checkpoint(
                    request.task_id, request.attempt, request.number, stale=stale
                )
            request.waiter.done(stale=stale)

    def _on_error(self, body: dict[str, Any], now: float) -> None:
        code, message, seq = str(body.get("code")), str(body.get("message")), body.get("seq")
        log.warning("worker %s: broker error %s: %s", self.name, code, message)
        if code == protocol.E_UNKNOWN_WORKER:
            self._register_again(now)
            return
        if code == protocol.E_NAME_TAKEN:
            # Only if it is about this process: the routing id is shared, and the
            # answer to the other process's HEARTBEAT may reach this one.
            if body.get("incarnation") == self._incarnation:
                log.error("worker %s: %s", self.name, message)
                self.name_taken = message
            return
        if code not in FATAL_CODES or type(seq) is not int or seq not in self._outstanding:
            return  # transient (or about no message of ours): the resend timer retries
        self._outstanding.ack(seq)
        # One bad item rejects the whole message, and the same frames can only fail
        # again. Each item of a rejected batch goes again alone, so that only the
        # bad one fails (a broker with smaller limits than ours, say).
        outcomes = self._results.pop(seq, [])
        if len(outcomes) > 1:
            for o in outcomes:
                self._send_result([o], now)
        elif outcomes and outcomes[0].ok:
            # Its value broke a broker limit that WELCOME did not announce (a broker
            # from before max_result_bytes was adopted, say): the task failed, and
            # another attempt would only make the same value.
            (o,) = outcomes
            log.error("broker rejected the result of task %s attempt %s", o.id, o.attempt)
            error = f"the broker refused the result ({code}): {message}"
            self._send_result([_failed(o, error)], now)
        elif outcomes:
            (o,) = outcomes
            log.error("broker rejected the outcome of task %s attempt %s; dropped", o.id, o.attempt)
            self.held.pop((o.id, o.attempt), None)
        checkpoints = self._waiters.pop(seq, [])
        if len(checkpoints) > 1:
            for request in checkpoints:
                self._send_checkpoints([request], now)
        elif checkpoints:
            checkpoints[0].waiter.fail(RequestRejected(code, message))

    # ------------------------------------------------------------ task side, on the loop

    def _take_inbox(self, now: float) -> None:
        checkpoints = []
        for item in self.inbox.take():
            if isinstance(item, TaskOutcome):
                self.running.discard((item.id, item.attempt))
                self._finished.append(item)
            elif isinstance(item, CheckpointRequest):
                checkpoints.append(item)
        self._cut_checkpoints(checkpoints, now)

    def _cut_checkpoints(self, checkpoints: list[CheckpointRequest], now: float) -> None:
        """CHECKPOINTs within the limits; a state too large for any is refused at once."""
        if (room := self._item_room) is not None:
            fits = []
            for request in checkpoints:
                if (size := _checkpoint_bytes(request)) <= room:
                    fits.append(request)
                else:
                    error = RequestRejected(protocol.E_TOO_LARGE, self._too_large(size))
                    request.waiter.fail(error)
            checkpoints = fits
        for batch in protocol.split_by_size(
            checkpoints, _checkpoint_bytes, self._send_limits, task_id=attrgetter("task_id")
        ):
            self._send_checkpoints(batch, now)

    def _cut_again(self, now: float) -> None:
        """The broker's limits shrank: what was cut for the larger ones goes again, cut anew.

        Under new sequence numbers; the broker applies an item once whichever
        message brings it, as when a rejected batch goes again item by item.
        """
        for seq in list(self._results):
            self._outstanding.ack(seq)
            self._finished.extend(self._results.pop(seq))
        checkpoints = []
        for seq in list(self._waiters):
            self._outstanding.ack(seq)
            checkpoints.extend(self._waiters.pop(seq))
        self._cut_checkpoints(checkpoints, now)
        if self._finished:
            self._send_results(now)

    def _use_limits(self, limits: protocol.Limits) -> None:
        """Cut messages to these limits from now on."""
        self._send_limits = limits
        # What one item may take: the message limit less room for the envelope. None
        # when the largest result or state this worker lets a task make fits anyway,
        # as with the defaults: then no item needs weighing on its own.
        room = limits.max_message_bytes - min(1024, limits.max_message_bytes // 4)
        own = self.limits
        largest = max(own.max_result_bytes + 4 * own.max_error_len, own.max_checkpoint_bytes)
        self._item_room = room if room < largest + 64 else None
        # The runner already keeps results within this worker's own max_result_bytes.
        cap = limits.max_result_bytes
        self._result_cap = cap if cap < own.max_result_bytes else None

    def _too_large(self, size: int) -> str:
        limit = self._send_limits.max_message_bytes
        return f"{size} bytes do not fit the broker's max_message_bytes ({limit})"

    def _send_checkpoints(self, batch: list[CheckpointRequest], now: float) -> None:
        seq = self._outstanding.next_seq()
        items = [
            {"id": c.task_id, "attempt": c.attempt, "number": c.number, "state": c.state}
            for c in batch
        ]
        body = {"seq": seq, "checkpoints": items}
        frames = protocol.frames(PROTOCOL_WORKER, protocol.CHECKPOINT, body)
        self._outstanding.add(seq, frames, now)
        self._waiters[seq] = batch
        if self.welcomed:  # else it goes with the others once WELCOME comes
            self._send(frames)

    def _send_results(self, now: float) -> None:
        """All of this turn's outcomes in one RESULT, split only by the message limits.

        A result the broker would refuse is sent as the failure it is.
        """
        outcomes = self._finished
        if self._item_room is not None or self._result_cap is not None:
            outcomes = [self._sendable(o) for o in outcomes]
        for batch in protocol.split_by_size(
            outcomes, _outcome_bytes, self._send_limits, task_id=attrgetter("id")
        ):
            self._send_result(batch, now)
        self._finished = []

    def _sendable(self, o: TaskOutcome) -> TaskOutcome:
        """The outcome, or the failure it is if its value is over the broker's limits."""
        size = len(o.value or b"")
        if self._result_cap is not None and size > self._result_cap:
            error = f"result of {size} bytes exceeds the broker's max_result_bytes"
            return _failed(o, f"{error} ({self._result_cap})")
        if self._item_room is not None and _outcome_bytes(o) > self._item_room:
            return _failed(o, "result: " + self._too_large(size))
        return o

    def _send_result(self, batch: list[TaskOutcome], now: float) -> None:
        seq = self._outstanding.next_seq()
        results = []
        for o in batch:
            item = {
                "id": o.id,
                "attempt": o.attempt,
                "ok": o.ok,
                "value": o.value,
                "error": o.error,
                "retry": o.retry,
            }
            if not o.started:  # only hand-backs say it: older brokers ignore it
                item["started"] = False
            results.append(item)
        frames = protocol.frames(PROTOCOL_WORKER, protocol.RESULT, {"seq": seq, "results": results})
        self._outstanding.add(seq, frames, now)
        self._results[seq] = batch
        if self.welcomed:  # else it goes with the others once WELCOME comes
            self._send(frames)

    # ------------------------------------------------------------ shutdown

    def close(self, *, disconnect: bool, linger_s: float = 0.0) -> None:
        """Release blocked checkpoints, say DISCONNECT if asked, close the socket."""
        if self.closed:
            return
        self.closed = True
        stopped = WorkerStopped("the worker stopped before the broker acknowledged the checkpoint")
        for item in self.inbox.close():
            if isinstance(item, CheckpointRequest):
                item.waiter.fail(stopped)
        for batch in self._waiters.values():
            for request in batch:
                request.waiter.fail(stopped)
        self._waiters.clear()
        if self._socket is not None:
            if disconnect:
                body = {"reason": "shutdown"}
                self._send(protocol.frames(PROTOCOL_WORKER, protocol.DISCONNECT, body))
            self._poller.unregister(self._socket)
            # A bounded linger gives the DISCONNECT its chance without risking a hang.
            self._socket.close(linger=int(linger_s * 1000))
            self._socket = None


def _smaller(own: protocol.Limits, broker: dict[str, int]) -> protocol.Limits:
    """What this worker may send: its own bounds, or the broker's if smaller.

    Over the broker's max_message_bytes, the answer is an ERROR without a seq (which
    names no message to give up on) or, past ZMQ_MAXMSGSIZE, a dropped connection.
    A result over its max_result_bytes is refused with the whole RESULT it came in.
    """
    bounds = ("max_message_bytes", "max_batch", "max_result_bytes")
    tighter = {k: min(getattr(own, k), broker[k]) for k in bounds if k in broker}
    return dataclasses.replace(own, **tighter)


def _failed(outcome: TaskOutcome, error: str) -> TaskOutcome:
    """A result the broker would refuse, as the failure it is: another attempt would
    only make the same value."""
    return outcome._replace(ok=False, value=None, error=error, retry=False)


def _checkpoint_bytes(request: CheckpointRequest) -> int:
    return len(request.state) + 64


def _outcome_bytes(outcome: TaskOutcome) -> int:
    # An error may be 8192 characters of any script: count its bytes (a success has none).
    error = outcome.error
    return len(outcome.value or b"") + (len(error.encode()) if error else 0) + 64
