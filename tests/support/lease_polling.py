"""A plain helper shared by the task modules of two test suites.

tests/support/crash_tasks.py is imported by cluster workers as `crash_tasks`,
with this folder on PYTHONPATH; tests/unit/worker_tasks.py as
`tests.unit.worker_tasks`. Each imports this module under its own path, so it
registers no task.
"""

from __future__ import annotations

import time
from typing import Any


def lease_lost_within(ctx: Any, seconds: float) -> bool:
    """Poll ctx.lease_lost without ever checkpointing; True if it turned within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ctx.lease_lost:
            return True
        time.sleep(0.01)
    return False
