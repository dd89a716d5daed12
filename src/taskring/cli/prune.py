"""`taskring prune`: delete finished tasks and their history, so the log stops growing."""

from __future__ import annotations

import enum
import math
import re
from typing import Annotated

import typer

from taskring import protocol
from taskring.cli.common import (
    EndpointOption,
    LogLevel,
    LogLevelOption,
    TimeoutOption,
    connect,
    fail,
    local_time,
    setup_logging,
)
from taskring.client import DEFAULT_ENDPOINT
from taskring.clock import wall_clock

UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION = r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*"


class FinalState(enum.StrEnum):
    succeeded = protocol.SUCCEEDED
    failed = protocol.FAILED
    dead = protocol.DEAD
    cancelled = protocol.CANCELLED


def parse_duration(text: str) -> float:
    """Seconds in "90m", "12h", "30d", "2w" or "3600s"; ValueError with the reason."""
    m = re.fullmatch(DURATION, text)
    seconds = float(m.group(1)) * UNIT_S[m.group(2)] if m else math.nan
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is not a duration: a number and a unit, s, m, h, d or w (30d)")
    return seconds


def prune(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="Delete tasks that ended longer ago than this: 30d, 12h, 90m (at least 1h).",
        ),
    ],
    states: Annotated[
        list[FinalState] | None,
        typer.Option(
            "--state", help="Only tasks in this final state; repeat for more [default: all four]."
        ),
    ] = None,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
    timeout: TimeoutOption = 10.0,
    log_level: LogLevelOption = LogLevel.error,
) -> None:
    """Delete finished tasks (succeeded, failed, dead, cancelled) and their history.

    Queued and running tasks are never touched. The broker looks at a
    thousand tasks a request, between its other work. Their ids become unknown,
    and their idempotency keys may be used again. The database file keeps
    its size; SQLite reuses the freed pages for new tasks.
    """
    setup_logging(log_level)
    try:
        age_s = parse_duration(older_than)
    except ValueError as e:
        fail(f"--older-than: {e}")
    if age_s < protocol.PRUNE_MIN_AGE_S:
        fail(
            "--older-than must be at least 1h: tasks that ended within the last hour are "
            "kept, as a client may still resend their SUBMIT"
        )
    before = wall_clock() - age_s
    with connect(endpoint, timeout) as client:
        deleted = client.prune(before, [str(s) for s in states] if states else None)
    which = ", ".join(sorted(str(s) for s in states)) if states else "finished"
    typer.echo(f"pruned {deleted:,} {which} tasks that ended before {local_time(before)}")
