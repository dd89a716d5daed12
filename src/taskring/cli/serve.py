"""`taskring broker` and `taskring worker`: the long-running processes.

Their modules are imported inside the commands, so `taskring submit` never
pays for (or depends on) the broker's storage or the worker's pools.
"""

from __future__ import annotations

import dataclasses
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
    Session,
    Synchronous,
    fail,
    setup_logging,
)
from taskring.client import DEFAULT_ENDPOINT
from taskring.errors import TaskringError
from taskring.protocol import DEFAULT_LIMITS, message_room_needed
from taskring.security import CurveClientConfig, CurveServerConfig


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
    curve_secret: Annotated[
        Path | None,
        typer.Option(help="The broker's secret key file: require CURVE (with --allow-keys)."),
    ] = None,
    allow_keys: Annotated[
        Path | None,
        typer.Option(help="Folder of allowed public keys (*.key); SIGHUP rereads it."),
    ] = None,
    max_message_bytes: Annotated[
        int, typer.Option(min=1024, help="Largest message, all frames together.")
    ] = DEFAULT_LIMITS.max_message_bytes,
    max_payload_bytes: Annotated[
        int, typer.Option(min=16, help="Largest packed arguments of one task.")
    ] = DEFAULT_LIMITS.max_payload_bytes,
    max_result_bytes: Annotated[
        int, typer.Option(min=16, help="Largest packed result of one task.")
    ] = DEFAULT_LIMITS.max_result_bytes,
    max_checkpoint_bytes: Annotated[
        int, typer.Option(min=16, help="Largest packed checkpoint state.")
    ] = DEFAULT_LIMITS.max_checkpoint_bytes,
    log_level: LogLevelOption = LogLevel.info,
) -> None:
    """Run the broker: the task log and the hash ring, until SIGTERM or Ctrl-C."""
    setup_logging(log_level)
    from taskring.broker import BrokerSettings, run_broker

    if (curve_secret is None) != (allow_keys is None):
        fail("--curve-secret and --allow-keys go together")
    curve = None
    if curve_secret is not None and allow_keys is not None:
        curve = CurveServerConfig(str(curve_secret), str(allow_keys))
    limits = dataclasses.replace(
        DEFAULT_LIMITS,
        max_message_bytes=max_message_bytes,
        max_payload_bytes=max_payload_bytes,
        max_result_bytes=max_result_bytes,
        max_checkpoint_bytes=max_checkpoint_bytes,
    )
    if (room := message_room_needed(limits)) > max_message_bytes:
        # Else a task within every other limit could never travel: its SUBMIT,
        # TASK or RESULT alone would be over the message limit.
        fail(
            f"--max-message-bytes {max_message_bytes} cannot carry one task at the other "
            f"limits; it needs at least {room}, or lower --max-payload-bytes, "
            "--max-checkpoint-bytes or --max-result-bytes"
        )
    try:
        run_broker(
            BrokerSettings(
                endpoint=endpoint,
                db_path=str(db),
                heartbeat_s=heartbeat,
                liveness=liveness,
                synchronous=synchronous.value,
                limits=limits,
                curve=curve,
            )
        )
    except zmq.ZMQError as e:
        fail(f"cannot serve on {endpoint}: {e}")
    except sqlite3.NotSupportedError as e:
        fail(str(e))  # this Python's SQLite is at fault, not the file
    except (sqlite3.Error, OSError) as e:
        fail(f"task log {str(db)!r}: {e}")
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
    prefetch: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Tasks held waiting beyond those running, so a free slot need not wait "
            "for the broker; 0 for long tasks, which then go to whichever worker frees "
            "a slot first. [default: as many as --concurrency]",
            show_default=False,
        ),
    ] = None,
    pool: Annotated[
        Pool, typer.Option(help="thread, or process for tasks that hold the GIL.")
    ] = Pool.thread,
    name: Annotated[
        str | None,
        typer.Option(help="Worker name, its place on the ring [default: host-pid-random]."),
    ] = None,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
    journal: Annotated[
        Path | None,
        typer.Option(help="Append every result and checkpoint the broker ACKs to this file."),
    ] = None,
    drain_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="On SIGTERM, seconds the running tasks get to finish; the broker re-runs "
            "the ones that do not.",
        ),
    ] = 30.0,
    flush_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="Then seconds to get their results ACKed, and the unstarted tasks handed "
            "back (also to a broker that is away when the worker stops).",
        ),
    ] = 5.0,
    server_key: Annotated[
        Path | None,
        typer.Option(
            envvar="TASKRING_SERVER_KEY",
            help="The broker's public key file: connect with CURVE (with --curve-secret).",
        ),
    ] = None,
    curve_secret: Annotated[
        Path | None,
        typer.Option(envvar="TASKRING_CURVE_SECRET", help="This worker's secret key file."),
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
                prefetch=prefetch,
                pool=pool.value,
                name=name,
                journal=str(journal) if journal else None,
                drain_timeout_s=drain_timeout,
                flush_timeout_s=flush_timeout,
                curve=_client_curve(server_key, curve_secret),
            )
        )
    except zmq.ZMQError as e:
        fail(f"cannot connect to {endpoint}: {e}")
    except TaskringError as e:  # WorkerConfigError is one: a module that will not import
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.INTERRUPTED) from None


def _client_curve(server_key: Path | None, curve_secret: Path | None) -> CurveClientConfig | None:
    """The worker's own options, else the ones given before the command name."""
    if (server_key is None) != (curve_secret is None):
        fail("--server-key and --curve-secret go together")
    if server_key is not None and curve_secret is not None:
        CurveClientConfig(str(server_key), str(curve_secret)).keys()  # fail now, in one line
        return CurveClientConfig(str(server_key), str(curve_secret))
    return Session.curve
