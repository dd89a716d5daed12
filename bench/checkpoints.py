"""Checkpoints: acknowledged ctx.checkpoint calls per second from one worker.

A task calls ctx.checkpoint(i) N times in a row; each call returns only once
the broker has committed it (task thread, worker I/O thread, broker turn and
commit, ACK, and back). The rate is N over the time inside the task
(bench_tasks.checkpoints), so submitting and result reading are left out.
--parallel P runs P such tasks at once on the worker, to show group commit:
then the rate is P x N over the span from the first start to the last end.

The reference, in the same invocation: the same number of SQLite
transactions in this process, each one UPDATE of the task row and one
INSERT of an event like the broker's, in WAL with the same synchronous
setting, one COMMIT each. That is the cost of the durability alone, with
no network and no batching: the floor under one checkpoint at a time.

    python bench/checkpoints.py --checkpoints 10000 --repeat 3
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path

from common import CHECKPOINTS, BenchError, Children, Taskring, median
from report import Goal, base_parser, header, runs, show_goals, table, taskring_durability, workdir

from taskring.clock import wall_clock

GOAL_RATE = 5_000  # acknowledged checkpoints per second


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--checkpoints", type=int, default=10_000, help="checkpoints per task (default 10000)"
    )
    parser.add_argument(
        "--parallel", type=int, default=1, help="checkpointing tasks at once (default 1)"
    )
    return parser.parse_args(argv)


def run_taskring(work: Path, args: argparse.Namespace, rep: int) -> float:
    with Children(work) as children:
        cluster = Taskring(children, synchronous=args.synchronous)
        cluster.start_broker(work / f"taskring-{rep}.db")
        cluster.start_workers(1, concurrency=args.parallel)
        cluster.wait_workers(1)
        with cluster.client() as client:
            ids = client.submit_many(CHECKPOINTS, [(args.checkpoints,)] * args.parallel)
            done = client.wait(ids, timeout=600)
    bad = [info for info in done.values() if not info.ok]
    if bad:
        raise BenchError(
            f"checkpoint task {bad[0].id} did not succeed: {bad[0].state} {bad[0].error}"
        )
    spans = [info.value for info in done.values()]
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    return args.checkpoints * args.parallel / (last - first)


def run_sqlite(work: Path, args: argparse.Namespace, rep: int) -> float:
    path = work / f"sqlite-{rep}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {args.synchronous.upper()}")
        conn.execute(
            "CREATE TABLE tasks (id INTEGER PRIMARY KEY, checkpoint BLOB, checkpoint_no INTEGER)"
        )
        conn.execute(
            "CREATE TABLE events"
            " (id INTEGER PRIMARY KEY, task_id INTEGER, at REAL, kind TEXT, detail TEXT)"
        )
        conn.execute("INSERT INTO tasks VALUES (1, NULL, 0)")
        n = args.checkpoints * args.parallel
        start = time.monotonic()
        for i in range(1, n + 1):
            conn.execute("BEGIN")
            conn.execute(
                "UPDATE tasks SET checkpoint = ?, checkpoint_no = ? WHERE id = 1",
                (i.to_bytes(4), i),
            )
            conn.execute(
                "INSERT INTO events (task_id, at, kind, detail) VALUES (1, ?, 'checkpointed', ?)",
                (wall_clock(), f"checkpoint {i}"),
            )
            conn.execute("COMMIT")
        return n / (time.monotonic() - start)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> list[Goal]:
    args = parse(argv)
    rates: dict[str, list[float]] = {"taskring": [], "sqlite": []}
    with workdir(args) as work:
        header(
            "checkpoints: acknowledged ctx.checkpoint calls per second, one worker",
            f"{args.checkpoints:,} checkpoints per task, {args.parallel} task(s) at once, "
            f"median of {args.repeat} run(s)",
            [
                taskring_durability(args.synchronous),
                f"reference: SQLite WAL, synchronous={args.synchronous.upper()}, "
                "one COMMIT per checkpoint",
            ],
        )
        for rep in range(args.repeat):  # interleaved, so drift in the machine hits both alike
            rates["taskring"].append(run_taskring(work, args, rep))
            rates["sqlite"].append(run_sqlite(work, args, rep))
    ours, floor = median(rates["taskring"]), median(rates["sqlite"])
    print()
    table(
        ["system", "checkpoints/s", "runs", "taskring / it"],
        [
            (
                f"taskring (1 worker, {args.parallel} task(s))",
                f"{ours:,.0f}",
                runs(rates["taskring"]),
                "",
            ),
            (
                "SQLite commit per checkpoint, in-process",
                f"{floor:,.0f}",
                runs(rates["sqlite"]),
                f"{ours / floor:.2f}x",
            ),
        ],
    )
    goals = [Goal("checkpoints", f">= {GOAL_RATE:,}/s", f"{ours:,.0f}/s", ours >= GOAL_RATE)]
    show_goals(goals)
    return goals


if __name__ == "__main__":
    main()
