"""Where the CPU goes: one throughput run, and the CPU each process spent per task.

Starts a broker and W workers as throughput.py does, submits N no-op tasks
and waits for them, and reads each child's user and system time from
/proc/PID/stat before and after (this process's own time for the client).
On two cores every process competes with the others, so a microsecond saved
anywhere is throughput; this shows which process to look at first.

    python bench/cpu_split.py --tasks 20000
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import NOOP, THROUGHPUT_CONCURRENCY, THROUGHPUT_PREFETCH, Children, Taskring
from report import workdir

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system time of a process, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=THROUGHPUT_CONCURRENCY)
    parser.add_argument("--prefetch", type=int, default=THROUGHPUT_PREFETCH)
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    with workdir(args) as work, Children(work) as children:
        cluster = Taskring(children, synchronous=args.synchronous)
        cluster.start_broker(work / "cpu-split.db")
        cluster.start_workers(args.workers, args.concurrency, args.prefetch)
        cluster.wait_workers(args.workers)
        pids = {name: proc.pid for name, proc, _ in children.procs}
        with cluster.client() as client:
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            client_before = time.process_time()
            began = time.monotonic()
            ids = client.submit_many(NOOP, [(i,) for i in range(args.tasks)])
            client.wait(ids, timeout=600)
            elapsed = time.monotonic() - began
            spent = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
            spent["client (this process)"] = time.process_time() - client_before
    print(
        f"{args.tasks:,} tasks in {elapsed:.2f} s: {args.tasks / elapsed:,.0f} tasks/s "
        f"(--synchronous {args.synchronous}, {args.workers} workers x {args.concurrency}, "
        f"prefetch {args.prefetch})"
    )
    spent["all"] = sum(spent.values())
    for name, seconds in spent.items():
        per_task = seconds * 1e6 / args.tasks
        print(f"  {name:24s} {per_task:6.0f} us CPU per task  ({seconds / elapsed:.0%} of a core)")


if __name__ == "__main__":
    main()
