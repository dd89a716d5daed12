"""Worker: the I/O loop and a pool put together, with a graceful stop.

`Worker(settings).run()` blocks until `stop()`; `run_worker(settings)` does the
same until SIGTERM or SIGINT. Stopping gracefully means: refuse new tasks, let
running ones finish (drain_timeout_s), wait for the broker to ACK their results
(flush_timeout_s), send DISCONNECT, close everything. Every wait is bounded, so
a stop never hangs on a dead broker or a stuck task.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

import zmq

from taskring import protocol
from taskring.workers.errors import WorkerConfigError, WorkerNameTaken
from taskring.workers.io import IOLoop
from taskring.workers.journal import AckJournal
from taskring.workers.loading import load_modules
from taskring.workers.pools import Pool, ProcessPool, ThreadPool, WaitingLine
from taskring.workers.settings import WorkerSettings

log = logging.getLogger(__name__)

CHILD_GRACE_S = 1.0  # after the drain, how long idle children get to exit on their own


class Worker:
    """One worker process's connection to the broker and its pool of task runners."""

    def __init__(
        self, settings: WorkerSettings, *, limits: protocol.Limits = protocol.DEFAULT_LIMITS
    ) -> None:
        self.settings = settings
        self.name = settings.worker_name()
        self.limits = limits
        self.specs = load_modules(settings.modules)  # raises WorkerConfigError
        too_long = [n for n in self.specs if not 0 < len(n) <= limits.max_name_len]
        if too_long:  # the broker would reject the whole READY
            raise WorkerConfigError(
                f"task names must be 1..{limits.max_name_len} characters: {too_long[0][:60]!r}..."
            )
        self._stop = threading.Event()
        self._drain = True
        self._lock = threading.Lock()  # guards _io between run() and stop()
        self._io: IOLoop | None = None
        self._pool: Pool | None = None
        self._started = False

    def stop(self, *, drain: bool = True) -> None:
        """Ask run() to return. Thread-safe; a second call with drain=False skips the drain."""
        if not drain:
            self._drain = False
        self._stop.set()
        pool = self._pool  # no lock: stop() may run in a signal handler inside run()'s thread
        if pool is not None:
            # No task starts from now on, not even when the broker cannot hear that
            # this worker drains; what waits goes back once it can (IOLoop.poll_once).
            pool.waiting.stop_starting()
        io = self._io
        if io is not None:
            # A plain flag the loop reads each turn: it tells the broker to send no more.
            io.stopping = True
            io.wake()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def io(self) -> IOLoop | None:
        """The I/O loop while run() is active (for tests and status)."""
        return self._io

    def run(self) -> None:
        with self._lock:
            if self._started:
                raise RuntimeError("Worker.run() can be called only once")
            self._started = True
        s = self.settings
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        pool: Pool
        if s.pool == "process":
            pool = ProcessPool(s.concurrency, s.modules, self.limits, s.start_method)
        else:
            pool = ThreadPool(s.concurrency, self.specs, self.limits)
        tasks = {name: spec.max_attempts for name, spec in self.specs.items()}
        journal = AckJournal(s.journal, self.name) if s.journal else None
        io = IOLoop(
            context,
            s,
            self.name,
            tasks,
            pool.waiting.put,
            take_waiting=pool.waiting.take,
            limits=self.limits,
            on_welcome=self._welcomed,
            journal=journal,
        )
        self._io = io
        self._pool = pool
        drained = False
        try:
            pool.start(io)
            while not self._stop.is_set() and io.name_taken is None:
                io.poll_once()
            if io.name_taken is None:
                drained = self._drain_and_flush(io, pool.waiting)
        finally:
            pool.waiting.stop_starting()  # also when the loop raised
            # Not started, and not to be: the broker queues them again when we leave.
            pool.waiting.take()
            # Not in a name another process holds: a DISCONNECT would end its registration.
            io.close(disconnect=io.name_taken is None, linger_s=min(0.5, s.heartbeat_s))
            pool.close(CHILD_GRACE_S if drained else 0.0)
            context.destroy(linger=0)
            if journal is not None:
                journal.close()
            log.info("worker %s stopped", self.name)
        if io.name_taken is not None and not self._stop.is_set():
            # Asked to stop anyway (a rolling restart under one name): not a failure.
            raise WorkerNameTaken(io.name_taken)

    def _welcomed(self, registrations: int) -> None:
        if registrations == 1:
            log.info("worker %s ready", self.name)
        else:
            log.info("worker %s registered again", self.name)

    def _drain_and_flush(self, io: IOLoop, waiting: WaitingLine) -> bool:
        """Finish the running tasks, hand back the unstarted ones, and get every outcome
        ACKed, within the time limits. True if no started task was left running."""
        # As stop() does, for a stop() that came before there was a loop and a pool to tell.
        io.stopping = True
        waiting.stop_starting()

        def started() -> int:
            # Tasks no slot started wait for a broker to hand them back to, not for a slot.
            return len(io.running) - waiting.unstarted()

        deadline = time.monotonic() + (self.settings.drain_timeout_s if self._drain else 0.0)
        while started() > 0 and self._draining(io) and time.monotonic() < deadline:
            io.poll_once()
        if started() > 0:
            log.warning(
                "worker %s: %d task(s) still running at stop; the broker will re-run them",
                self.name,
                started(),
            )
        deadline = time.monotonic() + self.settings.flush_timeout_s
        while (
            (io.unacked or waiting.unstarted())
            and self._draining(io)
            and time.monotonic() < deadline
        ):
            io.poll_once()
        if waiting.unstarted():
            log.warning(
                "worker %s: %d task(s) not started and not handed back (no broker heard "
                "that this worker drains); the broker queues them again once it is gone",
                self.name,
                waiting.unstarted(),
            )
        if io.unacked:
            log.warning("worker %s: %d message(s) never ACKed", self.name, io.unacked)
        return started() <= 0

    def _draining(self, io: IOLoop) -> bool:
        """Still draining: neither a second stop nor another process taking the name."""
        return self._drain and io.name_taken is None


def run_worker(settings: WorkerSettings) -> None:
    """Import the task modules (current directory first on sys.path), run until a signal.

    The first SIGTERM or SIGINT stops gracefully; a second one skips the drain.
    """
    cwd = os.getcwd()
    if sys.path[:1] not in ([""], [cwd]):
        sys.path.insert(0, cwd)
    worker = Worker(settings)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only flags (and a wake-up byte): the loop does the stopping.
        worker.stop(drain=not worker.stop_requested)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        worker.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
