"""Where tasks run: a pool of threads, or a pool of child processes.

Both take assignments with `submit()` (never blocking the I/O loop) and report
through a Sink: `finished(outcome)` once per assignment, and `checkpoint(...)`,
which blocks the calling task until the broker's ACK.

The process pool exists because a task that holds the GIL in C code can
starve the I/O thread. Its children are started with "spawn" (or
"forkserver"), never "fork", so no ZeroMQ context or socket is copied into a
child. Parent and child talk over a multiprocessing Pipe in msgpack
(send_bytes/recv_bytes), not pickle. One relay thread per child feeds it
assignments and carries its checkpoints and results.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Mapping
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from taskring import protocol
from taskring.errors import RequestRejected
from taskring.protocol import Assignment, TaskOutcome
from taskring.registry import TaskSpec, registered
from taskring.workers.errors import WorkerConfigError, WorkerStopped
from taskring.workers.loading import load_modules
from taskring.workers.runner import describe_exception, failure, run_assignment

log = logging.getLogger(__name__)

STALE_POLL_S = 0.05  # a child asks its relay whether a lease is gone at most this often


class Sink(Protocol):
    def finished(self, outcome: TaskOutcome) -> None: ...
    def checkpoint(self, task_id: int, attempt: int, number: int, state: bytes) -> bool: ...
    def is_stale(self, task_id: int, attempt: int) -> bool: ...


class Pool(Protocol):
    """Slots that run assignments; `waiting` is how they are given and taken back."""

    waiting: WaitingLine

    def start(self, sink: Sink) -> None: ...
    def close(self, timeout_s: float) -> None: ...


def _gone_before_start(a: Assignment, sink: Sink, limits: protocol.Limits) -> TaskOutcome | None:
    """An outcome for a task whose lease the broker ended while it waited for a slot.

    Another worker may be running it by now (this one was frozen, or the task was
    cancelled); starting it here would only run it twice.
    """
    if not sink.is_stale(a.id, a.attempt):
        return None
    error = "the lease ended before the task started"
    return failure(a, error, retry=True, started=False, limits=limits)


class WaitingLine:
    """Assignments waiting for a slot, shared by the slots of one pool.

    After stop_starting(), a slot that takes an assignment sets it aside instead
    of starting it: a stopping worker starts nothing more, also while it cannot
    tell the broker that it drains (the broker may lease those tasks to another
    worker meanwhile). take() returns what waits, set aside or still queued, to
    be handed back unstarted.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Assignment | None] = queue.SimpleQueue()
        self._set_aside: collections.deque[Assignment] = collections.deque()
        # A plain flag: stop_starting() may run in a signal handler.
        self._starting = True

    def put(self, assignment: Assignment) -> None:
        self._queue.put(assignment)

    def stop_slots(self, count: int) -> None:
        """Tell `count` slots to return once the assignments ahead are taken."""
        for _ in range(count):
            self._queue.put(None)

    def stop_starting(self) -> None:
        self._starting = False

    def unstarted(self) -> int:
        """How many wait, queued or set aside (a slot's stop signals count only after close)."""
        return self._queue.qsize() + len(self._set_aside)

    def next_to_start(self) -> Assignment | None:
        """Block until a slot should start an assignment; None: the slot stops."""
        while (a := self._queue.get()) is not None:
            if self._starting:
                return a
            self._set_aside.append(a)
        return None

    def take(self) -> list[Assignment]:
        """Assignments no slot has started; each get is atomic, so none starts after."""
        taken: list[Assignment] = []
        with contextlib.suppress(IndexError):
            while True:
                taken.append(self._set_aside.popleft())
        while True:
            try:
                a = self._queue.get_nowait()
            except queue.Empty:
                return taken
            if a is None:
                self._queue.put(None)  # a slot's signal to stop, not ours to take
                return taken
            taken.append(a)


class ThreadPool:
    """`concurrency` daemon threads: a task stuck forever cannot keep the process alive."""

    def __init__(self, concurrency: int, specs: Mapping[str, TaskSpec], limits: protocol.Limits):
        self._concurrency = concurrency
        self._specs = dict(specs)
        self._limits = limits
        self.waiting = WaitingLine()
        self._threads: list[threading.Thread] = []

    def start(self, sink: Sink) -> None:
        for i in range(self._concurrency):
            t = threading.Thread(target=self._loop, args=(sink,), name=f"taskring-task-{i}")
            t.daemon = True
            t.start()
            self._threads.append(t)

    def _loop(self, sink: Sink) -> None:
        while (a := self.waiting.next_to_start()) is not None:
            outcome = _gone_before_start(a, sink, self._limits)
            if outcome is not None:
                sink.finished(outcome)
                continue
            try:
                outcome = run_assignment(
                    a, self._specs, sink.checkpoint, limits=self._limits, is_stale=sink.is_stale
                )
            except BaseException as e:  # run_assignment catches all; this is the last guard
                outcome = failure(a, describe_exception(e), retry=True, limits=self._limits)
            sink.finished(outcome)

    def close(self, timeout_s: float) -> None:
        self.waiting.stop_slots(len(self._threads))
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        busy = sum(t.is_alive() for t in self._threads)
        if busy:
            log.warning("abandoning %d task thread(s) still running", busy)


# ---------------------------------------------------------------- the child process


def _send(conn: Connection, message: list[Any]) -> None:
    conn.send_bytes(protocol.pack(message))


def _recv(conn: Connection) -> list[Any]:
    message = protocol.unpack(conn.recv_bytes())
    if not isinstance(message, list) or not message:
        raise protocol.ProtocolError(protocol.E_BAD_BODY, "pool message must be a list")
    return message


def _watch_parent(parent_pid: int) -> None:
    # If the worker is SIGKILLed, do not go on running its abandoned task. The
    # parent is the worker under spawn, the fork server under forkserver (which
    # exits when the worker does): either way, a new parent pid means orphaned.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def child_main(conn: Connection, modules: tuple[str, ...]) -> None:
    """Entry point of a pool child: import the task modules, then run what the relay sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent decides
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        load_modules(modules)
    except WorkerConfigError as e:
        _send(conn, ["fatal", str(e)])
        return
    specs = registered()
    _send(conn, ["ready", os.getpid()])

    # A task may checkpoint from one thread and poll ctx.lease_lost from another:
    # each question and its answer hold the pipe, or the answers cross.
    pipe = threading.Lock()
    # The last "not stale" answer: ((id, attempt), when). One task runs at a time.
    last_no: tuple[tuple[int, int], float] = ((-1, -1), -math.inf)

    def checkpoint(task_id: int, attempt: int, number: int, state: bytes) -> bool:
        with pipe:
            _send(conn, ["ckpt", task_id, attempt, number, state])
            reply = _recv(conn)
        if reply[0] == "rejected":
            raise RequestRejected(str(reply[1]), str(reply[2]))
        if reply[0] != "ack":
            raise WorkerStopped("the worker stopped before the broker acknowledged the checkpoint")
        return bool(reply[1])

    def is_stale(task_id: int, attempt: int) -> bool:
        # The news comes with a broker heartbeat: asking the relay more often
        # than this would only keep the worker process busy for a tight poll.
        nonlocal last_no
        key = (task_id, attempt)
        if last_no[0] == key and time.monotonic() - last_no[1] < STALE_POLL_S:
            return False
        with pipe:
            _send(conn, ["stale?", task_id, attempt])
            reply = _recv(conn)
        stale = reply[0] == "stale" and bool(reply[1])
        if not stale:
            last_no = (key, time.monotonic())
        return stale

    while True:
        try:
            message = _recv(conn)
        except (EOFError, OSError):
            return  # the parent is gone
        if message[0] != "run":
            return
        outcome = run_assignment(Assignment(*message[1]), specs, checkpoint, is_stale=is_stale)
        _send(conn, ["done", list(_outcome_fields(outcome))])


def _outcome_fields(o: TaskOutcome) -> tuple[Any, ...]:
    return (o.id, o.attempt, o.ok, o.value, o.error, o.retry)


# ---------------------------------------------------------------- the parent side


class _ChildDied(Exception):
    pass


class _Slot:
    """One child process and the relay thread that serves it."""

    def __init__(self, pool: ProcessPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.proc: Any = None  # multiprocessing's process classes differ per start method
        self.conn: Connection | None = None
        self.thread = threading.Thread(target=self._loop, name=f"taskring-relay-{index}")
        self.thread.daemon = True

    def _spawn(self) -> str | None:
        """Start a child and wait for it to import the modules; an error message or None."""
        parent_end, child_end = self.pool.mp.Pipe()
        proc = self.pool.mp.Process(
            target=child_main,
            args=(child_end, self.pool.modules),
            name=f"taskring-child-{self.index}",
            daemon=True,  # never outlive the worker
        )
        try:
            proc.start()
        except OSError as e:  # out of processes or memory: fail the task, keep the relay
            parent_end.close()
            child_end.close()
            return f"{type(e).__name__}: {e}"
        child_end.close()  # so the child's death shows as EOF here
        self.proc, self.conn = proc, parent_end
        try:
            hello = self._recv()
        except _ChildDied as e:
            return str(e)
        if hello[0] == "fatal":
            self._reap()
            return str(hello[1])
        return None

    def _recv(self) -> list[Any]:
        conn = self.conn
        if conn is None:
            raise _ChildDied("worker process is not running")
        while True:
            ready = wait([conn, self.proc.sentinel], timeout=0.5)
            if conn in ready or (ready and conn.poll()):
                try:
                    return _recv(conn)
                except (EOFError, OSError, protocol.ProtocolError):
                    break
            if ready:
                break
            if self.pool.kill_at is not None and time.monotonic() >= self.pool.kill_at:
                self.proc.kill()  # the worker stops and this task was abandoned
        raise _ChildDied(f"worker process died (exit code {self._reap()})")

    def _reap(self) -> int | None:
        self.proc.join(5)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join(5)
        code: int | None = self.proc.exitcode
        if self.conn is not None:
            self.conn.close()
        # No proc.close(): at interpreter exit multiprocessing may still join this
        # object from its atexit hook; Popen's finalizer closes the fds anyway.
        self.proc, self.conn = None, None
        return code

    def _run(self, a: Assignment, sink: Sink) -> TaskOutcome:
        limits = self.pool.limits
        if self.proc is not None and not self.proc.is_alive():
            # Died while idle (OOM killer, a stray signal): not this task's fault.
            log.warning(
                "worker process %d died while idle (exit code %s)", self.index, self._reap()
            )
        if self.proc is None and (error := self._spawn()) is not None:
            return failure(a, f"worker process cannot start: {error}", retry=True, limits=limits)
        conn = self.conn
        try:
            if conn is None:
                raise _ChildDied("worker process is not running")
            _send(conn, ["run", [a.id, a.attempt, a.name, a.payload, a.state, a.number]])
            while True:
                message = self._recv()
                if message[0] == "done":
                    return TaskOutcome(*message[1])
                if message[0] == "stale?":
                    _send(conn, ["stale", sink.is_stale(message[1], message[2])])
                    continue
                if message[0] == "ckpt":
                    try:
                        reply = ["ack", sink.checkpoint(*message[1:5])]
                    except WorkerStopped:
                        reply = ["stopped"]
                    except RequestRejected as e:  # raised in the task, as in a thread pool
                        reply = ["rejected", e.code, e.message]
                    _send(conn, reply)
        except OSError:  # the pipe broke: the child is gone or going
            self.proc.kill()
            error = f"worker process died (exit code {self._reap()})"
        except _ChildDied as e:
            error = str(e)
        return failure(a, error, retry=True, limits=limits)

    def _loop(self) -> None:
        sink = self.pool.sink
        error = self._spawn()  # warm up now, not when the first task is waiting
        if error is not None:
            log.error("worker process %d cannot start: %s", self.index, error)
        while (a := self.pool.waiting.next_to_start()) is not None:
            outcome = _gone_before_start(a, sink, self.pool.limits) or self._run(a, sink)
            sink.finished(outcome)
            # Replace a dead child at once, not when the next task is waiting.
            if self.proc is None and self.pool.kill_at is None and (error := self._spawn()):
                log.error("worker process %d cannot start: %s", self.index, error)
        if self.proc is not None and self.conn is not None:
            with contextlib.suppress(OSError):  # already gone: _reap() collects it
                _send(self.conn, ["stop"])
            self._reap()


class ProcessPool:
    def __init__(
        self,
        concurrency: int,
        modules: tuple[str, ...],
        limits: protocol.Limits,
        start_method: str = "spawn",
    ) -> None:
        if not modules:
            raise WorkerConfigError("the process pool needs settings.modules to import in children")
        self.modules = modules
        self.limits = limits
        self.mp: Any = multiprocessing.get_context(
            start_method
        )  # typeshed lacks .Process on BaseContext
        self.waiting = WaitingLine()
        self.kill_at: float | None = None  # set by close(): children still busy then are killed
        self.sink: Sink
        self._slots = [_Slot(self, i) for i in range(concurrency)]

    def start(self, sink: Sink) -> None:
        self.sink = sink
        for slot in self._slots:
            slot.thread.start()

    def close(self, timeout_s: float) -> None:
        self.kill_at = time.monotonic() + timeout_s
        self.waiting.stop_slots(len(self._slots))
        deadline = self.kill_at + 10.0  # killing and reaping a child is quick
        for slot in self._slots:
            slot.thread.join(max(0.0, deadline - time.monotonic()))
