"""Prune: what one PRUNE request costs the broker's loop, next to writing the same tasks.

In-process, with the broker's own Store: --tasks finished tasks are written in
turns of 1,000, as a busy broker writes them (submitted, --per-submit tasks to a
SUBMIT, leased and succeeded in one commit, then the WAL sync and the
checkpoint between turns). One task per SUBMIT, the default, leaves the most
SUBMIT records for a prune to look at. Then they
are pruned as the broker serves PRUNE: one turn per request, each looking at
PRUNE_SCAN_ROWS tasks (the commit, its sync, and the checkpoint after it).
The reference is the writing turns of the same run: pruning a task should
cost no more than writing it did.

    python bench/prune.py --tasks 200000 --repeat 3
    python bench/prune.py --per-submit 1000
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from common import median, percentile
from report import base_parser, header, runs, table, taskring_durability, workdir

from taskring.broker.server import PRUNE_SCAN_ROWS
from taskring.broker.store import Store
from taskring.protocol import FINAL_STATES

TURN = 1_000  # tasks written per turn, as PRUNE_SCAN_ROWS are pruned per turn
PAYLOAD = b"\x92\x91\x01\x80"  # msgpack [[1], {}]
RESULT = b"\x03"
T = TypeVar("T")
TABLES = ("tasks", "events", "requests")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--tasks", type=int, default=200_000, help="finished tasks written, then pruned"
    )
    parser.add_argument(
        "--per-submit", type=int, default=1, help="tasks per SUBMIT record, 1 to 1000 (default 1)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.per_submit <= TURN:
        parser.error(f"--per-submit must be 1 to {TURN}")
    return args


def timed_turn(store: Store, work: Callable[[], T]) -> tuple[float, T]:
    """Milliseconds of one broker turn (the writes and commit, the sync, the
    checkpoint), and what `work` returned."""
    began = time.perf_counter()
    with store.turn():
        value = work()
    store.sync()
    store.finish_checkpoint()
    return (time.perf_counter() - began) * 1000, value


def write(store: Store, per_submit: int) -> None:
    """One turn's worth of tasks, each submitted, leased and succeeded."""
    ids = [store.allocate_id() for _ in range(TURN)]
    submits = [ids[i : i + per_submit] for i in range(0, TURN, per_submit)]
    rows = [
        (i, "bench.noop", PAYLOAD, None, 3, "c-bench", batch[0], index, None)
        for batch in submits
        for index, i in enumerate(batch)
    ]
    store.insert_tasks(rows, 1.0)
    for batch in submits:
        store.remember_request("c-bench", batch[0], batch, 1.0)
    store.lease([(i, 1, "w1") for i in ids], 2.0)
    store.finish_many([(i, 1, "w1", RESULT) for i in ids], 3.0)


def run(
    path: Path, tasks: int, per_submit: int, synchronous: str
) -> tuple[list[float], list[float]]:
    """The turns that wrote the tasks, and those that pruned them, in ms."""
    store = Store(path, synchronous=synchronous)
    try:
        turns = range(0, tasks, TURN)
        writes = [timed_turn(store, lambda: write(store, per_submit))[0] for _ in turns]
        prunes: list[float] = []
        after: int | None = 0
        while after is not None:
            ms, (_, after) = timed_turn(
                store,
                functools.partial(store.prune, 10.0, FINAL_STATES, after, PRUNE_SCAN_ROWS),
            )
            prunes.append(ms)
        left = [store.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES]
        if any(left):
            raise SystemExit(f"left after the prune: {dict(zip(TABLES, left, strict=True))}")
        return writes, prunes
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    with workdir(args) as work:
        header(
            "prune: one PRUNE request's turn, against writing the same tasks",
            f"{args.tasks:,} finished tasks, {args.per_submit} to a SUBMIT, written {TURN:,} a "
            f"turn, pruned {PRUNE_SCAN_ROWS:,} looked at a turn; {args.repeat} run(s), in-process",
            [taskring_durability(args.synchronous)],
        )
        write_p50, prune_p50, prune_max, ratios = [], [], [], []
        for rep in range(args.repeat):
            db = work / f"prune-{rep}.db"
            writes, prunes = run(db, args.tasks, args.per_submit, args.synchronous)
            write_p50.append(median(writes))
            prune_p50.append(median(prunes))
            prune_max.append(max(prunes))
            # Per task: a prune turn looks at as many tasks as a write turn wrote.
            ratios.append(sum(prunes) / sum(writes))
        print()
        table(
            ["turn of 1,000 tasks", "p50 ms", "p99 ms (last run)", "p50 runs"],
            [
                (
                    "write: submit, lease, succeed",
                    f"{median(write_p50):.2f}",
                    "",
                    runs(write_p50, "{:.2f}"),
                ),
                (
                    "prune (PRUNE request)",
                    f"{median(prune_p50):.2f}",
                    f"{percentile(prunes, 99):.2f}",
                    runs(prune_p50, "{:.2f}"),
                ),
            ],
        )
        print(
            f"\n   a prune turn took at most {max(prune_max):.2f} ms; pruning cost "
            f"{median(ratios):.2f}x what writing the same tasks did (runs {runs(ratios, '{:.2f}')})"
        )


if __name__ == "__main__":
    main()
