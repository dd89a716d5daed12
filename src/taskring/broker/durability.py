"""Power-loss durability off the loop's thread: a helper thread fsyncs the WAL.

With SQLite's synchronous=FULL every COMMIT syncs the write-ahead log, and
the broker's only thread sat idle for that sync, about half a millisecond
per turn on the machines here: the largest single item in the profile of
bench/throughput.py once the CPU costs were cut. Instead the broker commits
with synchronous=NORMAL, which already survives the death of any process
(the WAL frames are in the kernel's page cache), and this thread fsyncs the
WAL file. What a turn produced is sent only once an fsync that began after
the turn's commit has returned, so an acknowledgement still means "on disk".
Meanwhile the loop reads and applies the next messages, and one fsync covers
every commit made while the previous one ran.

fsync works on the file, not on the descriptor, so syncing our own
descriptor of the WAL flushes the frames SQLite wrote through its own. The
WAL is never deleted while the broker's connection is open; when SQLite
starts it over after a checkpoint, it syncs the database and the WAL header
itself (it does so in NORMAL mode too).
"""

from __future__ import annotations

import contextlib
import os
import threading


class WalSyncer:
    """fsync the WAL on request; report through a pipe the loop can poll."""

    def __init__(self, db_path: str) -> None:
        # SQLite puts the WAL beside the database file, symbolic links resolved.
        real_db = os.path.realpath(db_path)
        # Read-write because some systems refuse fsync on a read-only descriptor;
        # nothing is ever written through it. No O_CREAT: SQLite owns the file.
        self._fd = os.open(real_db + "-wal", os.O_RDWR)
        # A broker killed before its last sync left commits that SQLite now
        # reads back from the page cache: make them durable before anything is
        # answered from them (this process starts counting generations at 0).
        _datasync(self._fd)
        _fsync_path(real_db)
        _fsync_path(os.path.dirname(real_db))  # the WAL may be new since the last sync
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._cond = threading.Condition()
        self._wanted = 0  # the highest commit generation asked for
        self._synced = 0  # every commit up to this generation is on disk
        self.error: OSError | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="taskring-wal-sync", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        """Readable after a sync finished (or failed): poll it with the broker's socket."""
        return self._r

    @property
    def synced(self) -> int:
        return self._synced

    @property
    def busy(self) -> bool:
        """A sync was asked for and has not finished."""
        return self._wanted > self._synced

    def sync_here(self, generation: int) -> None:
        """Sync in the calling thread: cheaper than two thread hand-offs when idle."""
        _datasync(self._fd)  # an OSError here stops the broker, as it would in a commit
        with self._cond:
            if generation > self._synced:
                self._synced = generation
                self._wanted = max(self._wanted, generation)
            self._cond.notify_all()

    def request(self, generation: int) -> None:
        """Make commits up to `generation` durable; the pipe says when."""
        with self._cond:
            if generation > self._wanted:
                self._wanted = generation
                self._cond.notify()

    def clear_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 4096):
                pass

    def wait(self, generation: int, timeout_s: float) -> bool:
        """Block until `generation` is durable (used when the broker stops)."""
        self.request(generation)
        with self._cond:
            return self._cond.wait_for(
                lambda: self._synced >= generation or self.error is not None, timeout_s
            )

    def close(self) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self._thread.join(5.0)
        if self._thread.is_alive():
            # Stuck in a sync of a stalled disk. Its descriptors stay open: closed
            # now, their numbers could be reused by a file the thread then writes to.
            return
        for fd in (self._fd, self._r, self._w):
            os.close(fd)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted > self._synced or self._closing)
                if self._wanted <= self._synced:
                    return  # closing, and nothing left to sync
                target = self._wanted
            try:
                _datasync(self._fd)
            except OSError as e:
                # The disk refused: nothing more may be acknowledged. The loop
                # sees the error at its next turn and stops the broker.
                with self._cond:
                    self.error = e
                    self._cond.notify_all()
                self._wake()
                return
            with self._cond:
                self._synced = max(self._synced, target)  # sync_here may have gone further
                self._cond.notify_all()
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a byte is waiting already
            os.write(self._w, b"\0")


# fdatasync skips the file's modification time, as SQLite's own sync does on Linux;
# the length, which recovery needs, is still synced. macOS has no fdatasync.
_datasync = getattr(os, "fdatasync", os.fsync)


def _fsync_path(path: str) -> None:
    """fsync a file, or a folder (a file created since its folder's last sync can vanish)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
