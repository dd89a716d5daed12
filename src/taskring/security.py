"""CurveZMQ keys and ZAP authentication: who may talk to the broker.

The broker holds a secret key and a folder of allowed public keys (one
`*.key` file per client or worker). libzmq encrypts and authenticates every
connection with CURVE and asks the ZAP handler (pyzmq's ThreadAuthenticator)
whether the peer's public key is allowed; a refused peer never gets a
message into the broker loop. The handler names each peer by its public key
(Z85), which the broker reads as the message property User-Id.

Key files use the ZeroMQ certificate format (zmq.auth), so keys made with
other ZeroMQ tools work too. Secret key files are created mode 0600.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from taskring.errors import TaskringError

# The ZAP domain the broker socket announces; the authenticator's CURVE
# configuration must name the same domain or every peer is refused.
ZAP_DOMAIN = "taskring"


class SecurityConfigError(TaskringError):
    """A key file or key folder that cannot be used, with a one-line reason."""


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def generate_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (mode 0600); never overwrite."""
    if not name or "/" in name or name.startswith("."):
        raise SecurityConfigError(f"key name {name!r} must be a plain file name")
    folder = Path(directory)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise SecurityConfigError(f"{path} exists; remove it first to make a new key")
    folder.mkdir(parents=True, exist_ok=True)
    with _private_umask():  # the secret file is never readable by others, not even briefly
        zmq.auth.create_certificates(folder, name)
    public.chmod(0o644)  # public keys are meant to be copied to the broker's allow folder
    return public, secret


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a secret key file."""
    public, secret = _load(path)
    if secret is None:
        raise SecurityConfigError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    return _load(path)[0]


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityConfigError(f"cannot read key file {path}: {e}") from e
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise SecurityConfigError(f"{path} does not hold a Z85 CURVE key")
    return public, secret


def allowed_keys(folder: str | os.PathLike[str]) -> dict[bytes, bool]:
    if not Path(folder).is_dir():
        raise SecurityConfigError(f"allowed-keys folder {folder} does not exist")
    try:
        return zmq.auth.load_certificates(folder)
    except (OSError, ValueError) as e:
        raise SecurityConfigError(f"cannot read allowed keys in {folder}: {e}") from e


@dataclasses.dataclass(frozen=True, slots=True)
class CurveServerConfig:
    """The broker side: its own secret key file and the folder of allowed public keys."""

    secret_file: str
    allow_dir: str


@dataclasses.dataclass(frozen=True, slots=True)
class CurveClientConfig:
    """A client or worker: the broker's public key and its own key pair."""

    server_public_file: str
    secret_file: str

    def keys(self) -> tuple[bytes, bytes, bytes]:
        """(server public, own public, own secret); SecurityConfigError if unusable."""
        public, secret = load_keypair(self.secret_file)
        return load_public_key(self.server_public_file), public, secret

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Set before connect: the keys are read when the connection starts."""
        socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = self.keys()


class CurveServer:
    """A CURVE server socket with a ZAP authenticator over an allow-list folder."""

    def __init__(self, context: zmq.Context[Any], config: CurveServerConfig) -> None:
        self.config = config
        self.public, self._secret = load_keypair(config.secret_file)
        allowed_keys(config.allow_dir)  # fail at start, with a clear line, if unusable
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self.reload()

    def reload(self) -> int:
        """Read the allow folder again (a removed file revokes that key); returns the count."""
        return len(self.allowed())

    def allowed(self) -> frozenset[str]:
        """Reload the allow folder into the authenticator; the allowed keys, Z85 text."""
        keys = allowed_keys(self.config.allow_dir)
        self._auth.configure_curve(domain=ZAP_DOMAIN, location=self.config.allow_dir)
        return frozenset(key.decode("ascii") for key in keys)

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Set before bind."""
        socket.zap_domain = ZAP_DOMAIN.encode()
        socket.curve_server = True
        socket.curve_publickey = self.public
        socket.curve_secretkey = self._secret

    def stop(self) -> None:
        """Before the context terminates: the authenticator holds a socket in it."""
        self._auth.stop()


def is_loopback(endpoint: str) -> bool:
    """True for ipc, inproc and tcp endpoints bound to a loopback address."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
