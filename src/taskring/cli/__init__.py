"""The `taskring` command line (typer)."""

from taskring.cli.app import app, main

__all__ = ["app", "main"]
