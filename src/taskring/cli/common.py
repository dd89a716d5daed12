"""What every command shares: exit codes, option types, error lines, logging, tables."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, NoReturn

import typer

from taskring.client import Client
from taskring.clock import wall_clock
from taskring.errors import (
    BrokerUnavailable,
    RequestRejected,
    ResultTimeout,
    TaskNotFound,
    TaskringError,
)
from taskring.security import CurveClientConfig


class ExitCode(enum.IntEnum):
    """Every exit status the CLI uses, in one place."""

    OK = 0
    FAILED = 1  # a task failed or dead, a cancel missed, or the demo could not finish
    USAGE = 2  # a mistake on the command line or in the request
    UNAVAILABLE = 3  # the broker did not answer in time
    NOT_FINISHED = 4  # the task is not final (--no-wait, or --wait-timeout passed)
    INTERRUPTED = 130  # Ctrl-C


class Synchronous(enum.StrEnum):
    """The broker's SQLite synchronous mode (broker/store.py)."""

    full = "full"
    normal = "normal"


class LogLevel(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


EndpointOption = Annotated[
    str,
    typer.Option(
        "--endpoint",
        "-e",
        envvar="TASKRING_ENDPOINT",
        help="Broker endpoint, a ZeroMQ address.",
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", min=0.01, help="Seconds to wait for the broker to answer."),
]
LogLevelOption = Annotated[
    LogLevel,
    typer.Option(envvar="TASKRING_LOG_LEVEL", case_sensitive=False, help="Logging level."),
]


def setup_logging(level: LogLevel) -> None:
    logging.basicConfig(
        level=level.value.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> NoReturn:
    """One line on stderr, then exit: what every user mistake ends in."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def client_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one line and an exit code."""
    try:
        yield
    except BrokerUnavailable as e:
        fail(f"{e} (is `taskring broker` running?)", ExitCode.UNAVAILABLE)
    except RequestRejected as e:
        fail(e.message, ExitCode.USAGE)
    except TaskNotFound as e:
        fail(str(e), ExitCode.USAGE)
    except ResultTimeout as e:
        fail(str(e), ExitCode.NOT_FINISHED)
    except TaskringError as e:
        fail(str(e), ExitCode.USAGE)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(ExitCode.INTERRUPTED) from None


class Session:
    """Options given before the command (`taskring --server-key K ... submit`)."""

    curve: CurveClientConfig | None = None


@contextlib.contextmanager
def connect(endpoint: str, timeout_s: float) -> Iterator[Client]:
    """A Client whose errors end the command with one line."""
    with client_errors(), Client(endpoint, timeout_s=timeout_s, curve=Session.curve) as client:
        yield client


def to_json(value: Any) -> str:
    """JSON for a task value; bytes (which JSON lacks) become text."""

    def default(obj: Any) -> Any:
        if isinstance(obj, bytes):
            return obj.decode("utf-8", "backslashreplace")
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    return json.dumps(value, default=default, ensure_ascii=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: columns padded to width, numbers right-aligned."""
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    numeric = [
        bool(rows) and all(isinstance(row[i], int | float) for row in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        padded = (
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


def local_time(unix_s: float) -> str:
    millis = int(unix_s * 1000) % 1000
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_s)) + f".{millis:03d}"


def age(unix_s: float) -> str:
    """How long ago, coarse: 4s, 12m, 3h, 2d."""
    seconds = max(0.0, wall_clock() - unix_s)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def shorten(text: str | None, width: int) -> str:
    if not text:
        return ""
    # A worker's error starts with "Type: message"; the traceback follows.
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= width else first[: width - 3] + "..."
