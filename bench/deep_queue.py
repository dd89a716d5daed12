"""Deep queue: a broker holding 1,000,000 queued tasks submits and dispatches as fast as at 10,000.

For each depth D (--depths, default 10,000 and 1,000,000) a task log holding
D queued no-op tasks is built once, with no workers: through a broker with
submit_many (--fill broker, the default; the filling broker's peak memory is
reported too) or with the broker's own Store in bulk (--fill store: the same
schema and statements, no broker in between). Every run starts
a broker on a fresh copy of it and measures:

- submit rate: M more tasks (--measure) with submit_many, on top of D;
- dispatch rate: 2 workers start, and the time from the W-th (--warmup, so
  worker start-up is not counted) to the (W+M)-th of the oldest tasks
  finishing, as NOTIFY reports them: lease, run, result, commit;
- broker memory: VmRSS after the submit and VmHWM (peak) at the end, /proc.

The reference is the same run at the smallest depth: the ratios say what
depth costs. Goals: both rates within 20%, peak RSS under 300 MB.

    python bench/deep_queue.py --depths 10000,1000000 --repeat 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import NOOP, BenchError, Children, Taskring, build_db, copy_db, median, rss_mb
from report import Goal, base_parser, header, runs, show_goals, table, taskring_durability, workdir

from taskring.client import Client

GOAL_RATIO = 0.8  # rates at the deepest queue at least 80% of those at the shallowest
GOAL_RSS_MB = 300.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--depths",
        default="10000,1000000",
        help="queued tasks, comma-separated (default 10000,1000000)",
    )
    parser.add_argument(
        "--measure",
        type=int,
        default=10_000,
        help="tasks submitted, and tasks drained, per measurement",
    )
    parser.add_argument(
        "--warmup", type=int, default=2_000, help="tasks finished before the drain clock starts"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--fill", choices=("broker", "store"), default="broker", help="how the task log is filled"
    )
    parser.add_argument(
        "--fill-chunk", type=int, default=50_000, help="tasks per submit_many call while filling"
    )
    args = parser.parse_args(argv)
    args.depths = sorted(int(d) for d in args.depths.split(","))
    if args.depths[0] < args.warmup:
        parser.error("every depth must be at least --warmup")
    return args


def fill(work: Path, args: argparse.Namespace, depth: int) -> tuple[Path, float, float | None]:
    """The template log for one depth: (path, seconds taken, peak RSS of the filling broker)."""
    template = work / f"template-{depth}.db"
    if args.fill == "store":
        start = time.monotonic()
        build_db(template, total=depth, running=0)
        return template, time.monotonic() - start, None
    with Children(work) as children:
        cluster = Taskring(children, synchronous=args.synchronous)
        broker = cluster.start_broker(template)
        with cluster.client(timeout_s=60) as client:
            start = time.monotonic()
            for first in range(0, depth, args.fill_chunk):
                client.submit_many(
                    NOOP, [(i,) for i in range(first, min(depth, first + args.fill_chunk))]
                )
            seconds = time.monotonic() - start
        peak = rss_mb(broker.pid)[1]
    return template, seconds, peak  # the broker has closed the log cleanly


def run(
    work: Path, args: argparse.Namespace, template: Path, depth: int, rep: int
) -> dict[str, float]:
    db = work / f"run-{depth}-{rep}.db"
    copy_db(template, db)
    try:
        with Children(work) as children:
            cluster = Taskring(children, synchronous=args.synchronous)
            broker = cluster.start_broker(db)
            with cluster.client(timeout_s=60) as client:
                start = time.monotonic()
                new_ids = client.submit_many(NOOP, [(i,) for i in range(args.measure)])
                submit_rate = args.measure / (time.monotonic() - start)
                rss_after_submit = rss_mb(broker.pid)[0]
                # The template's tasks have ids 1..depth; the oldest go first.
                oldest = [*range(1, min(depth, args.warmup + args.measure) + 1), *new_ids]
                watched = oldest[: args.warmup + args.measure]
                cluster.start_workers(args.workers, args.concurrency)
                dispatch_rate = drain_rate(client, watched, args.warmup)
                peak = rss_mb(broker.pid)[1]
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    return {"submit": submit_rate, "dispatch": dispatch_rate, "rss": rss_after_submit, "peak": peak}


def drain_rate(client: Client, ids: list[int], warmup: int) -> float:
    """Tasks per second from the `warmup`-th of `ids` finishing to the last."""
    clock = time.monotonic()
    for finished, info in enumerate(client.as_completed(ids, timeout=600), start=1):
        if not info.ok:
            raise BenchError(f"task {info.id} did not succeed: {info.state} {info.error}")
        if finished == warmup:
            clock = time.monotonic()
    return (len(ids) - warmup) / (time.monotonic() - clock)


def main(argv: list[str] | None = None) -> list[Goal]:
    args = parse(argv)
    with workdir(args) as work:
        header(
            "deep queue: submit and dispatch rates, and broker memory, by queue depth",
            f"depths {', '.join(f'{d:,}' for d in args.depths)}; {args.measure:,} tasks "
            f"submitted and {args.measure:,} drained per run after {args.warmup:,}; "
            f"{args.workers} workers x {args.concurrency}; fill: {args.fill}; "
            f"median of {args.repeat} run(s)",
            [taskring_durability(args.synchronous)],
        )
        results: dict[int, list[dict[str, float]]] = {}
        fills: dict[int, tuple[float, float | None]] = {}
        for depth in args.depths:
            template, seconds, fill_peak = fill(work, args, depth)
            fills[depth] = (seconds, fill_peak)
            rate = depth / seconds
            print(
                f"   filled {depth:,} in {seconds:.1f} s ({rate:,.0f}/s, {args.fill})", flush=True
            )
            results[depth] = [run(work, args, template, depth, rep) for rep in range(args.repeat)]
            template.unlink()
    return report(args, results, fills)


def report(
    args: argparse.Namespace,
    results: dict[int, list[dict[str, float]]],
    fills: dict[int, tuple[float, float | None]],
) -> list[Goal]:
    def med(depth: int, what: str) -> float:
        return median([r[what] for r in results[depth]])

    base, deep = args.depths[0], args.depths[-1]
    rows = []
    for depth in args.depths:
        fill_peak = fills[depth][1]
        rows.append(
            (
                f"{depth:,}",
                f"{med(depth, 'submit'):,.0f}",
                f"{med(depth, 'submit') / med(base, 'submit'):.2f}",
                f"{med(depth, 'dispatch'):,.0f}",
                f"{med(depth, 'dispatch') / med(base, 'dispatch'):.2f}",
                runs([r["dispatch"] for r in results[depth]]),
                f"{med(depth, 'rss'):.0f}",
                f"{max(r['peak'] for r in results[depth]):.0f}",
                "n/a" if fill_peak is None else f"{fill_peak:.0f}",
            )
        )
    print()
    table(
        [
            "queued",
            "submit/s",
            "vs base",
            "dispatch/s",
            "vs base",
            "dispatch runs",
            "RSS MB",
            "peak MB",
            "fill peak MB",
        ],
        rows,
    )
    submit_ratio = med(deep, "submit") / med(base, "submit")
    dispatch_ratio = med(deep, "dispatch") / med(base, "dispatch")
    peak = max([r["peak"] for r in results[deep]] + [p for _, p in fills.values() if p is not None])
    goals = [
        Goal(
            "deep queue",
            f"submit at {deep:,} >= {GOAL_RATIO:.0%} of at {base:,}",
            f"{submit_ratio:.0%}",
            submit_ratio >= GOAL_RATIO,
        ),
        Goal(
            "deep queue",
            f"dispatch at {deep:,} >= {GOAL_RATIO:.0%} of at {base:,}",
            f"{dispatch_ratio:.0%}",
            dispatch_ratio >= GOAL_RATIO,
        ),
        Goal(
            "deep queue",
            f"broker peak RSS < {GOAL_RSS_MB:.0f} MB at {deep:,}",
            f"{peak:.0f} MB",
            peak < GOAL_RSS_MB,
        ),
    ]
    show_goals(goals)
    return goals


if __name__ == "__main__":
    main()
