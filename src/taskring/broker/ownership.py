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
# How often a running broker renews its lock file's modification time.
TOUCH_S = 3600.0


class LogInUse(TaskringError):
    """Another live broker has this task log open."""


class LogLock:
    """Held from construction until close(); raises LogInUse if another broker holds it."""

    def __init__(self, db_path: str, wait_s: float | None = None) -> None:
        self._db_path = db_path
        self.path = os.path.realpath(db_path) + ".lock"
        self._touched = 0.0
        self._fd = self._take(WAIT_S if wait_s is None else wait_s)

    def _take(self, wait_s: float) -> int:
        deadline = time.monotonic() + wait_s
        while True:
            fd = self._open()
            try:
                locked = _try_lock(fd)
                # A file deleted or replaced after we opened it (its holder took a new
                # one, see keep()) is no lock at all: try the file there now.
                if locked and _same_file(os.fstat(fd), self._at_path()):
                    break
                if not locked and time.monotonic() >= deadline:
                    raise LogInUse(
                        f"task log {self._db_path!r} is in use by another broker"
                        f"{_holder(fd)}; stop that one first, or give this one another --db"
                    )
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if not locked:
                time.sleep(_RETRY_S)
        # Who holds it, for the message a second broker gives; the lock works without.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._touched = time.monotonic()
        return fd

    def _open(self) -> int:
        # Not through a symbolic link planted there: the pid would overwrite its target.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{self.path} is not a regular file")
        return fd

    def _at_path(self) -> os.stat_result | None:
        try:
            return os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def keep(self) -> bool:
        """Make sure the lock file at the path is still the one held; False if it was not.

        A file deleted or replaced under a running broker (a cleaner of old files
        in /tmp, say) would let a second broker lock a new one. Then this takes
        the file at the path again, or raises LogInUse if another broker has. Its
        modification time is renewed now and then, so that a cleaner that goes
        by age leaves it alone.
        """
        if _same_file(os.fstat(self._fd), self._at_path()):
            if time.monotonic() - self._touched > TOUCH_S:
                with contextlib.suppress(OSError):
                    os.utime(self._fd)
                self._touched = time.monotonic()
            return True
        try:
            fd = self._take(wait_s=0)
        except LogInUse:
            raise LogInUse(
                f"another broker took task log {self._db_path!r} over after its lock "
                "file was deleted; this one stops"
            ) from None
        os.close(self._fd)
        self._fd = fd
        return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1


def _same_file(a: os.stat_result, b: os.stat_result | None) -> bool:
    return b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(os.pread(fd, 32, 0))})"
    return ""
