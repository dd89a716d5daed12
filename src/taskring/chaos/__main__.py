"""`python -m taskring.chaos client --name c1 --endpoint ... `: a chaos run's client process.

An internal entry point of the chaos runner (users run `taskring chaos`), so
it has a plain argparse command line and logs warnings to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from taskring.chaos.client import ClientPlan, main


def parse(argv: list[str]) -> ClientPlan:
    parser = argparse.ArgumentParser(prog="python -m taskring.chaos")
    commands = parser.add_subparsers(dest="command", required=True)
    client = commands.add_parser("client", help="submit tasks and journal the acknowledged ids")
    client.add_argument("--name", required=True)
    client.add_argument("--endpoint", required=True)
    client.add_argument("--journal", required=True)
    client.add_argument("--start-log", required=True)
    client.add_argument("--seed", type=int, required=True)
    client.add_argument("--duration-s", type=float, required=True)
    client.add_argument("--keys", type=int, default=16)
    client.add_argument("--timeout-s", type=float, default=20.0)
    ns = parser.parse_args(argv)
    fields = {k: v for k, v in vars(ns).items() if k != "command"}
    return ClientPlan(**fields)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    main(parse(sys.argv[1:]))
