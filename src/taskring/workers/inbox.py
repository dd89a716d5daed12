"""How task threads reach the I/O loop: an Inbox of items, and Waiters for checkpoints.

Task threads never touch the socket. They put an item in the Inbox, which
wakes the I/O loop's poll through a pipe; a task checkpointing then blocks
on its Waiter until the loop hears the broker's ACK.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import threading


class Waiter:
    """A task thread blocked in ctx.checkpoint() until the loop hears the broker's ACK.

    A one-shot signal: a lock taken at creation, which the waiting thread takes
    again (and so blocks) until the loop releases it. A threading.Event does
    the same with a Condition and a fresh lock per wait, at twice the cost on
    a path every checkpoint takes.
    """

    __slots__ = ("_fired", "_signal", "error", "stale")

    def __init__(self) -> None:
        self._signal = threading.Lock()
        self._signal.acquire()
        self._fired = False
        self.stale = False
        self.error: BaseException | None = None

    def done(self, stale: bool) -> None:
        self.stale = stale
        self._fire()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._fire()

    def _fire(self) -> None:
        # Called by the I/O loop's thread only, so the check needs no lock: a
        # checkpoint may be failed at shutdown after it was already answered.
        if not self._fired:
            self._fired = True
            self._signal.release()

    def wait(self) -> bool:
        self._signal.acquire()
        if self.error is not None:
            raise self.error
        return self.stale


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointRequest:
    task_id: int
    attempt: int
    number: int
    state: bytes
    waiter: Waiter


_PIPE_READ = 4096


class Inbox:
    """Task threads -> I/O loop: a deque plus a pipe whose read end sits in the zmq.Poller.

    A put writes one byte unless one is already waiting, so the loop's poll
    returns at once and a finished task's result leaves within microseconds,
    not at the next poll timeout.
    """

    def __init__(self) -> None:
        self._items: collections.deque[object] = collections.deque()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        # Re-entrant: a signal handler may call wake() in the thread that holds it.
        # The closed check under the lock keeps a late task from writing to a
        # closed (and possibly reused) file descriptor.
        self._lock = threading.RLock()
        self._closed = False
        # A byte is in the pipe that take() has not read yet: further puts need not
        # write one. A write per result cost a system call, and a GIL hand-off to
        # another thread, per task (bench/throughput.py).
        self._signalled = False

    def fileno(self) -> int:
        return self._r

    def put(self, item: object) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._items.append(item)
            if not self._signalled:
                self._wake()
        return True

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                self._wake()

    def _wake(self) -> None:
        self._signalled = True
        # BlockingIOError: the pipe is full of wake-ups already; one is enough.
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"\0")

    def take(self) -> list[object]:
        # Empty the pipe, then clear the flag, then the deque: an item put after
        # the flag is cleared writes a byte again, and one put before it is in
        # the deque read below. None is left without a wake-up; at worst a
        # spurious one finds the deque empty. Read again only after a full read: a
        # shorter one emptied the pipe, and reading an empty pipe raises, which
        # cost about 20 µs on the way from a finished task to its RESULT.
        with contextlib.suppress(BlockingIOError):
            while len(os.read(self._r, _PIPE_READ)) == _PIPE_READ:
                pass
        with self._lock:
            self._signalled = False
        items: list[object] = []
        while self._items:
            items.append(self._items.popleft())
        return items

    def close(self) -> list[object]:
        """Refuse further puts; return what was never taken."""
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            os.close(self._r)
            os.close(self._w)
        left = list(self._items)
        self._items.clear()
        return left
