"""Profile the broker (or a worker) under the throughput workload with py-spy.

    python bench/profile_broker.py --tasks 20000 --out bench/profiles/broker-throughput

Starts a broker and 2 workers, attaches `py-spy record` to the broker for
the whole run, and writes the collapsed stacks (`.folded`, the input of any
flame graph tool) and a summary of the functions with the most samples, by
own time and by inclusive time (`.txt`). py-spy samples from outside the
process, so the broker runs at full speed while it is measured.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BENCH_DIR,
    NOOP,
    THROUGHPUT_CONCURRENCY,
    THROUGHPUT_PREFETCH,
    Children,
    Taskring,
)


def summarize(folded: Path, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"{total} samples"]
    for title, counter in (("own time", own), ("inclusive time", inclusive)):
        lines += ["", f"top {top} by {title}:"]
        for frame, samples in counter.most_common(top):
            lines.append(f"{100 * samples / total:6.1f}%  {frame}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=THROUGHPUT_CONCURRENCY)
    parser.add_argument("--prefetch", type=int, default=THROUGHPUT_PREFETCH)
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full")
    parser.add_argument("--process", choices=("broker", "worker"), default="broker")
    parser.add_argument("--out", default=None, help="default bench/profiles/PROCESS-throughput")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy is not installed (pip install py-spy)")
    out = Path(args.out) if args.out else BENCH_DIR / "profiles" / f"{args.process}-throughput"
    out.parent.mkdir(parents=True, exist_ok=True)
    folded = out.with_suffix(".folded")
    with tempfile.TemporaryDirectory() as tmp, Children(Path(tmp)) as children:
        cluster = Taskring(children, synchronous=args.synchronous)
        broker = cluster.start_broker(Path(tmp) / "tasks.db")
        workers = cluster.start_workers(2, args.concurrency, args.prefetch)
        cluster.wait_workers(2)
        target = broker if args.process == "broker" else workers[0]
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(target.pid), "--format", "raw", "--output",
             str(folded), "--rate", "1000", "--nonblocking", "--subprocesses"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(1.0)  # py-spy attaches
            with cluster.client() as client:
                began = time.perf_counter()
                ids = client.submit_many(NOOP, [(i,) for i in range(args.tasks)])
                client.wait(ids, timeout=300)
                elapsed = time.perf_counter() - began
        finally:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(30)
    report = f"{args.tasks} tasks in {elapsed:.2f} s: {args.tasks / elapsed:,.0f} tasks/s "
    report += f"(synchronous={args.synchronous})\n" + summarize(folded)
    out.with_suffix(".txt").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
