"""A client in its own process, so a test can kill the broker while it submits.

    python submitter.py ENDPOINT OUT COUNT [--window W] [--timeout S]

Submits crash_tasks.square(i) for i in 0..COUNT-1, W tasks per submit_many
call (one SUBMIT each, up to W in flight), and appends to OUT, one flushed
line each:

    call <first i> <how many>     before the call
    ok <i> <id>                   each acknowledged task
    unavailable <message>         the client gave up (exit code 3)
    done                          all COUNT acknowledged
"""

from __future__ import annotations

import argparse
import sys

from taskring.client import Client
from taskring.errors import BrokerUnavailable


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("out")
    parser.add_argument("count", type=int)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    with (
        open(args.out, "a", buffering=1) as out,
        Client(args.endpoint, timeout_s=args.timeout) as c,
    ):
        for first in range(0, args.count, args.window):
            chunk = list(range(first, min(first + args.window, args.count)))
            out.write(f"call {first} {len(chunk)}\n")
            try:
                ids = c.submit_many("crash_tasks.square", [(i,) for i in chunk], batch=1,
                                    window=args.window)  # fmt: skip
            except BrokerUnavailable as e:
                out.write(f"unavailable {e}\n")
                return 3
            out.write("".join(f"ok {i} {task_id}\n" for i, task_id in zip(chunk, ids, strict=True)))
        out.write("done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
