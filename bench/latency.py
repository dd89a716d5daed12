"""Latency: one task at a time, submit and wait for its result; p50 and p99 of the round trip.

taskring: `client.submit(...).result()` against a broker and one worker: a
SUBMIT committed before its reply, a GET that registers the watch, the
worker's lease, run and RESULT committed, then the NOTIFY. References in
the same invocation: a raw pyzmq request-reply round trip to a ROUTER echo
process (the floor of any ZeroMQ round trip), a durable relay (durable_relay.py:
four hops through one process that commits to SQLite twice, with taskring's
durability settings, and syncs the task's commit while the worker has it, as
taskring's broker does: the floor of any design that commits the task before
it runs and makes its result durable before answering), Huey one at a time
(enqueue, poll the result every 0.5 ms), and Dramatiq one at a time (send,
blocking get_result) when redis-server is on PATH.

    python bench/latency.py --tasks 2000 --repeat 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import zmq
from common import (
    NOOP,
    Children,
    Taskring,
    median,
    percentile,
    start_durable_relay,
    start_echo,
)
from references import RESULT_TIMEOUT_S, References, dramatiq_workers, huey_consumer, wait_huey
from report import Goal, base_parser, header, runs, show_goals, table, taskring_durability, workdir

GOAL_P50_MS = 1.0
GOAL_P99_MS = 3.0
WARMUP = 100  # round trips before the measured ones: connections, caches, imports
SLOW_MS = 100  # round trips counted as outliers (a missed NOTIFY costs the client's 1 s re-poll)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--tasks", type=int, default=2_000, help="measured round trips per run (default 2000)"
    )
    parser.add_argument(
        "--only", default="taskring,zmq,relay,huey,dramatiq", help="systems to run, comma-separated"
    )
    return parser.parse_args(argv)


def measure(n: int, once: Callable[[int], object]) -> list[float]:
    """Round-trip times in milliseconds of `once(i)`, after WARMUP unmeasured calls."""
    for i in range(WARMUP):
        once(-i - 1)
    times = []
    for i in range(n):
        start = time.perf_counter()
        once(i)
        times.append((time.perf_counter() - start) * 1000)
    return times


def run_taskring(
    work: Path, args: argparse.Namespace, rep: int, endpoints: dict[str, str]
) -> list[float]:
    with Children(work) as children:
        cluster = Taskring(children, synchronous=args.synchronous)
        cluster.start_broker(work / f"taskring-{rep}.db")
        cluster.start_workers(1, concurrency=4)
        cluster.wait_workers(1)
        with cluster.client() as client:
            return measure(
                args.tasks, lambda i: client.submit(NOOP, i).result(timeout=RESULT_TIMEOUT_S)
            )


def run_echo(
    work: Path, args: argparse.Namespace, rep: int, endpoints: dict[str, str]
) -> list[float]:
    return _dealer_round_trips(endpoints["zmq"], args.tasks)


def run_relay(
    work: Path, args: argparse.Namespace, rep: int, endpoints: dict[str, str]
) -> list[float]:
    return _dealer_round_trips(endpoints["relay"], args.tasks)


def _dealer_round_trips(endpoint: str, n: int) -> list[float]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    body = b"\x92\x91\xcd\x01\x00\x80"  # msgpack [[256], {}]: a no-op task's payload

    def once(i: int) -> list[bytes]:
        sock.send(body)
        return sock.recv_multipart()

    try:
        return measure(n, once)
    finally:
        sock.close(linger=0)


def run_huey(
    work: Path, args: argparse.Namespace, rep: int, endpoints: dict[str, str]
) -> list[float]:
    with Children(work) as children, huey_consumer(children, workers=1) as app:
        return measure(args.tasks, lambda i: wait_huey(app.noop(i), children))


def run_dramatiq(
    work: Path, args: argparse.Namespace, rep: int, endpoints: dict[str, str]
) -> list[float]:
    timeout_ms = int(RESULT_TIMEOUT_S * 1000)
    with Children(work) as children, dramatiq_workers(children, processes=1, threads=1) as app:
        return measure(
            args.tasks, lambda i: app.noop.send(i).get_result(block=True, timeout=timeout_ms)
        )


RUNNERS = {
    "taskring": run_taskring,
    "zmq": run_echo,
    "relay": run_relay,
    "huey": run_huey,
    "dramatiq": run_dramatiq,
}
LABELS = {
    "taskring": "taskring (1 worker)",
    "zmq": "raw pyzmq request-reply, 2 hops",
    "relay": "durable relay: 4 hops, 2 commits (floor)",
    "huey": "Huey SqliteHuey (1 process worker)",
    "dramatiq": "Dramatiq + Redis (1 process x 1)",
}


def main(argv: list[str] | None = None) -> list[Goal]:
    args = parse(argv)
    with workdir(args) as work, Children(work) as shared:
        refs = References(set(args.only.split(",")), work, shared)
        endpoints = {}
        if "zmq" in refs.enabled:
            endpoints["zmq"] = start_echo(shared)
        if "relay" in refs.enabled:
            endpoints["relay"] = start_durable_relay(shared, work / "relay.db", args.synchronous)
        header(
            "latency: one task at a time, submit to result",
            f"{args.tasks:,} round trips per run after {WARMUP} unmeasured, median of "
            f"{args.repeat} run(s) of each percentile",
            [
                taskring_durability(args.synchronous),
                *(["durable relay: the same SQLite settings"] if "relay" in refs.enabled else []),
                *refs.durability,
            ],
            refs.skipped,
        )
        p50: dict[str, list[float]] = {name: [] for name in RUNNERS if name in refs.enabled}
        p99: dict[str, list[float]] = {name: [] for name in p50}
        slow: dict[str, list[int]] = {name: [] for name in p50}
        for rep in range(args.repeat):
            for name in p50:
                times = RUNNERS[name](work, args, rep, endpoints)
                p50[name].append(percentile(times, 50))
                p99[name].append(percentile(times, 99))
                slow[name].append(sum(t > SLOW_MS for t in times))
    return report(p50, p99, slow)


def report(
    p50: dict[str, list[float]], p99: dict[str, list[float]], slow: dict[str, list[int]]
) -> list[Goal]:
    ours = (median(p50["taskring"]), median(p99["taskring"])) if "taskring" in p50 else None
    rows = []
    for name in p50:
        a, b = median(p50[name]), median(p99[name])
        ratio = f"{a / ours[0]:.2f}x" if ours and name != "taskring" else ""
        rows.append(
            (
                LABELS[name],
                f"{a:.3f}",
                f"{b:.3f}",
                runs(p50[name], "{:.3f}"),
                str(slow[name]),
                ratio,
            )
        )
    print()
    table(
        ["system", "p50 ms", "p99 ms", "p50 runs", f"> {SLOW_MS} ms", "its p50 / taskring's"], rows
    )
    if ours is not None and "relay" in p50:
        floor = median(p50["relay"])
        print(
            f"\n   the durable relay's p50, {floor:.3f} ms, is what four hops and two commits cost "
            f"here; taskring's p50 is {ours[0] - floor:.3f} ms over it"
        )
        if floor >= GOAL_P50_MS:
            print(f"   a p50 under {GOAL_P50_MS:g} ms is below that floor at these settings")
    goals = []
    if ours is not None:
        goals.append(
            Goal("latency", f"p50 < {GOAL_P50_MS:g} ms", f"{ours[0]:.3f} ms", ours[0] < GOAL_P50_MS)
        )
        goals.append(
            Goal("latency", f"p99 < {GOAL_P99_MS:g} ms", f"{ours[1]:.3f} ms", ours[1] < GOAL_P99_MS)
        )
    show_goals(goals)
    return goals


if __name__ == "__main__":
    main()
