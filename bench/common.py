"""What every benchmark shares: the processes it starts (and always stops), task logs, statistics.

Every process is a child started with Popen in its own session and stopped
by its own handle (SIGTERM, a grace period, then SIGKILL), in reverse start
order, whatever happens. Children inherit this process's niceness, so
`nice -n 19 python bench/...` lowers all of them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import zmq

from taskring import protocol
from taskring.broker.store import Store
from taskring.client import Client
from taskring.clock import wall_clock
from taskring.demo import free_port

BENCH_DIR = Path(__file__).resolve().parent
# The deep-queue and startup logs are filled before any worker registered the
# no-op task, on purpose; the client's warning about that is noise here.
logging.getLogger("taskring.client").setLevel(logging.ERROR)
STOP_GRACE_S = 10.0
READY_TIMEOUT_S = 60.0
_LOG_NUMBERS = itertools.count(1)  # one sequence for every log of this run
NOOP = "bench.noop"  # the task names bench_tasks.py registers
CHECKPOINTS = "bench.checkpoints"
TASKRING = [sys.executable, "-m", "taskring"]
# The throughput workload's workers: as many threads as Dramatiq's workers use
# (its default, throughput.py's --dramatiq-threads), each holding 100 tasks as
# in the rounds before the seventh (50 threads + 50 prefetched). With no-op
# tasks 50 threads cost the worker more CPU per task than 8 (29 against 24 us,
# two workers together, paired runs): more of them sleep and are woken.
THROUGHPUT_CONCURRENCY = 8
THROUGHPUT_PREFETCH = 92


class BenchError(Exception):
    """A benchmark could not run: a child died, or something did not start in time."""


# ---------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..100."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MB, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB
    return fields["VmRSS"], fields["VmHWM"]


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.01
) -> Any:
    """Poll `condition` until it returns something truthy; fail with a sentence."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
    return value


# ---------------------------------------------------------------- processes


class Children:
    """Processes this benchmark started; leaving the `with` stops every one of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        pipes: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start a child logging to the workdir; with `pipes`, its stdin and stdout are ours."""
        log_path = self.workdir / f"{next(_LOG_NUMBERS):02d}-{name}.log"
        environ = {**os.environ, **(env or {})}
        # Workers import bench_tasks (and the reference task modules) from here.
        environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(BENCH_DIR), environ.get("PYTHONPATH")])
        )
        log: IO[bytes]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log if pipes else subprocess.STDOUT,
                env=environ,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.procs.append((name, proc, log_path))
        return proc

    def check(self) -> None:
        """Raise BenchError, with the end of its log, if a child has exited."""
        for name, proc, log_path in self.procs:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"{name} exited with code {proc.returncode}:\n{tail}")

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.procs):  # workers before the broker they talk to
            self.stop(proc)
        self.procs.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_all()
        except BaseException:  # a second Ctrl-C: kill the rest at once
            for _, proc, _ in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            raise


def status_probe(
    endpoint: str, timeout_s: float, alive: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """STATUS until the broker answers; returns the reply body.

    A raw DEALER reconnecting every 10 ms (the Client's 100 ms would blur a
    startup time), asking again every 50 ms.
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 10)
    sock.connect(endpoint)
    deadline = time.monotonic() + timeout_s
    seq = 0
    try:
        while time.monotonic() < deadline:
            alive()
            seq += 1
            sock.send_multipart(
                protocol.frames(protocol.PROTOCOL_CLIENT, protocol.STATUS, {"seq": seq})
            )
            while sock.poll(50):
                command, body = protocol.decode_reply(
                    sock.recv_multipart(), protocol.PROTOCOL_CLIENT
                )
                if command == protocol.REPLY:
                    return body
        raise BenchError(f"the broker at {endpoint} did not answer STATUS within {timeout_s:g} s")
    finally:
        sock.close(linger=0)


class Taskring:
    """A broker and workers as `python -m taskring` children, on a loopback TCP port."""

    def __init__(
        self, children: Children, *, synchronous: str = "full", launcher: Sequence[str] = TASKRING
    ) -> None:
        self.children = children
        self.synchronous = synchronous
        self.launcher = list(launcher)  # the command before `broker ...` or `worker ...`
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_broker(self, db: Path, *, wait: bool = True) -> subprocess.Popen[bytes]:
        argv = [*self.launcher, "broker", "--endpoint", self.endpoint, "--db", str(db)]
        argv += ["--synchronous", self.synchronous, "--log-level", "warning"]
        self.broker = self.children.start("broker", argv)
        if wait:
            status_probe(self.endpoint, READY_TIMEOUT_S, self.children.check)
        return self.broker

    def start_workers(
        self, count: int, concurrency: int, prefetch: int | None = None
    ) -> list[subprocess.Popen[bytes]]:
        """`prefetch` None: the worker's default."""
        for _ in range(count):
            name = f"bench-worker-{len(self.workers) + 1}"
            argv = [*self.launcher, "worker", "bench_tasks", "--endpoint", self.endpoint]
            argv += ["--name", name, "--concurrency", str(concurrency)]
            if prefetch is not None:
                argv += ["--prefetch", str(prefetch)]
            argv += ["--log-level", "warning"]
            self.workers.append(self.children.start(name, argv))
        return self.workers

    def wait_workers(self, count: int) -> None:
        def registered() -> bool:
            self.children.check()
            return len(status_probe(self.endpoint, READY_TIMEOUT_S)["workers"]) >= count

        wait_for(registered, READY_TIMEOUT_S, f"{count} workers to register", interval_s=0.05)

    def client(self, timeout_s: float = 30.0) -> Client:
        return Client(self.endpoint, timeout_s=timeout_s)


def start_echo(children: Children) -> str:
    """The raw pyzmq ROUTER echo server (zmq_echo.py), answering once before this returns."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    children.start("zmq-echo", [sys.executable, str(BENCH_DIR / "zmq_echo.py"), endpoint])
    _wait_answer(children, endpoint, b"ping", "the echo server")
    return endpoint


def start_durable_relay(children: Children, db: Path, synchronous: str) -> str:
    """durable_relay.py's relay and worker, answering once before this returns."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    script = str(BENCH_DIR / "durable_relay.py")
    children.start("relay", [sys.executable, script, "relay", endpoint, str(db), synchronous])
    children.start("relay-worker", [sys.executable, script, "worker", endpoint])
    _wait_answer(children, endpoint, b"ping", "the durable relay and its worker")
    return endpoint


def _wait_answer(children: Children, endpoint: str, ping: bytes, what: str) -> None:
    """Send `ping` until one is answered, then drop the answers to the others."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)

        def answered() -> int:
            children.check()
            sock.send(ping)
            return sock.poll(100)

        wait_for(answered, READY_TIMEOUT_S, what)
        while sock.poll(200):
            sock.recv_multipart()
    finally:
        sock.close(linger=0)


def start_redis(children: Children) -> tuple[str, str] | None:
    """A private redis-server on a free loopback port, nothing written to disk: (url, version)."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    import redis  # the `bench` extra installs it with dramatiq

    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    children.start("redis", [*argv, "--dir", str(children.workdir)])
    conn = redis.Redis(port=port)

    def up() -> bool:
        children.check()
        with contextlib.suppress(redis.ConnectionError):
            return bool(conn.ping())
        return False

    wait_for(up, READY_TIMEOUT_S, "redis-server")
    version = str(conn.info("server")["redis_version"])
    conn.close()
    return f"redis://127.0.0.1:{port}/0", version


# ---------------------------------------------------------------- databases


def build_db(path: Path, *, total: int, running: int, worker: str = "gone-worker") -> None:
    """A task log of `total` queued no-op tasks, the first `running` leased to a dead worker.

    Written with the broker's own Store (its migrations, its INSERT and
    lease statements) in large transactions: the schema is the real one,
    only the client round trips are skipped.
    """
    store = Store(path, synchronous="normal")
    try:
        now = wall_clock()
        # Every write inside a turn: one outside it would open a transaction never committed.
        with store.turn():
            store.remember_names({NOOP: 3}, now)
        chunk = 100_000
        for start in range(0, total, chunk):
            with store.turn():
                # (id, name, payload, key, max_attempts, client, seq, idx, idempotency key)
                rows = [
                    (store.allocate_id(), NOOP, protocol.pack([[i], {}]), None, 3, *[None] * 4)
                    for i in range(start, min(total, start + chunk))
                ]
                store.insert_tasks(rows, now)
        with store.turn():
            store.lease([(task_id, 1, worker) for task_id in range(1, running + 1)], now)
    finally:
        store.close()


def copy_db(source: Path, target: Path) -> None:
    for suffix in ("", "-wal"):
        if Path(f"{source}{suffix}").exists():
            shutil.copyfile(f"{source}{suffix}", f"{target}{suffix}")
