"""The Python API for pushing tasks and reading their results.

A Client owns one DEALER socket and is used from one thread. Every request
carries a sequence number; the client keeps its frames until the broker's
REPLY (or ERROR) with that number arrives and resends the very same frames
when the answer is late (reliable.Outstanding), so a lost message costs a
resend, never a second task: the broker deduplicates on (client id, seq).
An answer whose seq is no longer outstanding (a duplicate, or one that came
after its request was given up) is dropped on receipt.

NOTIFY messages (a task reached a final state) may arrive at any moment,
between or inside other requests; they are buffered until `wait`, `result`
or `as_completed` looks at them. They are only a hint (the broker forgets
its watches when it restarts), so waiting also asks again with GET about
once a second.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import zmq

from taskring import protocol
from taskring.errors import (
    BrokerUnavailable,
    RequestRejected,
    ResultTimeout,
    TaskNotFound,
    TaskringError,
)
from taskring.payloads import encode_many, payload
from taskring.reliable import Backoff, Outstanding
from taskring.security import CurveClientConfig
from taskring.taskinfo import TaskHandle, TaskInfo, is_int, malformed, outcome

__all__ = ["DEFAULT_ENDPOINT", "Client", "TaskHandle", "TaskInfo"]

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
_LIMITS = protocol.DEFAULT_LIMITS
# Final views pushed by NOTIFY and not yet read. Oldest are dropped past this:
# a dropped hint only means the safety-net GET finds the state instead.
_MAX_BUFFERED_NOTIFY = 100_000
# Ids submitted with a NOTIFY watch, remembered so wait() need not GET them first.
_MAX_WATCHED = 1_000_000
# Ids the safety-net GET asks about per round, after the first round asked about all.
_REPOLL_IDS = 5_000
# Messages handled per socket wake-up before timers get a turn.
_MAX_DRAIN = 10_000


# ---------------------------------------------------------------- the client


class Client:
    """A connection to the broker for submitting tasks and reading results.

    `timeout_s` bounds how long one request may go unanswered (it is resent
    meanwhile with `backoff`); past it the request raises BrokerUnavailable.
    `repoll_s` is how often waiting asks again with GET. `curve` encrypts and
    authenticates the connection to a broker that requires CURVE. Not thread-safe:
    use one Client per thread.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout_s: float = 10.0,
        backoff: Backoff | None = None,
        repoll_s: float = 1.0,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: CurveClientConfig | None = None,
        limits: protocol.Limits | None = None,
    ) -> None:
        if timeout_s <= 0 or repoll_s <= 0:
            raise ValueError("timeout_s and repoll_s must be positive")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.repoll_s = repoll_s
        self.identity = b"c-" + uuid.uuid4().hex.encode()
        self._out = Outstanding(backoff)
        self._answers: dict[int, tuple[bytes, dict[str, Any]]] = {}
        self._notified: dict[int, dict[str, Any]] = {}
        self._watched: set[int] = set()
        # The broker's size limits: given, or asked (STATUS) by the first submit_many and
        # asked again after the broker stopped answering (it may restart with others).
        self._limits = limits
        self._limits_given = limits is not None
        sock: zmq.Socket[bytes] = (context or zmq.Context.instance()).socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        # Come back quickly after a broker restart; notice a dead peer in seconds.
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        try:
            if curve is not None:
                curve.apply(sock)  # keys must be set before connect
            sock.connect(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise TaskringError(f"cannot connect to {endpoint!r}: {e}") from e
        except TaskringError:
            sock.close(linger=0)  # an unusable key file
            raise
        self._sock = sock

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(linger=0)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.endpoint!r})"

    # ------------------------------------------------------------ submitting

    def submit(
        self,
        name: str,
        /,
        *args: Any,
        key: str | None = None,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
        kwargs: Mapping[str, Any] | None = None,
        strict: bool = False,
    ) -> TaskHandle:
        """Queue one task; returns once the broker has committed it.

        Tasks with the same `key` go to the same worker while it lives. An
        `idempotency_key` already used returns the existing task's id, which
        makes a submit safe to repeat after BrokerUnavailable. With `strict`,
        a name no worker ever registered raises RequestRejected
        ("unknown-task") and stores nothing.
        """
        item: dict[str, Any] = {"name": name, "payload": payload(name, 0, args, kwargs or {})}
        if key is not None:
            item["key"] = key
        if idempotency_key is not None:
            item["idem"] = idempotency_key
        if max_attempts is not None:
            item["max_attempts"] = max_attempts
        reply = self._request(protocol.SUBMIT, {"tasks": [item], "watch": True, "strict": strict})
        (task_id,) = _reply_ids(reply, 1)
        self._remember_watched([task_id])
        unknown, known = _unknown_names(reply)
        if unknown:
            log.warning(
                "no worker has registered task %r yet; it stays queued until one does "
                "(known tasks: %s)",
                name,
                ", ".join(known) or "none",
            )
        return TaskHandle(self, task_id, unknown_name=bool(unknown), known_names=known)

    def submit_many(
        self,
        name: str,
        arglist: Iterable[Sequence[Any]],
        *,
        key: Callable[[Sequence[Any]], str | None] | None = None,
        batch: int = 500,
        window: int = 8,
        strict: bool = False,
    ) -> list[int]:
        """Queue one task per argument sequence; returns their ids in input order.

        Every argument sequence is encoded before anything is sent, so an
        argument msgpack cannot carry raises TypeError and queues nothing.
        Tasks travel `batch` to a SUBMIT with up to `window` SUBMITs in
        flight. If the broker rejects a batch (RequestRejected), the batches
        it had already accepted stay queued.
        """
        if not 1 <= batch <= _LIMITS.max_batch:
            raise ValueError(f"batch must be 1..{_LIMITS.max_batch}")
        if window < 1:
            raise ValueError("window must be at least 1")
        items = encode_many(name, arglist, key)
        # Cut by size too: the broker's socket drops a SUBMIT over its
        # max_message_bytes without an answer, and each task may be 1 MiB.
        limits = self.broker_limits()
        limits = dataclasses.replace(limits, max_batch=min(batch, limits.max_batch))
        name_bytes = len(name.encode()) + 32

        def item_bytes(item: dict[str, Any]) -> int:
            key = item.get("key")
            return len(item["payload"]) + name_bytes + (len(key.encode()) if key else 0)

        batches = protocol.split_by_size(items, item_bytes, limits)
        ids: list[list[int]] = [[] for _ in batches]
        in_flight: dict[int, tuple[int, float]] = {}  # seq -> (batch index, deadline)
        sent = answered = 0
        warned = False
        try:
            while answered < len(batches):
                # The first batch goes alone: every batch has the same name, so a
                # strict rejection comes before anything else is stored.
                limit = 1 if answered == 0 else window
                while sent < len(batches) and len(in_flight) < limit:
                    body = {"tasks": batches[sent], "watch": True, "strict": strict}
                    seq = self._start(protocol.SUBMIT, body)
                    in_flight[seq] = (sent, time.monotonic() + self.timeout_s)
                    sent += 1
                progressed = False
                for seq in [s for s in in_flight if s in self._answers]:
                    reply = self._take(seq)
                    index, _ = in_flight.pop(seq)
                    ids[index] = _reply_ids(reply, len(batches[index]))
                    self._remember_watched(ids[index])
                    answered += 1
                    progressed = True
                    unknown, known = _unknown_names(reply)
                    if unknown and not warned:
                        warned = True
                        log.warning(
                            "no worker has registered task %r yet; its tasks stay queued "
                            "until one does (known tasks: %s)",
                            name,
                            ", ".join(known) or "none",
                        )
                if progressed or not in_flight:
                    continue
                deadline = min(d for _, d in in_flight.values())
                if time.monotonic() >= deadline:
                    if not self._limits_given:
                        # Silence may be a SUBMIT over a restarted broker's smaller limit.
                        self._limits = None
                    raise self._unavailable()
                self._pump(deadline)
        finally:
            self._forget(in_flight)
        return [task_id for chunk in ids for task_id in chunk]

    # ------------------------------------------------------------ reading

    def status(self, task_id: int) -> TaskInfo:
        """The task's current state; raises TaskNotFound for an unknown id."""
        reply = self._request(protocol.GET, {"ids": [task_id], "watch": False})
        (view,) = _reply_views(reply, [task_id])
        if view is None:
            raise TaskNotFound(f"no task with id {task_id}")
        return TaskInfo.from_view(view)

    def result(self, task_id: int, timeout: float | None = None) -> Any:
        """Wait for the task to finish and return its value.

        Raises TaskFailed (state failed or dead), TaskNotFound, or
        ResultTimeout when `timeout` seconds pass first (None: no limit).
        """
        info = self.wait([task_id], timeout)[task_id]
        if not info.done:
            raise ResultTimeout(
                f"task {task_id} did not finish within {timeout:g} s (state: {info.state})"
            )
        return outcome(info)

    def wait(self, ids: Iterable[int], timeout: float | None = None) -> dict[int, TaskInfo]:
        """Wait until every task is final or `timeout` seconds pass (None: no limit).

        Returns the latest TaskInfo of each id, in input order; at a timeout
        some of them are not `done`. Raises TaskNotFound for an unknown id.
        """
        latest: dict[int, TaskInfo] = {}
        order = list(dict.fromkeys(ids))
        for _ in self._watch(order, timeout, latest):
            pass
        return {task_id: latest[task_id] for task_id in order}

    def as_completed(self, ids: Iterable[int], timeout: float | None = None) -> Iterator[TaskInfo]:
        """Yield each task's final TaskInfo as it finishes.

        Raises ResultTimeout if some are not final after `timeout` seconds.
        """
        latest: dict[int, TaskInfo] = {}
        order = list(dict.fromkeys(ids))
        yield from self._watch(order, timeout, latest)
        unfinished = sum(1 for info in latest.values() if not info.done)
        if unfinished:
            raise ResultTimeout(f"{unfinished} of {len(order)} tasks did not finish in time")

    def broker_limits(self) -> protocol.Limits:
        """The broker's size limits: as given to the constructor, or asked once (STATUS)
        and kept; an older broker that does not announce them has the defaults."""
        if self._limits is None:
            facts = self.broker_status().get("broker")
            announced = facts.get("limits") if isinstance(facts, dict) else None
            self._limits = dataclasses.replace(_LIMITS, **protocol.announced_limits(announced))
        return self._limits

    def broker_status(self) -> dict[str, Any]:
        """Workers (load, capacity, ring share), task counts by state, broker facts."""
        reply = self._request(protocol.STATUS, {})
        reply.pop("seq", None)
        return reply

    def list_tasks(
        self,
        state: str | None = None,
        name: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
        *,
        results: bool = True,
    ) -> list[TaskInfo]:
        """Up to `limit` tasks newest first, optionally of one state or name; page with before_id.

        The broker cuts a REPLY short where its views would outgrow a message
        and says so (`more`); this then asks again below the lowest id it got.
        `results` False: the views come without results (`value` is None), so
        a page of tasks with large results stays small.
        """
        if not 1 <= limit <= _LIMITS.max_batch:
            raise ValueError(f"limit must be 1..{_LIMITS.max_batch}")
        tasks: list[TaskInfo] = []
        while len(tasks) < limit:
            body = {
                "state": state,
                "name": name,
                "limit": limit - len(tasks),
                "before_id": before_id,
                "results": results,
            }
            reply = self._request(protocol.TASKS, body)
            views = reply.get("tasks")
            if not isinstance(views, list):
                raise malformed("TASKS reply has no task list")
            page = [TaskInfo.from_view(view) for view in views]
            if before_id is not None and any(t.id >= before_id for t in page):
                raise malformed("TASKS reply went back to ids already listed")
            tasks += page
            if not page or not reply.get("more"):
                break
            before_id = min(t.id for t in page)
        return tasks

    def cancel(self, ids: Iterable[int]) -> dict[int, str | None]:
        """Cancel tasks that are queued or running; returns each id's state afterwards.

        `cancelled` for a task cancelled now or before; the final state of one
        that had already ended, which stays as it was; None for an unknown id.
        A running task sees `ctx.lease_lost` within a heartbeat, and its
        result is not applied. With CURVE, only the key that submitted a task
        may cancel it: RequestRejected otherwise. Ids go max_batch to a CANCEL,
        and a refused CANCEL changes nothing, but batches before it stay
        cancelled.
        """
        wanted = list(dict.fromkeys(ids))
        states: dict[int, str | None] = {}
        for start in range(0, len(wanted), _LIMITS.max_batch):
            chunk = wanted[start : start + _LIMITS.max_batch]
            reply = self._request(protocol.CANCEL, {"ids": chunk})
            answered = reply.get("states")
            # A state this client does not know is a final one (protocol.md, Versioning).
            if (
                not isinstance(answered, list)
                or len(answered) != len(chunk)
                or not all(s is None or isinstance(s, str) for s in answered)
            ):
                raise malformed("CANCEL reply has no state for each id")
            states.update(zip(chunk, answered, strict=True))
        return states

    def prune(self, before: float, states: Iterable[str] | None = None) -> int:
        """Delete the tasks that reached a final state before `before` (Unix seconds,
        at least an hour ago), with their history; returns how many.

        `states`: only these final states (default: all four). The broker looks
        at a bounded number of tasks per request, so this asks until it has gone
        through the whole log. With CURVE, only the tasks this key submitted.
        Afterwards their ids are unknown, and an idempotency key of theirs may
        be used again.
        """
        body: dict[str, Any] = {"before": float(before)}
        if states is not None:
            body["states"] = sorted(set(states))
        deleted, after_id = 0, 0
        while True:
            reply = self._request(protocol.PRUNE, {**body, "after_id": after_id})
            count, go_on = reply.get("deleted"), reply.get("next")
            if not is_int(count) or not (go_on is None or (is_int(go_on) and go_on > after_id)):
                raise malformed("PRUNE reply has no count or a next id that does not go on")
            deleted += count
            if go_on is None:
                return deleted
            after_id = go_on

    def history(self, task_id: int) -> tuple[TaskInfo | None, list[dict[str, Any]]]:
        """The task's current view (None if unknown) and its event log, oldest first.

        A long history comes a page at a time (each REPLY fits the size
        limit); this asks for pages until the broker says there are no more.
        """
        events: list[dict[str, Any]] = []
        after = 0
        while True:
            reply = self._request(protocol.HISTORY, {"id": task_id, "after": after})
            page = reply.get("events")
            if not isinstance(page, list) or not all(isinstance(e, dict) for e in page):
                raise malformed("HISTORY reply has no event list")
            events += [e for e in page if not (is_int(e.get("n")) and e["n"] <= after)]
            if not reply.get("more"):
                break
            numbers = [e.get("n") for e in page]
            if not numbers or not all(is_int(n) for n in numbers) or max(numbers) <= after:
                raise malformed("HISTORY reply says there is more but gives no later event number")
            after = max(numbers)
        view = reply.get("task")
        return (TaskInfo.from_view(view) if view is not None else None), events

    # ------------------------------------------------------------ waiting

    def _watch(
        self, order: list[int], timeout: float | None, latest: dict[int, TaskInfo]
    ) -> Iterator[TaskInfo]:
        """Yield final infos as tasks finish; record every info seen in `latest`.

        The deadline is only honoured once every id has been seen (one GET
        round), so `wait(ids, timeout=0)` is a single poll of their states.
        """
        pending = set(order)
        rotation = collections.deque(order)  # ids in the order the safety net asks again
        last_progress = time.monotonic()
        deadline = None if timeout is None else time.monotonic() + timeout
        gets: dict[int, tuple[list[int], float]] = {}  # seq -> (ids asked, answer deadline)
        next_poll = time.monotonic()
        first_round = True
        try:
            while pending:
                finished: list[TaskInfo] = []
                for task_id in [t for t in self._notified if t in pending]:
                    finished.append(TaskInfo.from_view(self._notified.pop(task_id)))
                for seq in [s for s in gets if s in self._answers]:
                    asked, _ = gets.pop(seq)
                    views = _reply_views(self._take(seq), asked)
                    if len(views) < len(asked):  # the broker answered the first ids only
                        rest = asked[len(views) :]
                        again = self._start(protocol.GET, {"ids": rest, "watch": True})
                        gets[again] = (rest, time.monotonic() + self.timeout_s)
                    for task_id, view in zip(asked, views, strict=False):
                        if view is None:
                            raise TaskNotFound(f"no task with id {task_id}")
                        info = TaskInfo.from_view(view)
                        if task_id in pending:
                            latest[task_id] = info
                            if info.done:
                                finished.append(info)
                if finished:
                    last_progress = time.monotonic()
                for info in finished:
                    if info.id in pending:
                        pending.discard(info.id)
                        self._watched.discard(info.id)
                        latest[info.id] = info
                        yield info
                if not pending:
                    return
                now = time.monotonic()
                stalled = now - last_progress >= self.repoll_s
                # Past the deadline, the ids never seen are asked about at once, so a
                # timeout reports their state instead of waiting for the safety net.
                unseen = deadline is not None and now >= deadline and len(latest) < len(order)
                if not gets and (unseen or (now >= next_poll and (first_round or stalled))):
                    # watch=True (re)registers the NOTIFY, also after a broker restart.
                    # The first round asks about the ids this client did not submit
                    # itself (its own submits registered their NOTIFY already); later
                    # rounds run only while no task finishes, and take turns, at most
                    # _REPOLL_IDS a round, so a wait on 100,000 tasks does not make
                    # the broker read them all every second.
                    if unseen:
                        asked_ids = [t for t in order if t in pending and t not in latest]
                    elif first_round:
                        asked_ids = [t for t in order if t in pending and t not in self._watched]
                    else:
                        asked_ids = []
                        # rotation holds every pending id once (finished ones drop out
                        # here), so this collects distinct ids.
                        while len(asked_ids) < min(len(pending), _REPOLL_IDS):
                            task_id = rotation.popleft()
                            if task_id in pending:
                                asked_ids.append(task_id)
                                rotation.append(task_id)
                    first_round = False
                    for i in range(0, len(asked_ids), _LIMITS.max_batch):
                        chunk = asked_ids[i : i + _LIMITS.max_batch]
                        seq = self._start(protocol.GET, {"ids": chunk, "watch": True})
                        gets[seq] = (chunk, now + self.timeout_s)
                    next_poll = now + self.repoll_s
                    continue
                if deadline is not None and now >= deadline and len(latest) == len(order):
                    return
                # The safety net's next GET is due once no task has finished for
                # repoll_s; waking at next_poll alone would spin while they do.
                wake = (
                    max(next_poll, last_progress + self.repoll_s)
                    if not gets
                    else min(d for _, d in gets.values())
                )
                if gets and now >= wake:
                    raise self._unavailable()
                # Wake at the deadline: to return, or to ask about the ids never seen.
                # Past it, a GET for those is in flight and its answer is awaited.
                if deadline is not None and (len(latest) == len(order) or now < deadline):
                    wake = min(wake, deadline)
                self._pump(wake)
        finally:
            self._forget(gets)

    # ------------------------------------------------------------ requests

    def _request(self, command: bytes, body: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer, resending while it is late."""
        seq = self._start(command, body)
        deadline = time.monotonic() + self.timeout_s
        try:
            while seq not in self._answers:
                if time.monotonic() >= deadline:
                    raise self._unavailable()
                self._pump(deadline)
            return self._take(seq)
        finally:
            self._forget((seq,))

    def _start(self, command: bytes, body: dict[str, Any]) -> int:
        seq = self._out.next_seq()
        frames = protocol.frames(protocol.PROTOCOL_CLIENT, command, {"seq": seq, **body})
        self._out.add(seq, frames, time.monotonic())
        self._send(frames)
        return seq

    def _take(self, seq: int) -> dict[str, Any]:
        """The answer to seq (which must have arrived); ERROR raises RequestRejected."""
        command, body = self._answers.pop(seq)
        if command == protocol.ERROR:
            raise RequestRejected(
                str(body.get("code") or protocol.E_INTERNAL), str(body.get("message") or "")
            )
        return body

    def _forget(self, seqs: Iterable[int]) -> None:
        """Give up on requests: a late answer to them will be dropped."""
        for seq in list(seqs):
            self._out.ack(seq)
            self._answers.pop(seq, None)

    def _unavailable(self) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"broker at {self.endpoint} did not answer within {self.timeout_s:g} s"
        )

    # ------------------------------------------------------------ socket

    def _remember_watched(self, ids: list[int]) -> None:
        """Ids whose NOTIFY this client asked for when it submitted them."""
        if len(self._watched) > _MAX_WATCHED:
            self._watched.clear()  # forgetting only costs a GET in wait()
        self._watched.update(ids)

    def _send(self, frames: list[bytes]) -> None:
        if self._sock.closed:
            raise TaskringError("this client is closed; open a new Client")
        try:
            protocol.send_frames(self._sock, frames, protocol.NOBLOCK)
        except zmq.Again:
            # The queue towards the broker is full (it is down or slow); the
            # resend timer tries again, so nothing more is needed here.
            log.debug("send queue to %s is full; will resend", self.endpoint)

    def _pump(self, until: float) -> None:
        """Wait for input until `until` or the next resend, handle it, resend late requests."""
        now = time.monotonic()
        wake = until
        next_due = self._out.next_due()
        if next_due is not None:
            wake = min(wake, next_due)
        timeout_ms = max(0, math.ceil((wake - now) * 1000))
        if self._sock.poll(timeout_ms, zmq.POLLIN):
            for i in range(_MAX_DRAIN):
                if i and not protocol.has_message(self._sock):
                    break
                try:
                    parts = protocol.recv_frames(self._sock, protocol.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(parts)
        for frames in self._out.due(time.monotonic()):
            self._send(frames)

    def _handle(self, parts: list[bytes]) -> None:
        try:
            command, body = protocol.decode_reply(parts, protocol.PROTOCOL_CLIENT)
        except protocol.ProtocolError as e:
            log.warning("ignored a malformed message from the broker: %s", e)
            return
        if command == protocol.NOTIFY:
            self._buffer_notify(body)
            return
        if command not in (protocol.REPLY, protocol.ERROR):
            log.warning("ignored unexpected command %r from the broker", command)
            return
        seq = body.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool) and self._out.ack(seq) is not None:
            self._answers[seq] = (command, body)
        elif command == protocol.ERROR and seq is None:
            log.warning("broker error: %s (%s)", body.get("message"), body.get("code"))
        else:
            log.debug("dropped a duplicate or late %s for seq %r", command.decode(), seq)

    def _buffer_notify(self, body: dict[str, Any]) -> None:
        views = body.get("tasks")
        if not isinstance(views, list):
            log.warning("ignored a NOTIFY without a task list")
            return
        for view in views:
            if (
                isinstance(view, dict)
                and is_int(view.get("id"))
                and view.get("state") not in protocol.PENDING_STATES
            ):
                self._notified[view["id"]] = view
        while len(self._notified) > _MAX_BUFFERED_NOTIFY:
            del self._notified[next(iter(self._notified))]


# ---------------------------------------------------------------- reply checks


def _reply_ids(reply: dict[str, Any], expected: int) -> list[int]:
    ids = reply.get("ids")
    if not isinstance(ids, list) or len(ids) != expected or not all(is_int(i) for i in ids):
        raise malformed(f"SUBMIT reply must carry {expected} task ids")
    return ids


def _reply_views(reply: dict[str, Any], asked: list[int]) -> list[Any]:
    """The views of the first ids asked: all of them, or as many as fit in one message."""
    views = reply.get("tasks")
    if not isinstance(views, list) or not 0 < len(views) <= len(asked):
        raise malformed(f"GET reply must carry 1 to {len(asked)} task views")
    for task_id, view in zip(asked, views, strict=False):
        if view is not None and (not isinstance(view, dict) or view.get("id") != task_id):
            raise malformed(f"GET reply has a view that is not task {task_id}")
    return views


def _unknown_names(reply: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    unknown = reply.get("unknown") or []
    known = reply.get("known") or []
    if not isinstance(unknown, list) or not isinstance(known, list):
        raise malformed("SUBMIT reply has bad unknown/known name lists")
    return tuple(str(n) for n in unknown), tuple(str(n) for n in known)
