"""`taskring broker` and `taskring worker`: the long-running processes.

Their modules are imported inside the commands, so `taskring submit` never
pays for (or depends on) the broker's storage or the worker's pools.
"""

from __future__ import annotations

import enum
import sqlite3
from pathlib import Path
from typing import Annotated

import typer
import zmq

from taskring.cli.common import (
    EndpointOption,
    ExitCode,
    LogLevel,
    LogLevelOption,
    fail,
    setup_logging,
)
from taskring.client import DEFAULT_ENDPOINT
from taskring.errors import TaskringError


class Synchronous(enum.StrEnum):
    full = "full"
    normal = "normal"


class Pool(enum.StrEnum):
    thread = "thread"
    process = "process"


def broker(
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
    db: Annotated[Path, typer.Option(help="SQLite task log (created if missing).")] = Path(
        "taskring.db"
    ),
    heartbeat: Annotated[
        float, typer.Option(min=0.01, help="Seconds between heartbeats to workers.")
    ] = 1.0,
    liveness: Annotated[
        int, typer.Option(min=1, help="Missed heartbeats before a worker counts as dead.")
    ] = 3,
    synchronous: Annotated[
        Synchronous,
        typer.Option(help="SQLite synchronous mode: full survives power loss, normal is faster."),
    ] = Synchronous.full,
    log_level: LogLevelOption = LogLevel.info,
) -> None:
    """Run the broker: the task log and the hash ring, until SIGTERM or Ctrl-C."""
    setup_logging(log_level)
    from taskring.broker import BrokerSettings, run_broker

    try:
        run_broker(
            BrokerSettings(
                endpoint=endpoint,
                db_path=str(db),
                heartbeat_s=heartbeat,
                liveness=liveness,
                synchronous=synchronous.value,
            )
        )
    except zmq.ZMQError as e:
        fail(f"cannot serve on {endpoint}: {e}")
    except (sqlite3.Error, OSError) as e:
        fail(f"cannot open the task log {str(db)!r}: {e}")
    except TaskringError as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.INTERRUPTED) from None


def worker(
    modules: Annotated[
        list[str], typer.Argument(help="Modules that register tasks with @task, e.g. myapp.tasks.")
    ],
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Tasks run at once.")
    ] = 4,
    pool: Annotated[
        Pool, typer.Option(help="thread, or process for tasks that hold the GIL.")
    ] = Pool.thread,
    name: Annotated[
        str | None, typer.Option(help="Worker name, its place on the ring [default: host-pid].")
    ] = None,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
    journal: Annotated[
        Path | None,
        typer.Option(help="Append every result and checkpoint the broker ACKs to this file."),
    ] = None,
    log_level: LogLevelOption = LogLevel.info,
) -> None:
    """Run a worker for the tasks in MODULES, until SIGTERM or Ctrl-C."""
    setup_logging(log_level)
    from taskring.workers import WorkerSettings, run_worker

    try:
        run_worker(
            WorkerSettings(
                endpoint=endpoint,
                modules=tuple(modules),
                concurrency=concurrency,
                pool=pool.value,
                name=name,
                journal=str(journal) if journal else None,
            )
        )
    except zmq.ZMQError as e:
        fail(f"cannot connect to {endpoint}: {e}")
    except TaskringError as e:  # WorkerConfigError is one: a module that will not import
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.INTERRUPTED) from None
