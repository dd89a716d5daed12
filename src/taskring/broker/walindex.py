"""How long the WAL is, read from SQLite's wal-index (the database's -shm file).

Python's sqlite3 has no sqlite3_wal_hook, which would report each commit's WAL
length. SQLite keeps that length in the wal-index header, in native byte
order (sqlite.org/walformat.html): mxFrame, the last valid frame, at byte
16, and nBackfill, the frames already copied into the database, at byte 96.
Connections share the wal-index by mapping the -shm file; one pread of its
first 100 bytes costs about a microsecond. (A SQLite that keeps the
wal-index in heap memory, with locking_mode=EXCLUSIVE, has no -shm file:
WalIndex() then raises OSError.)

The header is read without SQLite's locks, so a value may be a moment old or
caught mid-update. It only decides when to checkpoint, never what is durable.

SQLite holds POSIX locks on the -shm file, and closing any descriptor of a
file drops every such lock of the process: close() only after SQLite's own
connection closed (broker/durability.py tells what that costs).
"""

from __future__ import annotations

import os
import struct

_HEADER = struct.Struct("=16xI76xI")  # mxFrame at byte 16, nBackfill at byte 96


class WalIndex:
    """The -shm file of an open WAL-mode database, for its WAL length."""

    def __init__(self, db_path: str) -> None:
        # SQLite creates the -shm beside the database, symbolic links resolved,
        # when the first connection opens the WAL; the caller has read from it.
        # Kept open until close(): see the module docstring.
        self._fd = os.open(os.path.realpath(db_path) + "-shm", os.O_RDONLY)

    def uncopied_frames(self) -> int:
        """Frames in the WAL not yet copied into the database file (0 if unreadable)."""
        header = os.pread(self._fd, _HEADER.size, 0)
        if len(header) < _HEADER.size:
            return 0
        last: int
        backfilled: int
        last, backfilled = _HEADER.unpack(header)
        return max(0, last - backfilled)

    def close(self) -> None:
        """Only once SQLite's connection to the database is closed."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
