"""Run every benchmark, each with its defaults (or small --quick sizes), then one summary table.

    python bench/run_all.py              # full sizes: tens of minutes on 2 cores
    python bench/run_all.py --quick      # small sizes, 1 run each: checks that everything works
    python bench/run_all.py --only throughput,latency --repeat 5

Each benchmark prints its own report as it goes; the summary repeats every
goal with its measured value. The exit code is 1 if a benchmark could not
run; a missed goal is reported, not an error.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import checkpoints
import deep_queue
import latency
import startup
import throughput
from report import Goal, machine, table

BENCHMARKS = {
    "throughput": (throughput.main, ["--tasks", "2000"]),
    "latency": (latency.main, ["--tasks", "300"]),
    "deep_queue": (
        deep_queue.main,
        ["--depths", "2000,20000", "--measure", "2000", "--warmup", "500"],
    ),
    "checkpoints": (checkpoints.main, ["--checkpoints", "1000"]),
    "startup": (startup.main, ["--tasks", "50000", "--running", "1000"]),
}  # name -> (main, its --quick arguments)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and one run each")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help="benchmarks to run, comma-separated"
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per benchmark (default 3; 1 with --quick)"
    )
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full")
    args = parser.parse_args(argv)
    names = args.only.split(",")
    unknown = sorted(set(names) - BENCHMARKS.keys())
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    goals: list[Goal] = []
    failed: list[str] = []
    started = time.monotonic()
    for name in names:
        run, quick = BENCHMARKS[name]
        extra = [
            *(quick if args.quick else []),
            "--repeat",
            str(repeat),
            "--synchronous",
            args.synchronous,
        ]
        try:
            goals.extend(run(extra))
        except Exception as e:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            failed.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        print(flush=True)
    print(f"== summary{' (--quick sizes: not comparable with the goals)' if args.quick else ''}")
    print(f"   {machine()}, {time.monotonic() - started:.0f} s in all")
    table(
        ["benchmark", "goal", "measured", "met"],
        [
            (g.bench, g.what, g.measured, "n/a" if g.met is None else ("yes" if g.met else "NO"))
            for g in goals
        ],
    )
    for line in failed:
        print(f"   FAILED {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
