"""CurveZMQ at the socket level: who gets a message through to a CURVE server."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from taskring.security import (
    CurveClientConfig,
    CurveServer,
    CurveServerConfig,
    SecurityConfigError,
    generate_keypair,
    is_loopback,
)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    generate_keypair(tmp_path / "broker", "broker")
    for name in ("alice", "mallory"):
        generate_keypair(tmp_path / "own", name)
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "alice.key").write_bytes((tmp_path / "own" / "alice.key").read_bytes())
    return tmp_path


OPEN: list[zmq.Socket[Any]] = []


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    while OPEN:
        OPEN.pop().close(linger=0)
    context.destroy(linger=0)


@pytest.fixture
def server(ctx, keys) -> Iterator[tuple[zmq.Socket[Any], CurveServer, str]]:
    curve = CurveServer(
        ctx, CurveServerConfig(str(keys / "broker/broker.key_secret"), str(keys / "allow"))
    )
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    curve.apply(router)
    router.bind("tcp://127.0.0.1:*")
    yield router, curve, router.getsockopt_string(zmq.LAST_ENDPOINT)
    router.close(linger=0)
    curve.stop()  # before the context ends, or destroy hangs on the ZAP socket


def dealer(ctx, endpoint: str, keys: Path, name: str | None, server_key: str = "broker") -> Any:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    OPEN.append(sock)
    if name is not None:
        CurveClientConfig(
            str(keys / f"broker/{server_key}.key"), str(keys / f"own/{name}.key_secret")
        ).apply(sock)
    sock.connect(endpoint)
    sock.send(b"hello")
    return sock


def received(router: zmq.Socket[Any], timeout_ms: int = 700) -> list[Any]:
    got = []
    while router.poll(timeout_ms):
        got.append(router.recv_multipart(copy=False))
        timeout_ms = 50
    return got


def test_keygen_writes_an_owner_only_secret_and_refuses_to_overwrite(tmp_path):
    public, secret = generate_keypair(tmp_path, "w1")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert b"secret-key" not in public.read_bytes()
    with pytest.raises(SecurityConfigError, match="exists"):
        generate_keypair(tmp_path, "w1")


def test_an_allowed_peer_gets_through_and_is_named_by_its_key(ctx, keys, server):
    router, _, endpoint = server
    dealer(ctx, endpoint, keys, "alice")
    (message,) = received(router)
    alice_public = (keys / "own/alice.key").read_text().split('public-key = "')[1][:40]
    assert message[1].bytes == b"hello"
    assert message[1].get("User-Id") == alice_public


@pytest.mark.parametrize("who", ["mallory", "plaintext"])
def test_unknown_keys_and_plaintext_peers_are_refused(ctx, keys, server, who):
    router, _, endpoint = server
    dealer(ctx, endpoint, keys, None if who == "plaintext" else who)
    assert received(router) == []


def test_a_peer_expecting_another_server_key_is_refused(ctx, keys, server):
    router, _, endpoint = server
    generate_keypair(keys / "broker", "impostor")
    dealer(ctx, endpoint, keys, "alice", server_key="impostor")
    assert received(router) == []


def test_removing_a_key_file_and_reloading_revokes_new_connections(ctx, keys, server):
    router, curve, endpoint = server
    (keys / "allow/alice.key").unlink()
    assert curve.reload() == 0
    dealer(ctx, endpoint, keys, "alice")
    assert received(router) == []


def test_unusable_key_files_fail_with_one_line(tmp_path, ctx):
    with pytest.raises(SecurityConfigError, match="cannot read key file"):
        CurveServer(ctx, CurveServerConfig(str(tmp_path / "nope"), str(tmp_path)))


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/x", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://10.1.2.3:5555", False),
    ],
)
def test_loopback_endpoints_are_recognised(endpoint, loopback):
    assert is_loopback(endpoint) is loopback
