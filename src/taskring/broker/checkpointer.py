"""When the broker's WAL is copied into the database: between turns, not in a commit.

SQLite checkpoints inside the commit that takes the WAL past 1,000 pages, in
the broker loop's thread, before that turn's messages may leave. Here the
loop's own automatic checkpoint is only a fallback, at FALLBACK_FRAMES, and
one of two classes checkpoints instead, by durability mode.

With `--synchronous full` (TurnEndCheckpointer), the loop checkpoints right
after a turn's messages left, once TURN_END_FRAMES wait to be copied: the
turn that crosses the line no longer waits about 1 ms for it before its
ACKs and TASKs go out. Between turns it takes about 0.8 ms here, and a
message arriving meanwhile waits for the rest. It
reads the WAL's length from SQLite's wal-index (broker/walindex.py), since
Python's sqlite3 has no WAL hook. A checkpoint thread measured worse in this
mode (bench/HISTORY.md, Latency: its syncs overlap the loop's).

With `--synchronous normal` (WalCheckpointer), nothing else syncs the WAL, so
SQLite's checkpoint first writes the whole WAL out to disk: about 4 MB, 4 to
5 ms here, once every hundred one-task round trips, which made the p99 of
bench/latency.py in that mode. Here a second connection runs PASSIVE
checkpoints from a daemon thread. PASSIVE neither waits for the writer nor
blocks it, and sqlite3 lets go of the GIL while SQLite copies and syncs.

A checkpoint that runs beside the writer cannot finish the WAL: the loop
commits while it copies, and SQLite starts the WAL over only at a write that
finds every frame copied. Left alone the WAL grew by about 40 MB per
thousand round trips. So once the WAL is LONG_WAL_FRAMES long, the loop runs one PASSIVE
checkpoint itself, right after one of the thread's, when it has only the
frames of that checkpoint's few milliseconds left to copy; its next write
then starts the WAL over. The loop does it after a turn's messages left, so
none of them waits for it.

The thread is a departure from DESIGN.md's single-threaded broker, in normal
mode only: it shares nothing with the loop but the `wal_long` flag, and
SQLite's own locking keeps its checkpoints and the loop's writes apart.

Durability is SQLite's own either way: a checkpoint syncs the WAL before it
copies and the database after, and the loop's connection is still the one
that starts the WAL over once every frame is copied.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from taskring.broker.walindex import WalIndex

log = logging.getLogger(__name__)

# While checkpoints find frames to copy, one every BUSY_INTERVAL_S; while the
# log is idle the interval doubles up to IDLE_INTERVAL_S, so an idle broker
# does not wake ten times a second for nothing.
BUSY_INTERVAL_S = 0.1
IDLE_INTERVAL_S = 2.0
# How long the WAL may grow before the loop finishes a checkpoint itself:
# 16 MB, four times SQLite's own threshold.
LONG_WAL_FRAMES = 4_000
# The loop's own automatic checkpoint, should the thread stop: 64 MB.
FALLBACK_FRAMES = 4 * LONG_WAL_FRAMES
# The size SQLite cuts the WAL file back to when it starts the WAL over. A WAL
# grown long (a burst, or a reader that held checkpoints back) would otherwise
# keep its size on disk until the broker stops. Above the WAL's usual length,
# so that the usual restarts truncate nothing: in a commit, that costs time.
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
# With full durability, frames left to copy that make the loop checkpoint
# after a turn: SQLite's own default threshold.
TURN_END_FRAMES = 1_000
# A reader of an old snapshot (a sqlite3 shell, say) stops a checkpoint short,
# and a failing disk fails it; then the loop tries again at the first turn
# after this long, not after every turn.
BLOCKED_RETRY_S = 1.0
# How long close() waits for a checkpoint in progress.
CLOSE_TIMEOUT_S = 10.0


class WalCheckpointer:
    """PASSIVE checkpoints of one database from a daemon thread, until close()."""

    def __init__(self, db_path: str) -> None:
        # Only the thread uses the connection once the PRAGMA below has run.
        self._conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        try:
            # NORMAL makes a checkpoint sync the WAL before it copies, the database after.
            self._conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error:
            self._conn.close()
            raise
        self._stop = threading.Event()
        # Set by the thread after a checkpoint that found the WAL long, for the
        # loop's finish_checkpoint(); a plain flag, read and cleared by the loop.
        self.wal_long = False
        self._thread = threading.Thread(target=self._run, name="taskring-checkpoint")
        self._thread.daemon = True  # a stuck disk must not keep a stopped broker alive
        self._thread.start()

    def _run(self) -> None:
        interval = BUSY_INTERVAL_S
        last: tuple[int, int] | None = None
        while not self._stop.wait(interval):
            try:
                _busy, frames, done = self._conn.execute(
                    "PRAGMA wal_checkpoint(PASSIVE)"
                ).fetchone()
            except Exception as e:
                # The loop's own statements fail too if the log is in trouble; a
                # checkpoint that cannot run only lets the WAL grow meanwhile.
                log.warning("WAL checkpoint failed: %s", e)
                interval = IDLE_INTERVAL_S
                continue
            if frames >= LONG_WAL_FRAMES:
                self.wal_long = True
            idle = (frames, done) == last
            interval = min(interval * 2, IDLE_INTERVAL_S) if idle else BUSY_INTERVAL_S
            last = (frames, done)

    def finish_checkpoint(self, conn: sqlite3.Connection) -> None:
        """In the writer's thread, outside a transaction: copy what the thread could
        not, once the WAL is long, so that the next write starts the WAL over."""
        if self.wal_long:
            self.wal_long = False
            # Busy (the thread is in a checkpoint) is no error: the flag comes back.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def close(self) -> None:
        """Stop the thread (after a checkpoint in progress) and close its connection."""
        self._stop.set()
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            # Stuck on the disk: its connection is in use, so it is left to the exit.
            log.warning("WAL checkpoint still running after %.0f s; not waiting", CLOSE_TIMEOUT_S)
            return
        self._conn.close()


class TurnEndCheckpointer:
    """PASSIVE checkpoints in the loop's thread, between turns (with full durability)."""

    def __init__(self, wal_index: WalIndex) -> None:
        # The store's, which closes it after SQLite's connection (broker/walindex.py).
        self._index = wal_index
        self._retry_at = 0.0

    def finish_checkpoint(self, conn: sqlite3.Connection) -> None:
        """After a turn's messages left, outside a transaction: copy the WAL if it is long."""
        if self._index.uncopied_frames() < TURN_END_FRAMES:
            return
        now = time.monotonic()
        if now < self._retry_at:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError as e:
            # As SQLite's own checkpoint in a commit would, go on: what was
            # acknowledged is in the synced WAL, and the next try copies it. A
            # log that is really in trouble fails the loop's own statements.
            log.warning("WAL checkpoint failed: %s", e)
            self._retry_at = now + BLOCKED_RETRY_S
            return
        if self._index.uncopied_frames() >= TURN_END_FRAMES:
            self._retry_at = now + BLOCKED_RETRY_S
