"""`taskring keygen`: CURVE key pairs for the broker, workers and clients."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from taskring.cli.common import fail
from taskring.security import SecurityConfigError, generate_keypair


def keygen(
    name: Annotated[str, typer.Argument(help="Key name: writes NAME.key and NAME.key_secret.")],
    directory: Annotated[
        Path, typer.Option("--dir", help="Folder for the two files (created if missing).")
    ] = Path("."),
) -> None:
    """Write a CURVE key pair: NAME.key (public, to share) and NAME.key_secret (mode 0600)."""
    try:
        public, secret = generate_keypair(directory, name)
    except (SecurityConfigError, OSError) as e:
        fail(str(e))
    typer.echo(f"public key: {public}\nsecret key: {secret} (keep it private)")
