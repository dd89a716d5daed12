"""The reference Huey app: SqliteHuey with its defaults, and the same no-op task.

huey_consumer imports this module by name, so the database path can only
reach it through the environment (BENCH_HUEY_DB); the benchmark sets it for
the consumer and for itself.
"""

from __future__ import annotations

import os

from huey import SqliteHuey

SETTING = os.environ["BENCH_HUEY_DB"]
huey = SqliteHuey("bench", filename=SETTING)


@huey.task()
def noop(i: int) -> int:
    return i
