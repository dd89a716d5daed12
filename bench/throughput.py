"""Throughput: N no-op tasks end to end, first submit to last result, on 2 worker processes.

taskring: a broker and `taskring worker bench_tasks --concurrency K --prefetch P`, W
times (K = 8, as Dramatiq's threads, and P = 92 by default);
the client submits everything with submit_many, then waits with wait().
References, measured in the same invocation and interleaved with it run by run:

- raw pyzmq: a DEALER sending N messages to a ROUTER echo process, 100 in
  flight. No store, no codec, one hop: the ceiling, not a competitor.
- Huey: SqliteHuey and a consumer with W process workers; enqueue all N,
  then wait for every result.
- Dramatiq: Redis (no fsync) and W worker processes; send all N, then wait
  for every result. Skipped, with one line, when redis-server is not on PATH.

    python bench/throughput.py --tasks 20000 --repeat 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import zmq
from common import (
    NOOP,
    THROUGHPUT_CONCURRENCY,
    THROUGHPUT_PREFETCH,
    BenchError,
    Children,
    Taskring,
    median,
    start_echo,
)
from references import RESULT_TIMEOUT_S, References, dramatiq_workers, huey_consumer, wait_huey
from report import Goal, base_parser, header, runs, show_goals, table, taskring_durability, workdir

GOAL_RATE = 12_500  # tasks/s
GOAL_VS_DRAMATIQ = 10.0
GOAL_VS_HUEY = 13.0
ECHO_WINDOW = 100


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--tasks", type=int, default=20_000, help="no-op tasks per run (default 20000)"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=THROUGHPUT_CONCURRENCY,
        help=f"taskring task threads per worker (default {THROUGHPUT_CONCURRENCY}, "
        "as Dramatiq's threads)",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=THROUGHPUT_PREFETCH,
        help="taskring tasks each worker holds beyond those running "
        f"(default {THROUGHPUT_PREFETCH}: 100 held per worker)",
    )
    parser.add_argument(
        "--dramatiq-threads", type=int, default=8, help="threads per Dramatiq process (default 8)"
    )
    parser.add_argument(
        "--only", default="taskring,zmq,huey,dramatiq", help="systems to run, comma-separated"
    )
    return parser.parse_args(argv)


def run_taskring(work: Path, args: argparse.Namespace, rep: int) -> float:
    with Children(work) as children:
        cluster = Taskring(children, synchronous=args.synchronous)
        cluster.start_broker(work / f"taskring-{rep}.db")
        cluster.start_workers(args.workers, args.concurrency, args.prefetch)
        cluster.wait_workers(args.workers)
        with cluster.client() as client:
            start = time.monotonic()
            ids = client.submit_many(NOOP, [(i,) for i in range(args.tasks)])
            done = client.wait(ids, timeout=600)
            elapsed = time.monotonic() - start
        bad = [info for info in done.values() if not info.ok]
        if bad:
            raise BenchError(f"taskring: {len(bad)} tasks did not succeed, e.g. {bad[0]}")
    return args.tasks / elapsed


def run_echo(endpoint: str, n: int) -> float:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(endpoint)
    try:
        sock.send(b"warm-up")
        sock.recv()
        body = b"\x92\x91\xcd\x01\x00\x80"  # msgpack [[256], {}]: a no-op task's payload
        start = time.monotonic()
        sent = received = 0
        while sent < min(ECHO_WINDOW, n):
            sock.send(body)
            sent += 1
        while received < n:
            sock.recv()
            received += 1
            if sent < n:
                sock.send(body)
                sent += 1
        return n / (time.monotonic() - start)
    finally:
        sock.close(linger=0)


def run_huey(work: Path, args: argparse.Namespace) -> float:
    with Children(work) as children, huey_consumer(children, args.workers) as app:
        start = time.monotonic()
        results = [app.noop(i) for i in range(args.tasks)]
        for result in results:
            wait_huey(result, children)
        return args.tasks / (time.monotonic() - start)


def run_dramatiq(work: Path, args: argparse.Namespace) -> float:
    with (
        Children(work) as children,
        dramatiq_workers(children, args.workers, args.dramatiq_threads) as app,
    ):
        start = time.monotonic()
        messages = [app.noop.send(i) for i in range(args.tasks)]
        for message in messages:
            message.get_result(block=True, timeout=int(RESULT_TIMEOUT_S * 1000))
        return args.tasks / (time.monotonic() - start)


RUNNERS = {
    "taskring": lambda work, args, rep, echo: run_taskring(work, args, rep),
    "zmq": lambda work, args, rep, echo: run_echo(echo, args.tasks),
    "huey": lambda work, args, rep, echo: run_huey(work, args),
    "dramatiq": lambda work, args, rep, echo: run_dramatiq(work, args),
}


def main(argv: list[str] | None = None) -> list[Goal]:
    args = parse(argv)
    with workdir(args) as work, Children(work) as shared:
        refs = References(set(args.only.split(",")), work, shared)
        echo = start_echo(shared) if "zmq" in refs.enabled else ""
        header(
            "throughput: no-op tasks, first submit to last result",
            f"{args.tasks:,} tasks, {args.workers} worker processes, taskring --concurrency "
            f"{args.concurrency} --prefetch {args.prefetch}, median of {args.repeat} run(s)",
            [taskring_durability(args.synchronous), *refs.durability],
            refs.skipped,
        )
        rates: dict[str, list[float]] = {name: [] for name in RUNNERS if name in refs.enabled}
        for rep in range(args.repeat):  # interleaved, so drift in the machine hits all alike
            for name in rates:
                rates[name].append(RUNNERS[name](work, args, rep, echo))
        return report(args, rates)


def report(args: argparse.Namespace, rates: dict[str, list[float]]) -> list[Goal]:
    labels = {
        "taskring": f"taskring ({args.workers} workers x {args.concurrency}"
        + (f", prefetch {args.prefetch})" if args.prefetch else ")"),
        "zmq": f"raw pyzmq echo ({ECHO_WINDOW} in flight), ceiling",
        "huey": f"Huey SqliteHuey ({args.workers} process workers)",
        "dramatiq": f"Dramatiq + Redis ({args.workers} processes x {args.dramatiq_threads})",
    }
    ours = median(rates["taskring"]) if "taskring" in rates else None
    rows = []
    for name, values in rates.items():
        rate = median(values)
        ratio = "" if ours is None or name == "taskring" else f"{ours / rate:.2f}x"
        rows.append((labels[name], f"{rate:,.0f}", runs(values), ratio))
    print()
    table(["system", "tasks/s", "runs", "taskring / it"], rows)
    goals = []
    if ours is not None:
        goals.append(
            Goal("throughput", f">= {GOAL_RATE:,} tasks/s", f"{ours:,.0f}", ours >= GOAL_RATE)
        )
        for name, goal in (("dramatiq", GOAL_VS_DRAMATIQ), ("huey", GOAL_VS_HUEY)):
            times = ours / median(rates[name]) if name in rates else None
            measured = "not run" if times is None else f"{times:.1f}x"
            met = None if times is None else times >= goal
            goals.append(Goal("throughput", f">= {goal:g}x {name.capitalize()}", measured, met))
    show_goals(goals)
    return goals


if __name__ == "__main__":
    main()
