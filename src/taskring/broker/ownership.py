"""One broker per task log: an exclusive lock on a file beside the database.

Two brokers on one log would each lease the same queued tasks and allocate
the same task ids: tasks would run twice, and one broker's inserts would
fail. A second broker on the same endpoint is refused anyway (a tcp port by
bind, an ipc path by broker/endpoints.py); on another one, only this lock
stops it.

The lock is flock() on `<db>.lock`, not on the database itself: SQLite's own
locks are POSIX fcntl locks on the database and its -shm file, which a
close() of ours would drop (broker/durability.py), and some network
filesystems emulate flock with fcntl locks. The kernel lets go of the lock
when the process ends, SIGKILL included, so a restarted broker never finds a
stale one. A frozen broker (SIGSTOP) keeps it, as it should: it would write
again on SIGCONT.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time

from taskring.errors import TaskringError

# How long a new broker waits for the lock: the one before it may still be
# closing its log after SIGTERM, or still exiting after SIGKILL (freeing its
# memory, or stuck in an fsync on a slow disk).
WAIT_S = 2.0
_RETRY_S = 0.05


class LogInUse(TaskringError):
    """Another live broker has this task log open."""


class LogLock:
    """Held from construction until close(); raises LogInUse if another broker holds it."""

    def __init__(self, db_path: str, wait_s: float | None = None) -> None:
        self._db_path = db_path
        self.path = os.path.realpath(db_path) + ".lock"
        self._fd = self._take(WAIT_S if wait_s is None else wait_s)

    def _take(self, wait_s: float) -> int:
        # Not through a symbolic link planted there: the pid below would overwrite its target.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{self.path} is not a regular file")
            _acquire(fd, self._db_path, wait_s)
        except BaseException:
            os.close(fd)
            raise
        # Who holds it, for the message a second broker gives; the lock works without.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def keep(self) -> bool:
        """Make sure the lock file at the path is still the one held; False if it was not.

        A file deleted or replaced under a running broker (a cleaner of old files
        in /tmp, say) would let a second broker lock a new one. Then this takes
        the file at the path again, or raises LogInUse if another broker has.
        """
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        held = os.fstat(self._fd)
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return True
        fd = self._take(wait_s=0)
        os.close(self._fd)
        self._fd = fd
        return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1


def _acquire(fd: int, db_path: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LogInUse(
                    f"task log {db_path!r} is in use by another broker{_holder(fd)}; "
                    "stop that one first, or give this one another --db"
                ) from None
            time.sleep(_RETRY_S)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(os.pread(fd, 32, 0))})"
    return ""
