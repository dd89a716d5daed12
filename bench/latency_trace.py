"""Where one round trip's time goes: latency.py's loop, with every hop and step timed.

The broker and the worker run under bench/traced.py, which stamps every
message sent and received, the broker's commit and sync, and the task
thread's start and end with the clock all processes share; the client in
this process is stamped the same way. Each measured round trip (submit one
no-op task, wait for its result) is cut into its steps, and the report shows
the median of each step over the round trips that took the most common path,
then the totals by kind: hops between processes, broker work, syncs, worker
hand-offs.

    python bench/latency_trace.py --tasks 1000
    python bench/latency_trace.py --tasks 3000 --tail   # also where the p99 goes

With --tail it also shows each step's p50, p99 and p99.9, and for the
slowest 2% of round trips which step was furthest over its median. A stamp
costs about a microsecond, so the total is a little above latency.py's.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import statistics
import sys
from pathlib import Path

import traced
from common import BENCH_DIR, NOOP, Children, Taskring
from references import RESULT_TIMEOUT_S
from report import header, table, taskring_durability, workdir

WARMUP = 100
BEGIN, END = "client round trip begins", "client round trip ends"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000, help="measured round trips")
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--tail", action="store_true", help="also each step's p99, and where the slowest 2%% lost"
    )
    return parser.parse_args(argv)


def run(work: Path, args: argparse.Namespace) -> list[tuple[int, str]]:
    """Every stamp of the broker, the worker and this client, in time order."""
    trace_dir = work / "trace"
    trace_dir.mkdir()
    os.environ["TASKRING_TRACE_DIR"] = str(trace_dir)  # the children inherit it
    traced.install("client", None)
    launcher = [sys.executable, str(BENCH_DIR / "traced.py")]
    with Children(work) as children:
        cluster = Taskring(children, synchronous=args.synchronous, launcher=launcher)
        cluster.start_broker(work / "taskring.db")
        cluster.start_workers(1, concurrency=4)
        cluster.wait_workers(1)
        with cluster.client() as client:
            for i in range(WARMUP + args.tasks):
                traced.mark(BEGIN if i >= WARMUP else "warm-up")
                client.submit(NOOP, i).result(timeout=RESULT_TIMEOUT_S)
                traced.mark(END if i >= WARMUP else "warm-up")
    # Leaving `Children` stopped the broker and the worker: their stamps are on disk.
    return sorted([*traced.read(trace_dir), *traced.EVENTS])


def round_trips(events: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    trips: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] | None = None
    for ns, label in events:
        if label == BEGIN:
            current = [(ns, label)]
        elif current is not None:
            current.append((ns, label))
            if label == END:
                trips.append(current)
                current = None
    return trips


# The steps each round trip waits for, in order, with what each one is. The
# SUBMIT's REPLY and the RESULT's ACK leave after the TASK and the NOTIFY and
# travel beside them, off this path. The TASK leaves between the SUBMIT's
# commit and its sync, so that sync is off the path too, unless the RESULT
# comes back before it ends: the RESULT's hop then includes the wait. With
# --synchronous normal there is no sync step.
SYNCED = ("broker synced",)
Steps = list[tuple[tuple[str, ...], str]]


def critical_path(synchronous: str) -> Steps:
    sync: Steps = [(SYNCED, "sync")] if synchronous == "full" else []
    return [
        ((BEGIN,), ""),
        (("client sends SUBMIT",), "client"),
        (("broker receives SUBMIT",), "hop"),
        (("broker committed",), "broker turn"),
        (("broker sends TASK",), "broker turn"),
        (("worker receives TASK",), "hop"),
        (("task thread starts",), "worker hand-off"),
        (("task thread ends",), "task"),
        (("worker sends RESULT",), "worker hand-off"),
        (("broker receives RESULT",), "hop"),
        (("broker committed",), "broker turn"),
        *sync,
        (("broker sends NOTIFY",), "broker turn"),
        (("client receives NOTIFY",), "hop"),
        ((END,), "client"),
    ]


def critical_steps(trip: list[tuple[int, str]], path: Steps) -> list[int] | None:
    """Nanoseconds of each step of `path` in this trip, or None if it went otherwise."""
    stamps, at = [], 0
    for labels, _ in path:
        while at < len(trip) and trip[at][1] not in labels:
            at += 1
        if at == len(trip):
            return None
        stamps.append(trip[at][0])
    return [b - a for a, b in itertools.pairwise(stamps)]


def _name(labels: tuple[str, ...]) -> str:
    return "broker's sync returns" if labels == SYNCED else labels[0]


def report(trips: list[list[tuple[int, str]]], path: Steps) -> None:
    steps = [s for s in (critical_steps(trip, path) for trip in trips) if s is not None]
    if not steps:
        raise SystemExit("no round trip took the expected path; see the kept workdir")
    print(f"   {len(steps)} of {len(trips)} round trips on the usual path; medians, in µs")
    print()
    rows = []
    by_kind: dict[str, float] = collections.defaultdict(float)
    for i, ((before, _), (labels, what)) in enumerate(itertools.pairwise(path)):
        step = statistics.median(s[i] for s in steps) / 1000
        by_kind[what] += step
        rows.append((f"{_name(before)} -> {_name(labels)}", what, f"{step:,.0f}"))
    total = statistics.median(sum(s) for s in steps) / 1000
    table(["step", "kind", "µs"], rows)
    print()
    ranked = sorted(by_kind.items(), key=lambda kv: -kv[1])
    summary = [(k, f"{v:,.0f}", f"{v / total:.0%}") for k, v in ranked]
    table(["kind", "µs", "share"], [*summary, ("round trip (median)", f"{total:,.0f}", "")])
    print()


SLOWEST = 0.02  # the share of round trips --tail looks into


def report_tail(trips: list[list[tuple[int, str]]], path: Steps) -> None:
    """Each step's percentiles, and the step each of the slowest round trips lost most on."""
    steps = [s for s in (critical_steps(trip, path) for trip in trips) if s is not None]
    pairs = itertools.pairwise(path)
    names = [f"{_name(before)} -> {_name(labels)}" for (before, _), (labels, _) in pairs]
    by_total = sorted(steps, key=sum)
    n = len(by_total)

    def at(values: list[int], q: float) -> str:
        return f"{values[min(len(values) - 1, int(len(values) * q))] / 1000:,.0f}"

    totals = [sum(s) for s in by_total]
    p50, p98, p99 = (at(totals, q) for q in (0.5, 0.98, 0.99))
    print(f"   the round trip: p50 {p50}, p98 {p98}, p99 {p99} µs")
    print()
    rows = []
    for i, name in enumerate(names):
        values = sorted(s[i] for s in steps)
        over_1ms = sum(v > 1_000_000 for v in values)
        rows.append((name, at(values, 0.5), at(values, 0.99), at(values, 0.999), str(over_1ms)))
    table(["step", "p50 µs", "p99 µs", "p99.9 µs", "> 1 ms"], rows)
    print()
    slow = by_total[int(n * (1 - SLOWEST)) :]
    medians = [statistics.median(s[i] for s in steps) for i in range(len(names))]
    worst: collections.Counter[str] = collections.Counter()
    excess = [0.0] * len(names)
    for s in slow:
        over = [s[i] - medians[i] for i in range(len(names))]
        worst[names[max(range(len(names)), key=over.__getitem__)]] += 1
        excess = [e + o / len(slow) for e, o in zip(excess, over, strict=True)]
    print(f"   the slowest {SLOWEST:.0%} ({len(slow)} round trips): the step most over its median")
    print()
    rows = [(name, str(worst[name]), f"{excess[i] / 1000:,.0f}") for i, name in enumerate(names)]
    table(["step", "round trips", "mean µs over median"], rows)
    print()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    with workdir(args) as work:
        header(
            "latency trace: one round trip, step by step",
            f"{args.tasks} measured round trips after {WARMUP} warm-up, 1 worker x 4 threads",
            [taskring_durability(args.synchronous)],
        )
        trips = round_trips(run(work, args))
        report(trips, critical_path(args.synchronous))
        if args.tail:
            report_tail(trips, critical_path(args.synchronous))


if __name__ == "__main__":
    main()
