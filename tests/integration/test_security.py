"""CURVE end to end with real processes, and the broker's own safety rules."""

from __future__ import annotations

import logging
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from cluster import Cluster, wait_for
from taskring import protocol as p
from taskring.broker import Broker, BrokerSettings
from taskring.client import Client
from taskring.errors import BrokerUnavailable, RequestRejected
from taskring.security import (
    CurveClientConfig,
    CurveServerConfig,
    generate_keypair,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A broker key, allowed keys for app and w1, and an unknown key for mallory."""
    for name in ("broker", "app", "w1", "mallory"):
        generate_keypair(tmp_path / "keys", name)
    allow = tmp_path / "allow"
    allow.mkdir()
    for name in ("app", "w1"):
        (allow / f"{name}.key").write_bytes((tmp_path / "keys" / f"{name}.key").read_bytes())
    return tmp_path


def curve_for(keys: Path, name: str, server: str = "broker") -> CurveClientConfig:
    return CurveClientConfig(
        str(keys / f"keys/{server}.key"), str(keys / f"keys/{name}.key_secret")
    )


def start_secure(cluster: Cluster, keys: Path) -> None:
    cluster.curve = curve_for(keys, "app")
    cluster.start_broker(
        "--curve-secret", str(keys / "keys/broker.key_secret"), "--allow-keys", str(keys / "allow")
    )


def worker_keys(keys: Path, name: str = "w1") -> list[str]:
    return [
        "--server-key", str(keys / "keys/broker.key"),
        "--curve-secret", str(keys / f"keys/{name}.key_secret"),
    ]  # fmt: skip


def test_allowed_client_and_worker_work_end_to_end(cluster: Cluster, keys: Path) -> None:
    # Given a broker that requires CURVE, and a worker and client with allowed keys
    start_secure(cluster, keys)
    cluster.start_worker("w1", *worker_keys(keys))
    cluster.wait_workers("w1")
    # When the client submits
    with cluster.client() as client:
        handle = client.submit("tt_tasks.add", 2, 3)
        # Then the task runs, and the broker recorded which key submitted it
        assert handle.result(timeout=20) == 5
        info = client.status(handle.id)
    assert info.worker == "w1"
    # And any other allowed client may read it (the documented policy: keys separate the
    # trusted from the untrusted, not one client from another)
    generate_keypair(keys / "keys", "other")
    (keys / "allow/other.key").write_bytes((keys / "keys/other.key").read_bytes())
    assert cluster.broker is not None
    cluster.signal(cluster.broker, signal.SIGHUP)
    wait_for(lambda: "allowed keys reloaded" in cluster.logs(), 10, "the broker to reload keys")
    with Client(cluster.endpoint, timeout_s=5, curve=curve_for(keys, "other")) as other:
        assert other.result(handle.id, timeout=5) == 5
    app_key = (keys / "keys/app.key").read_text().split('public-key = "')[1][:40]
    rows = _query(cluster, "SELECT client FROM tasks WHERE id = ?", handle.id)
    assert rows[0][0].startswith(app_key + "/")


def test_only_the_key_that_submitted_a_task_may_cancel_it(cluster: Cluster, keys: Path) -> None:
    # Given two queued tasks submitted by app, and another allowed key
    start_secure(cluster, keys)
    generate_keypair(keys / "keys", "other")
    (keys / "allow/other.key").write_bytes((keys / "keys/other.key").read_bytes())
    assert cluster.broker is not None
    cluster.signal(cluster.broker, signal.SIGHUP)
    wait_for(lambda: "allowed keys reloaded" in cluster.logs(), 10, "the broker to reload keys")
    with cluster.client() as app:
        first, second = (app.submit("tt_tasks.add", i, i).id for i in (1, 2))
        # When the other key tries to cancel both
        with (
            Client(cluster.endpoint, timeout_s=5, curve=curve_for(keys, "other")) as other,
            pytest.raises(RequestRejected, match="submitted by another key"),
        ):
            other.cancel([second, first])
        # Then nothing changed, and the submitting key may cancel them
        assert [app.status(i).state for i in (first, second)] == ["queued", "queued"]
        assert app.cancel([first, second]) == {first: "cancelled", second: "cancelled"}


def test_with_curve_a_key_prunes_only_the_tasks_it_submitted(cluster: Cluster, keys: Path) -> None:
    # Given tasks that two allowed keys submitted and cancelled: two of app's, one of other's
    generate_keypair(keys / "keys", "other")
    (keys / "allow/other.key").write_bytes((keys / "keys/other.key").read_bytes())
    start_secure(cluster, keys)
    other_curve = curve_for(keys, "other")
    with cluster.client() as app, Client(cluster.endpoint, timeout_s=5, curve=other_curve) as other:
        mine = [app.submit("tt_tasks.add", i, i).id for i in (1, 2)]
        (theirs,) = [other.submit("tt_tasks.add", 3, 3).id]
        app.cancel(mine)
        other.cancel([theirs])
    # And the log two hours on: stopped, every task's last change moved back, served again
    assert cluster.broker is not None
    cluster.stop(cluster.broker)
    with sqlite3.connect(cluster.db) as conn:
        conn.execute("UPDATE tasks SET updated_at = updated_at - 7200")
    conn.close()
    start_secure(cluster, keys)
    before = time.time() - 3600
    with cluster.client() as app, Client(cluster.endpoint, timeout_s=5, curve=other_curve) as other:
        # When the other key prunes, Then only its own task goes
        assert other.prune(before) == 1
        assert [app.status(i).state for i in mine] == ["cancelled", "cancelled"]
        # And app's prune takes app's two
        assert app.prune(before) == 2
        assert app.broker_status()["states"] == {}


@pytest.mark.parametrize("who", ["unknown key", "plaintext", "wrong server key"])
def test_refused_peers_reach_nothing(cluster: Cluster, keys: Path, who: str) -> None:
    start_secure(cluster, keys)
    generate_keypair(keys / "keys", "impostor")
    curve = {
        "unknown key": curve_for(keys, "mallory"),
        "plaintext": None,
        "wrong server key": curve_for(keys, "app", server="impostor"),
    }[who]
    # When a refused peer submits
    with (
        Client(cluster.endpoint, timeout_s=1.0, curve=curve) as intruder,
        pytest.raises(BrokerUnavailable),
    ):
        intruder.submit("tt_tasks.add", 1, 1)
    # Then none of its messages reached the broker loop: no task, no rejection counted
    status = cluster.status()
    assert status is not None
    assert status["states"] == {}
    assert status["broker"]["rejected"] == {}


def test_revoking_a_worker_key_with_sighup(cluster: Cluster, keys: Path) -> None:
    # Given a registered worker
    start_secure(cluster, keys)
    cluster.start_worker("w1", *worker_keys(keys))
    cluster.wait_workers("w1")
    # When its key file is removed and the broker is told to reload
    (keys / "allow/w1.key").unlink()
    assert cluster.broker is not None
    cluster.signal(cluster.broker, signal.SIGHUP)
    # Then its messages are dropped: the broker declares it dead
    wait_for(
        lambda: (s := cluster.status()) is not None and s["workers"] == [],
        10,
        "the revoked worker to be dropped",
    )
    # And work submitted now is not run by it
    with cluster.client() as client:
        handle = client.submit("tt_tasks.add", 1, 1)
        assert client.wait([handle.id], timeout=1.5)[handle.id].state == "queued"


def test_a_worker_name_belongs_to_the_key_that_registered_it(tmp_path: Path, keys: Path) -> None:
    # Given an in-process broker with CURVE and a task leased to w1 (key w1)
    ctx: zmq.Context[Any] = zmq.Context()
    settings = BrokerSettings(
        endpoint="tcp://127.0.0.1:*",
        db_path=str(tmp_path / "t.db"),
        synchronous="normal",
        curve=CurveServerConfig(str(keys / "keys/broker.key_secret"), str(keys / "allow")),
    )
    broker = Broker(settings, context=ctx)
    sockets = []

    def peer(name: bytes, key: str) -> zmq.Socket[Any]:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.IDENTITY, name)
        curve_for(keys, key).apply(sock)
        sock.connect(broker.endpoint)
        sockets.append(sock)
        return sock

    def recv(sock: zmq.Socket[Any]) -> tuple[bytes, dict[str, Any]]:
        for _ in range(200):
            broker.poll_once(timeout_s=0.01)
            if sock.poll(0):
                frames = sock.recv_multipart()
                return frames[1], p.unpack(frames[2])
        raise AssertionError("no answer from the broker")

    try:
        w1 = peer(b"w1", "w1")
        w1.send_multipart(p.frames(p.PROTOCOL_WORKER, p.READY, {
            "seq": 1, "capacity": 1, "tasks": {"t.add": 3}, "held": [], "incarnation": "a",
        }))  # fmt: skip
        assert recv(w1)[0] == p.WELCOME
        app = peer(b"c-app", "app")
        app.send_multipart(p.frames(p.PROTOCOL_CLIENT, p.SUBMIT, {
            "seq": 1, "tasks": [{"name": "t.add", "payload": p.pack([[1, 2], {}])}],
        }))  # fmt: skip
        (task_id,) = recv(app)[1]["ids"]
        assert recv(w1)[0] == p.TASK
        # When another allowed key speaks under the name w1
        impostor = peer(b"w1", "app")
        impostor.send_multipart(p.frames(p.PROTOCOL_WORKER, p.RESULT, {
            "seq": 9, "results": [{"id": task_id, "attempt": 1, "ok": True, "value": p.pack(7)}],
        }))  # fmt: skip
        # Then it is refused and the task is untouched
        command, body = recv(impostor)
        assert (command, body["code"]) == (p.ERROR, p.E_FORBIDDEN)
        assert broker.store.views([task_id])[task_id]["state"] == "running"
    finally:
        for sock in sockets:
            sock.close(linger=0)
        broker.close()
        ctx.term()


def test_serving_beyond_loopback_without_curve_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskring.broker.server")
    ctx: zmq.Context[Any] = zmq.Context()
    settings = BrokerSettings(endpoint="tcp://0.0.0.0:*", db_path=str(tmp_path / "t.db"))
    broker = Broker(settings, context=ctx)
    broker.close()
    ctx.term()
    assert any("without CURVE" in r.message for r in caplog.records)


def _query(cluster: Cluster, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    import sqlite3

    with sqlite3.connect(f"file:{cluster.db}?mode=ro", uri=True) as conn:
        return conn.execute(sql, args).fetchall()
