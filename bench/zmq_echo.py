"""A raw pyzmq ROUTER echo server: the ceiling a ZeroMQ round trip in Python sets.

    python bench/zmq_echo.py tcp://127.0.0.1:PORT

It sends every message back to whoever sent it, draining what is queued on
each wake-up. No store, no codec: what is left once taskring's work is taken
away. Runs until SIGTERM.
"""

from __future__ import annotations

import sys

import zmq


def main(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.bind(endpoint)
    recv, send = sock.recv_multipart, sock.send_multipart
    while True:
        send(recv(copy=False), copy=False)


if __name__ == "__main__":
    main(sys.argv[1])
