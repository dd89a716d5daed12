"""The typer app: `taskring <command>`. Each command group lives in its own module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from taskring import __version__
from taskring.cli import check, demo, keys, prune, serve, show, tasks
from taskring.cli.common import Session, fail
from taskring.security import CurveClientConfig

app = typer.Typer(
    name="taskring",
    help="taskring: a durable task queue on ZeroMQ that survives kill -9.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

app.command()(serve.broker)
app.command()(serve.worker)
app.command()(tasks.submit)
app.command()(tasks.result)
app.command()(tasks.cancel)
app.command()(prune.prune)
app.command()(show.status)
app.command("tasks")(show.tasks)
app.command()(show.history)
app.command()(demo.demo)
app.command()(check.verify)
app.command()(check.chaos)
app.command()(keys.keygen)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"taskring {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    server_key: Annotated[
        Path | None,
        typer.Option(
            envvar="TASKRING_SERVER_KEY",
            help="The broker's public key file: connect with CURVE (needs --curve-secret).",
        ),
    ] = None,
    curve_secret: Annotated[
        Path | None,
        typer.Option(
            envvar="TASKRING_CURVE_SECRET",
            help="This client's secret key file (from `taskring keygen`).",
        ),
    ] = None,
) -> None:
    """taskring: a durable task queue on ZeroMQ that survives kill -9."""
    if (server_key is None) != (curve_secret is None):
        fail("--server-key and --curve-secret go together")
    if server_key is not None and curve_secret is not None:
        Session.curve = CurveClientConfig(str(server_key), str(curve_secret))


def main() -> None:
    """The `taskring` script and `python -m taskring`."""
    app(prog_name="taskring")
