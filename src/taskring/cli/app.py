"""The typer app: `taskring <command>`. Each command group lives in its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from taskring import __version__
from taskring.cli import demo, serve, show, tasks

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
app.command()(show.status)
app.command("tasks")(show.tasks)
app.command()(show.history)
app.command()(demo.demo)


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
) -> None:
    """taskring: a durable task queue on ZeroMQ that survives kill -9."""


def main() -> None:
    """The `taskring` script and `python -m taskring`."""
    app(prog_name="taskring")
