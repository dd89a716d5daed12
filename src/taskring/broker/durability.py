"""Power-loss durability: the broker fdatasyncs the WAL once per turn that wrote.

The broker commits with SQLite's synchronous=NORMAL, which already survives
the death of any process (the WAL frames are in the kernel's page cache), and
then syncs the WAL file itself before it sends anything that depends on the
commit. With synchronous=FULL SQLite would sync inside every COMMIT, with
fsync; this way one fdatasync (which skips the file's modification time, as
SQLite's own sync does on Linux) covers the turn, and a turn that wrote
nothing syncs nothing.

The sync runs in the loop's own thread. Until the fifth round a helper
thread synced while the loop went on, but measured in paired runs of
bench/throughput.py's workload it was slower: 10,693 against 14,164 tasks/s
with prefetch, 8,076 against 10,005 without, and the broker spent 68 against
57 us of CPU per task. SQLite's writes into the WAL while an fdatasync of
that file was running cost more than the overlap gained; waiting instead
lets the next turn's input pile up, and one bigger turn commits it all.

fsync works on the file, not on the descriptor, so syncing our own
descriptor of the WAL flushes the frames SQLite wrote through its own.

Our descriptors stay open until after SQLite's connection closed. Closing
any descriptor of a file drops every POSIX lock the process holds on that
file, SQLite's included. Until the ninth round the syncer opened the database
file to fsync it and closed it again, which dropped SQLite's SHARED lock on
it: any other process that then opened and closed the log (a sqlite3 shell)
took itself for the last connection, checkpointed and deleted the WAL, and
the broker went on committing into the deleted file. In a test, a kill -9
then lost all 100 acknowledged commits. The
WAL is never deleted while the broker's connection is open; when SQLite
starts it over after a checkpoint, it syncs the database and the WAL header
itself (it does so in NORMAL mode too).
"""

from __future__ import annotations

import logging
import os

from taskring.clock import wall_clock

log = logging.getLogger(__name__)


class WalSyncer:
    """fdatasync the WAL of a database, and remember up to which commit it is synced."""

    def __init__(self, db_path: str) -> None:
        # SQLite puts the WAL beside the database file, symbolic links resolved.
        real_db = os.path.realpath(db_path)
        # Read-write because some systems refuse fsync on a read-only descriptor;
        # nothing is ever written through it. No O_CREAT: SQLite owns the file.
        self._fd = os.open(real_db + "-wal", os.O_RDWR)
        try:
            # Open until close(), after SQLite's own close (module docstring).
            self._db_fd = os.open(real_db, os.O_RDONLY)
        except OSError:
            os.close(self._fd)  # SQLite holds no lock on the WAL file itself
            raise
        self._folder = os.path.dirname(real_db)
        self._db_path = db_path
        self.synced = 0  # every commit up to this generation is on disk
        # After a failed fsync, Linux may have dropped the pages it could not
        # write and report the next fsync as a success: one failure is final.
        self.error: OSError | None = None

    def sync_what_is_there(self) -> None:
        """At start: a broker killed before its last sync left commits that SQLite
        now reads back from the page cache. Make them durable before anything is
        answered from them (this process starts counting generations at 0)."""
        try:
            _datasync(self._fd)
            os.fsync(self._db_fd)
            _fsync_folder(self._folder)  # the WAL may be new since the last sync
        except OSError as e:
            self._leave_marker(e)
            raise

    def sync(self, generation: int) -> None:
        """Make every commit up to `generation` durable; OSError if the disk refuses."""
        if self.error is not None:
            raise self.error
        if generation > self.synced:
            try:
                _datasync(self._fd)
            except OSError as e:
                self.error = e
                self._leave_marker(e)
                raise
            self.synced = generation

    def _leave_marker(self, error: OSError) -> None:
        """For the next start: this log's page cache may hold commits the disk never got."""
        marker = failed_sync_marker(self._db_path)
        try:
            # O_NOFOLLOW: through a planted link this would overwrite, say, the log.
            fd = os.open(marker, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, f"{wall_clock():.3f} {error}\n".encode())
            finally:
                os.close(fd)
        except OSError as e:
            log.error(
                "a sync of task log %s failed, and %s could not be written (%s): before "
                "serving it again, run PRAGMA wal_checkpoint(TRUNCATE) on it",
                self._db_path,
                marker,
                e,
            )

    def close(self) -> None:
        """Only once SQLite's connection to the database is closed (module docstring)."""
        for fd in (self._fd, self._db_fd):
            if fd >= 0:
                os.close(fd)
        # A second close must not close numbers since reused.
        self._fd = self._db_fd = -1


def failed_sync_marker(db_path: str) -> str:
    """The file a failed sync leaves beside the log (see Store's start).

    After a failed fsync, Linux may mark the pages it could not write clean:
    they stay readable in the page cache, are never written again, and a
    later fsync through a new descriptor reports success. A broker started
    on such a log would answer resends from commits the disk does not have.
    """
    return os.path.realpath(db_path) + ".sync-failed"


# fdatasync skips the file's modification time, as SQLite's own sync does on Linux;
# the length, which recovery needs, is still synced. macOS has no fdatasync.
_datasync = getattr(os, "fdatasync", os.fsync)


def _fsync_folder(path: str) -> None:
    """fsync a folder: a file created since its folder's last sync can vanish.

    Never a file SQLite has open this way: the close() would drop its locks on it.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
