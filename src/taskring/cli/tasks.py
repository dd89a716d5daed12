"""`taskring submit`, `result` and `cancel`: push a task, read what it returned, call it off."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from taskring import protocol
from taskring.cli.common import (
    EndpointOption,
    ExitCode,
    LogLevel,
    LogLevelOption,
    TimeoutOption,
    connect,
    fail,
    setup_logging,
    to_json,
)
from taskring.client import DEFAULT_ENDPOINT, Client, TaskInfo
from taskring.errors import TaskFailed

WaitTimeoutOption = Annotated[
    float | None,
    typer.Option(
        min=0, help="With --wait: seconds to wait for the task to finish [default: no limit]."
    ),
]


def parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        fail(f"argument '{text}' is not JSON (quote strings: '\"{text}\"')")


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        fail(f"--kwargs is not JSON: {e}")
    if not isinstance(value, dict):
        fail("--kwargs must be a JSON object, like '{\"size\": 3}'")
    return value


def _print_outcome(client: Client, task_id: int, wait_timeout: float | None) -> None:
    """Wait for the task; print its value as JSON, or its error and exit 1."""
    try:
        value = client.result(task_id, wait_timeout)
    except TaskFailed as e:
        fail(str(e), ExitCode.FAILED)
    typer.echo(to_json(value))


def submit(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="Task name as a worker registered it.")
    ],
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ARGS",
            help="Positional arguments, each JSON: 1  2.5  '\"text\"'  '[1, 2]'. "
            "Negative numbers: put the options first, then -- and the arguments.",
        ),
    ] = None,
    kwargs: Annotated[
        str | None, typer.Option("--kwargs", help="Keyword arguments as a JSON object.")
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="Routing key: equal keys go to the same worker.")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting the same key again returns the same task.")
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(min=1, max=1000, help="Attempts before the task is dead-lettered."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait and print the result as JSON.")
    ] = False,
    wait_timeout: WaitTimeoutOption = None,
    queue_unknown: Annotated[
        bool,
        typer.Option(
            "--queue-unknown",
            help="Queue a name no worker has registered yet, instead of refusing it.",
        ),
    ] = False,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
    timeout: TimeoutOption = 10.0,
    log_level: LogLevelOption = LogLevel.error,
) -> None:
    """Submit a task and print its id (or, with --wait, its result)."""
    setup_logging(log_level)
    values = [parse_arg(a) for a in args or []]
    keywords = parse_kwargs(kwargs)
    with connect(endpoint, timeout) as client:
        try:
            handle = client.submit(
                name,
                *values,
                kwargs=keywords,
                key=key,
                idempotency_key=idempotency_key,
                max_attempts=max_attempts,
                strict=not queue_unknown,
            )
        except (TypeError, ValueError) as e:
            fail(str(e))
        if handle.unknown_name:
            known = ", ".join(handle.known_names) or "none"
            typer.echo(
                f"warning: no worker has registered task {name!r} yet; it stays queued "
                f"until one does (known tasks: {known})",
                err=True,
            )
        if not wait:
            typer.echo(handle.id)
            return
        _print_outcome(client, handle.id, wait_timeout)


def result(
    task_id: Annotated[int, typer.Argument(min=0, help="Task id, as submit printed it.")],
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait for an unfinished task to finish.")
    ] = True,
    wait_timeout: WaitTimeoutOption = None,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
    timeout: TimeoutOption = 10.0,
    log_level: LogLevelOption = LogLevel.error,
) -> None:
    """Print a task's result as JSON; exit 1 if it failed (its error goes to stderr)."""
    setup_logging(log_level)
    with connect(endpoint, timeout) as client:
        if wait:
            _print_outcome(client, task_id, wait_timeout)
            return
        info: TaskInfo = client.status(task_id)
        if not info.done:
            fail(f"task {task_id} is {info.state}, not finished", ExitCode.NOT_FINISHED)
        if not info.ok:
            fail(str(TaskFailed(info.id, info.state, info.error)), ExitCode.FAILED)
        typer.echo(to_json(info.value))


def cancel(
    task_ids: Annotated[
        list[int], typer.Argument(min=0, metavar="ID", help="Task ids, as submit printed them.")
    ],
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
    timeout: TimeoutOption = 10.0,
    log_level: LogLevelOption = LogLevel.error,
) -> None:
    """Cancel queued or running tasks; exit 1 if any had already ended or does not exist.

    A running task sees ctx.lease_lost within a heartbeat, and its result is
    not applied.
    """
    setup_logging(log_level)
    with connect(endpoint, timeout) as client:
        states = client.cancel(task_ids)
    missed = 0
    for task_id, state in states.items():
        if state == protocol.CANCELLED:
            typer.echo(f"task {task_id}: cancelled")
            continue
        missed += 1
        why = "no such task" if state is None else f"already {state}, left as it is"
        typer.echo(f"task {task_id}: {why}", err=True)
    if missed:
        raise typer.Exit(ExitCode.FAILED)
