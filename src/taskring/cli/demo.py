"""`taskring demo`: see the whole system work on this machine in a few seconds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from taskring.cli.common import (
    ExitCode,
    LogLevel,
    LogLevelOption,
    client_errors,
    fail,
    setup_logging,
)


def demo(
    tasks: Annotated[int, typer.Option(min=1, help="How many tasks to run.")] = 3000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="How many workers to start.")] = 2,
    data_dir: Annotated[
        Path, typer.Option("--dir", help="Folder for the demo's database and logs.")
    ] = Path("demo-data"),
    wait_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for all results.")
    ] = 300.0,
    log_level: LogLevelOption = LogLevel.warning,
) -> None:
    """Start a broker and workers, run tasks through them, print a summary, stop them."""
    setup_logging(log_level)
    from taskring.demo import DemoError, run_demo

    def announce(line: str) -> None:
        typer.echo(line, err=True)

    with client_errors():
        try:
            summary = run_demo(
                tasks=tasks,
                workers=workers,
                data_dir=data_dir,
                result_timeout_s=wait_timeout,
                progress=sys.stderr,
                announce=announce,
            )
        except (DemoError, OSError) as e:
            fail(str(e), ExitCode.FAILED)
    typer.echo(summary.render())
    if not summary.ok:
        raise typer.Exit(ExitCode.FAILED)
