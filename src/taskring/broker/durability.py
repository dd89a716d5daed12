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
descriptor of the WAL flushes the frames SQLite wrote through its own. The
WAL is never deleted while the broker's connection is open; when SQLite
starts it over after a checkpoint, it syncs the database and the WAL header
itself (it does so in NORMAL mode too).
"""

from __future__ import annotations

import os


class WalSyncer:
    """fdatasync the WAL of a database, and remember up to which commit it is synced."""

    def __init__(self, db_path: str) -> None:
        # SQLite puts the WAL beside the database file, symbolic links resolved.
        real_db = os.path.realpath(db_path)
        # Read-write because some systems refuse fsync on a read-only descriptor;
        # nothing is ever written through it. No O_CREAT: SQLite owns the file.
        self._fd = os.open(real_db + "-wal", os.O_RDWR)
        try:
            # A broker killed before its last sync left commits that SQLite now
            # reads back from the page cache: make them durable before anything
            # is answered from them (this process starts counting generations at 0).
            _datasync(self._fd)
            _fsync_path(real_db)
            _fsync_path(os.path.dirname(real_db))  # the WAL may be new since the last sync
        except OSError:
            os.close(self._fd)
            raise
        self.synced = 0  # every commit up to this generation is on disk
        # After a failed fsync, Linux may have dropped the pages it could not
        # write and report the next fsync as a success: one failure is final.
        self.error: OSError | None = None

    def sync(self, generation: int) -> None:
        """Make every commit up to `generation` durable; OSError if the disk refuses."""
        if self.error is not None:
            raise self.error
        if generation > self.synced:
            try:
                _datasync(self._fd)
            except OSError as e:
                self.error = e
                raise
            self.synced = generation

    def close(self) -> None:
        if self._fd >= 0:  # a second close must not close a number since reused
            os.close(self._fd)
            self._fd = -1


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
