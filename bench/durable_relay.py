"""The floor under a durable round trip: four ZeroMQ hops through a relay that commits twice.

    python bench/durable_relay.py relay tcp://127.0.0.1:PORT DB full|normal
    python bench/durable_relay.py worker tcp://127.0.0.1:PORT

The relay is a ROUTER in one thread that does what taskring's broker must do
for one task at a time, and nothing else: when a request comes in it writes a
row to SQLite (WAL, synchronous=NORMAL, one transaction), passes the request
to the worker and, with `full`, then fdatasyncs the WAL, as taskring's broker
sends a TASK between its commit and its sync; when the worker's answer comes
back it writes and syncs again, then answers the client. The worker is a
DEALER that sends every request straight back. No codec, no resends, no
leases, no ring, no threads: any design that commits a task before it runs
and makes its result durable before the client hears of it, with one
process between client and worker, pays at least this per round trip.
Runs until SIGTERM.
"""

from __future__ import annotations

import os
import sqlite3
import sys

import zmq

WORKER = b"worker"  # the worker's routing id, so the relay knows which side spoke
PING = b"ping"  # answered by the relay itself once the worker has said READY
READY = b"ready"


def relay(endpoint: str, db: str, synchronous: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # as taskring's broker, which syncs itself
    conn.execute("CREATE TABLE IF NOT EXISTS tasks (id INTEGER PRIMARY KEY, body BLOB, done INT)")
    wal = os.open(db + "-wal", os.O_RDWR) if synchronous == "full" else -1

    def commit(sql: str, params: tuple[object, ...]) -> int:
        conn.execute("BEGIN")
        row = conn.execute(sql, params).lastrowid or 0
        conn.execute("COMMIT")
        return row

    def sync() -> None:
        if wal >= 0:
            os.fdatasync(wal)

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    ready = False
    while True:
        frames = sock.recv_multipart()
        if frames[0] == WORKER:
            if frames[1] == READY:
                ready = True
                continue
            client, task_id, body = frames[1:]
            commit("UPDATE tasks SET body = ?, done = 1 WHERE id = ?", (body, int(task_id)))
            sync()
            sock.send_multipart([client, body])
        elif frames[1] == PING:
            if ready:
                sock.send_multipart(frames)
        else:
            task_id = commit("INSERT INTO tasks (body, done) VALUES (?, 0)", (frames[1],))
            sock.send_multipart([WORKER, frames[0], str(task_id).encode(), frames[1]])
            sync()


def worker(endpoint: str) -> None:
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, WORKER)
    sock.connect(endpoint)
    sock.send(READY)
    while True:
        sock.send_multipart(sock.recv_multipart())


if __name__ == "__main__":
    if sys.argv[1] == "relay":
        relay(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        worker(sys.argv[2])
