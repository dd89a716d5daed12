"""A taskring worker that imports everything, says so, and connects only when told.

    python bench/cued_worker.py ENDPOINT NAME

It prints "imported" once its imports are done, then waits for a line on
stdin before it connects. startup.py starts one before the broker and cues
it the moment the broker first answers, so the time to the first dispatch
is the broker's, not a worker's start-up or its reconnect back-off (which
grows to 1 s while nothing listens).
"""

from __future__ import annotations

import logging
import sys

import bench_tasks  # noqa: F401  (registers the tasks)

from taskring.workers import WorkerSettings, run_worker


def main(endpoint: str, name: str) -> None:
    print("imported", flush=True)
    if not sys.stdin.readline():
        return  # the benchmark went away before the cue
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_worker(
        WorkerSettings(endpoint=endpoint, modules=("bench_tasks",), concurrency=4, name=name)
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
