"""Startup: a broker on a log of 1,000,000 tasks, 10,000 of them running, serves within 2 s.

The log is written once with the broker's own Store (its migrations, its
INSERT and lease statements, in large transactions: see common.build_db):
--tasks tasks, all queued but the first --running, which are leased to a
worker that never comes back. Every run copies it afresh, then:

1. starts a worker (cued_worker.py) and waits until its imports are done;
2. starts the broker, and measures from its Popen to
   - its first STATUS reply (a raw DEALER reconnecting every 10 ms asks every 50 ms),
     at which moment the worker is told to connect;
   - its first dispatch: the `leased` event of the oldest queued task
     (wall-clock time in the task's history, against the wall clock at Popen).

The reference is the same run on a log of a single queued task.

    python bench/startup.py --tasks 1000000 --running 10000 --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import (
    BENCH_DIR,
    BenchError,
    Children,
    Taskring,
    build_db,
    copy_db,
    median,
    status_probe,
    wait_for,
)
from report import Goal, base_parser, header, runs, show_goals, table, taskring_durability, workdir

from taskring.clock import wall_clock

GOAL_S = 2.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--tasks", type=int, default=1_000_000, help="tasks in the log (default 1000000)"
    )
    parser.add_argument(
        "--running", type=int, default=10_000, help="of which running (default 10000)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.running < args.tasks:
        parser.error("--running must be below --tasks: one queued task is needed to see a dispatch")
    return args


def run(
    work: Path, args: argparse.Namespace, template: Path, running: int, rep: int
) -> dict[str, float]:
    db = work / f"run-{rep}.db"
    copy_db(template, db)
    try:
        with Children(work) as children:
            cluster = Taskring(children, synchronous=args.synchronous)
            worker = children.start(
                "cued-worker",
                [
                    sys.executable,
                    str(BENCH_DIR / "cued_worker.py"),
                    cluster.endpoint,
                    "cued-worker",
                ],
                pipes=True,
            )
            if (
                worker.stdin is None
                or worker.stdout is None
                or worker.stdout.readline() != b"imported\n"
            ):
                children.check()
                raise BenchError("the cued worker did not start")
            wall = wall_clock()  # compared with the broker's event timestamps, which are wall clock
            start = time.monotonic()
            cluster.start_broker(db, wait=False)
            status = status_probe(cluster.endpoint, 60, children.check)
            status_s = time.monotonic() - start
            worker.stdin.write(b"go\n")
            worker.stdin.flush()
            first_queued = running + 1
            with cluster.client() as client:

                def leased_at() -> float | None:
                    children.check()
                    _, events = client.history(first_queued)
                    return next((e["at"] for e in events if e["kind"] == "leased"), None)

                dispatch_at = wait_for(leased_at, 60, "the first dispatch", 0.05)
            orphans = status["broker"].get("orphaned_leases")
            if orphans != running:
                raise BenchError(
                    f"the broker reported {orphans} orphaned leases, expected {running}"
                )
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    return {"status": status_s, "dispatch": dispatch_at - wall}


def main(argv: list[str] | None = None) -> list[Goal]:
    args = parse(argv)
    with workdir(args) as work:
        header(
            "startup: broker process start to first STATUS reply and first dispatch",
            f"log of {args.tasks:,} tasks, {args.running:,} running (their worker is gone), "
            f"the rest queued; median of {args.repeat} run(s)",
            [taskring_durability(args.synchronous)],
        )
        start = time.monotonic()
        big = work / "big.db"
        build_db(big, total=args.tasks, running=args.running)
        print(
            f"   built the log in {time.monotonic() - start:.1f} s "
            f"({big.stat().st_size / 1e6:,.0f} MB) with Store",
            flush=True,
        )
        small = work / "small.db"
        build_db(small, total=1, running=0)
        results: dict[str, list[dict[str, float]]] = {"big": [], "small": []}
        for rep in range(args.repeat):  # interleaved, so drift in the machine hits both alike
            results["big"].append(run(work, args, big, args.running, rep))
            results["small"].append(run(work, args, small, 0, rep))
    return report(args, results)


def report(args: argparse.Namespace, results: dict[str, list[dict[str, float]]]) -> list[Goal]:
    def med(which: str, what: str) -> float:
        return median([r[what] for r in results[which]])

    labels = {
        "big": f"{args.tasks:,} tasks, {args.running:,} running",
        "small": "1 queued task (reference)",
    }
    rows = []
    for which in ("big", "small"):
        status = [r["status"] for r in results[which]]
        dispatch = [r["dispatch"] for r in results[which]]
        rows.append(
            (
                labels[which],
                f"{med(which, 'status'):.3f}",
                runs(status, "{:.3f}"),
                f"{med(which, 'dispatch'):.3f}",
                runs(dispatch, "{:.3f}"),
            )
        )
    print()
    table(["log", "STATUS s", "runs", "dispatch s", "runs"], rows)
    status_x = med("big", "status") / med("small", "status")
    dispatch_x = med("big", "dispatch") / med("small", "dispatch")
    print(f"   big log / reference: {status_x:.2f}x to STATUS, {dispatch_x:.2f}x to dispatch")
    goals = [
        Goal(
            "startup",
            f"STATUS < {GOAL_S:g} s",
            f"{med('big', 'status'):.3f} s",
            med("big", "status") < GOAL_S,
        ),
        Goal(
            "startup",
            f"dispatch < {GOAL_S:g} s",
            f"{med('big', 'dispatch'):.3f} s",
            med("big", "dispatch") < GOAL_S,
        ),
    ]
    show_goals(goals)
    return goals


if __name__ == "__main__":
    main()
