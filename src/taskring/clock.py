"""The wall clock of the task log, in one place.

Timestamps in the log (created_at, updated_at, event times) are Unix time,
and so is "now" when the CLI shows how old one is. Deadlines and timers
never use this clock: they use time.monotonic(), which cannot jump.
"""

from __future__ import annotations

import time


def wall_clock() -> float:
    """Unix time in seconds, for log timestamps and their age only."""
    return time.time_ns() / 1e9
