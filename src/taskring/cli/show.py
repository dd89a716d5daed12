"""`taskring status`, `taskring tasks` and `taskring history`: look inside the broker."""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any

import typer

from taskring import protocol
from taskring.cli.common import (
    EndpointOption,
    LogLevel,
    LogLevelOption,
    TimeoutOption,
    age,
    connect,
    fail,
    local_time,
    setup_logging,
    shorten,
    table,
)
from taskring.client import DEFAULT_ENDPOINT, TaskInfo


class State(enum.StrEnum):
    """protocol.ALL_STATES, as typer choices."""

    queued = protocol.QUEUED
    running = protocol.RUNNING
    succeeded = protocol.SUCCEEDED
    failed = protocol.FAILED
    dead = protocol.DEAD
    cancelled = protocol.CANCELLED


def _attempts(info: TaskInfo) -> str:
    attempts = f"{info.attempt}/{info.max_attempts}"
    return f"{attempts} ({info.spared} not counted)" if info.spared else attempts


def render_status(status: dict[str, Any]) -> str:
    """The STATUS reply as text: broker facts, workers, queue depth by state."""
    broker = status.get("broker") or {}
    workers = status.get("workers") or []
    states = status.get("states") or {}
    lines = [
        f"broker {broker.get('endpoint', '?')}  version {broker.get('version', '?')}  "
        f"up {float(broker.get('uptime_s') or 0):.0f}s  db {broker.get('db', '?')}",
        "",
    ]
    if workers:
        rows = [
            [
                str(w.get("name")),
                f"{w.get('host', '')}:{w.get('pid', '')}",
                str(w.get("pool", "")),
                f"{w.get('load', 0)}/{w.get('capacity', 0)}",
                f"{100 * float(w.get('share') or 0):.1f}%",
                f"{float(w.get('last_seen_s') or 0):.1f}s",
                len(w.get("tasks") or []),
            ]
            for w in workers
        ]
        lines.append(table(["WORKER", "HOST:PID", "POOL", "LOAD", "RING", "SEEN", "NAMES"], rows))
    else:
        lines.append("no workers connected")
    lines.append("")
    counts = [[state, int(states.get(state) or 0)] for state in protocol.ALL_STATES]
    lines.append(table(["STATE", "TASKS"], counts))
    return "\n".join(lines)


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw status as JSON.")] = False,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
    timeout: TimeoutOption = 5.0,
    log_level: LogLevelOption = LogLevel.error,
) -> None:
    """Show workers (load/capacity, share of the ring) and tasks by state."""
    setup_logging(log_level)
    with connect(endpoint, timeout) as client:
        reply = client.broker_status()
    typer.echo(json.dumps(reply, indent=2, default=str) if as_json else render_status(reply))


def tasks(
    state: Annotated[State | None, typer.Option(help="Only tasks in this state.")] = None,
    name: Annotated[str | None, typer.Option(help="Only tasks with this name.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 50,
    before_id: Annotated[
        int | None, typer.Option(min=0, help="Only tasks older than this id (paging).")
    ] = None,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
    timeout: TimeoutOption = 5.0,
    log_level: LogLevelOption = LogLevel.error,
) -> None:
    """List tasks, newest first."""
    setup_logging(log_level)
    with connect(endpoint, timeout) as client:
        found = client.list_tasks(  # the table shows no results: leave them on the broker
            state=state.value if state else None,
            name=name,
            limit=limit,
            before_id=before_id,
            results=False,
        )
    if not found:
        typer.echo("no tasks")
        return
    rows = [
        [
            t.id,
            t.name,
            t.state,
            _attempts(t),
            t.worker or "",
            t.key or "",
            age(t.updated_at),
            shorten(t.error, 50),
        ]
        for t in found
    ]
    typer.echo(table(["ID", "NAME", "STATE", "ATTEMPT", "WORKER", "KEY", "UPDATED", "ERROR"], rows))


def history(
    task_id: Annotated[int, typer.Argument(min=0, help="Task id.")],
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
    timeout: TimeoutOption = 5.0,
    log_level: LogLevelOption = LogLevel.error,
) -> None:
    """Show a task's log: submitted, leased, checkpointed, retried, finished."""
    setup_logging(log_level)
    with connect(endpoint, timeout) as client:
        info, events = client.history(task_id)
    if info is None and not events:
        fail(f"no task with id {task_id}")
    if info is not None:
        typer.echo(
            f"task {info.id} {info.name}: {info.state}, attempt {_attempts(info)}, "
            f"worker {info.worker or '-'}, key {info.key or '-'}"
        )
        if info.error:
            typer.echo(f"error: {shorten(info.error, 200)}")
    rows = [
        [
            local_time(float(e.get("at") or 0)),
            str(e.get("kind", "")),
            e.get("attempt", ""),
            e.get("worker") or "",
            shorten(e.get("detail"), 60),
        ]
        for e in events
    ]
    typer.echo(table(["AT", "EVENT", "ATTEMPT", "WORKER", "DETAIL"], rows))
