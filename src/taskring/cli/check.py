"""`taskring verify` and `taskring chaos`: check a history, or make one under fire and check it."""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from taskring.cli.common import (
    ExitCode,
    LogLevel,
    LogLevelOption,
    Synchronous,
    fail,
    setup_logging,
)

ShowOption = Annotated[int, typer.Option(min=0, help="Violations to print at most.")]


def verify(
    db: Annotated[Path, typer.Option(help="The broker's SQLite task log.")],
    clients: Annotated[
        list[Path] | None,
        typer.Option(help="Client journal of acknowledged submits, or a folder of *.jsonl."),
    ] = None,
    workers: Annotated[
        list[Path] | None,
        typer.Option(help="Worker --journal file, or a folder of *.jsonl."),
    ] = None,
    starts: Annotated[
        list[Path] | None,
        typer.Option(help="Start log of the chaos tasks (where each attempt resumed)."),
    ] = None,
    drained: Annotated[
        bool,
        typer.Option(
            "--drained/--live",
            help="--drained: the run is over and its tasks had time to finish, so a task "
            "not final is a violation. --live (default): the broker may still run.",
        ),
    ] = False,
    show: ShowOption = 20,
) -> None:
    """Check a task log (and journals) for lost, duplicated and regressed work.

    Exit status: 0 if no invariant is violated, 1 if one is, 2 if an input
    cannot be read.
    """
    from taskring.verify import VerifyError, check, format_report

    try:
        report = check(db, clients or [], workers or [], start_logs=starts or [], drained=drained)
    except VerifyError as e:
        fail(str(e), ExitCode.USAGE)
    typer.echo(format_report(report, show))
    if not report.ok:
        raise typer.Exit(ExitCode.FAILED)


def chaos(
    seed: Annotated[
        int | None, typer.Option(help="Seed of the schedule and the clients [default: random].")
    ] = None,
    duration: Annotated[
        float, typer.Option(min=1.0, help="Seconds of faults; the drain comes after.")
    ] = 45.0,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Empty folder for the run's database, journals and logs [default: new]."
        ),
    ] = None,
    synchronous: Annotated[
        Synchronous, typer.Option(help="The broker's SQLite synchronous mode.")
    ] = Synchronous.full,
    show: ShowOption = 20,
    log_level: LogLevelOption = LogLevel.warning,
) -> None:
    """Run a broker, 3 workers and 2 clients under kill -9 and SIGTERM, then check the history.

    Prints the seed and schedule (stderr), then the checker's report. Exit
    status: 0 if clean, 1 on a violation or a misbehaving run, 2 on a usage
    error.
    """
    setup_logging(log_level)
    from taskring.chaos import ChaosConfig, ChaosError, format_result, run_chaos

    config = ChaosConfig(
        seed=secrets.randbelow(2**31) if seed is None else seed,
        duration_s=duration,
        synchronous=synchronous.value,
    )
    root = data_dir or Path(tempfile.mkdtemp(prefix="taskring-chaos-"))
    if root.exists() and not root.is_dir():
        fail(f"{root} is not a folder")
    if (root / "tasks.db").exists():
        fail(f"{root} already holds a chaos run; choose an empty folder")

    def announce(line: str) -> None:
        typer.echo(line, err=True)

    try:
        result = run_chaos(config, root, out=announce)
    except ChaosError as e:
        fail(str(e), ExitCode.FAILED)
    except OSError as e:
        fail(f"cannot run in {root}: {e}", ExitCode.USAGE)
    except KeyboardInterrupt:
        typer.echo("interrupted; every process was stopped", err=True)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    typer.echo(format_result(result, show))
    if not result.ok:
        raise typer.Exit(ExitCode.FAILED)
