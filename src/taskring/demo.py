"""`taskring demo`: a broker and workers on this machine, a few thousand tasks, a summary.

Every process the demo starts is a `python -m taskring ...` child in its own
session (so a Ctrl-C in the terminal reaches only the demo, which then stops
them in order: workers first, so they leave the ring cleanly, then the
broker). They are always stopped by their own Popen handles: SIGTERM, a
grace period, then SIGKILL.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

from taskring.client import Client, TaskInfo
from taskring.errors import BrokerUnavailable, ResultTimeout, TaskringError

POLL_S = 0.1  # readiness poll interval
STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL
USERS = 100  # routing keys user-0 .. user-99


class DemoError(TaskringError):
    """The demo's processes did not start or stopped early."""


@dataclasses.dataclass(frozen=True, slots=True)
class DemoSummary:
    tasks: int
    workers: int
    submit_s: float
    wall_s: float  # from the first submit to the last result
    per_worker: dict[str, int]
    failures: list[TaskInfo]
    unfinished: int

    @property
    def throughput(self) -> float:
        return self.tasks / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and not self.unfinished

    def render(self) -> str:
        lines = [
            f"{self.tasks} tasks on {self.workers} workers in {self.wall_s:.2f} s: "
            f"{self.throughput:.0f} tasks/s (submitting took {self.submit_s:.2f} s)",
        ]
        for name, count in sorted(self.per_worker.items()):
            share = 100 * count / self.tasks if self.tasks else 0.0
            lines.append(f"  {name:<24} {count:>7} tasks  {share:5.1f}%")
        lines.append(f"failures: {len(self.failures)}")
        lines.extend(f"  task {f.id} {f.name} {f.state}: {f.error}" for f in self.failures[:5])
        if self.unfinished:
            lines.append(f"unfinished: {self.unfinished}")
        return "\n".join(lines)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------- processes


@dataclasses.dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]


class Processes:
    """The children the demo started; stop_all() ends every one of them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[_Child] = []

    def start(self, name: str, args: Sequence[str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("wb")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "taskring", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self.children.append(_Child(name, proc, log_path, log))

    def check_alive(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise DemoError(f"{child.name} exited with code {code}; see {child.log_path}")

    def stop_all(self) -> None:
        """Workers first, then the broker; a second Ctrl-C kills at once."""
        try:
            self._stop([c for c in self.children if c.name != "broker"])
            self._stop([c for c in self.children if c.name == "broker"])
        except BaseException:
            for child in self.children:
                if child.proc.poll() is None:
                    child.proc.kill()
            for child in self.children:
                child.proc.wait()
            raise
        finally:
            for child in self.children:
                child.log.close()

    @staticmethod
    def _stop(children: list[_Child]) -> None:
        for child in children:
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


# ---------------------------------------------------------------- the demo


class _Bar:
    """A one-line progress bar on a text stream, redrawn at most 10 times a second."""

    def __init__(self, total: int, stream: TextIO | None, width: int = 30) -> None:
        self.total = total
        self.stream = stream
        self.width = width
        self.started = time.monotonic()
        self.drawn = 0.0

    def update(self, done: int, failed: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.stream is None or (not force and now - self.drawn < 0.1):
            return
        self.drawn = now
        filled = self.width * done // max(1, self.total)
        rate = done / max(1e-9, now - self.started)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
            f"{rate:6.0f} tasks/s  failed {failed}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


def workload(tasks: int) -> list[tuple[str, list[list[Any]], Callable[[Sequence[Any]], str]]]:
    """(task name, argument lists, key function) covering `tasks` tasks in all.

    Most tasks are keyed by a user id, so the summary shows how the ring
    spreads keys over the workers; a few checkpointing `crunch` tasks show
    checkpoints at work.
    """
    crunches = min(10, tasks // 300)
    digests = tasks // 10
    words = tasks // 4
    adds = tasks - crunches - digests - words
    text = "the quick brown fox jumps over the lazy dog"

    def by_user(args: Sequence[Any]) -> str:
        return f"user-{args[0]}"

    def by_job(args: Sequence[Any]) -> str:
        return f"job-{args[0]}"

    return [
        ("demo.add", [[i % USERS, i] for i in range(adds)], by_user),
        ("demo.word_count", [[i % USERS, text[: 4 + i % 40]] for i in range(words)], by_user),
        ("demo.digest", [[i % USERS, f"item-{i}", 50] for i in range(digests)], by_user),
        ("demo.crunch", [[100_000 + i, 20_000] for i in range(crunches)], by_job),
    ]


def _wait_ready(endpoint: str, procs: Processes, workers: int, timeout_s: float) -> None:
    """Poll STATUS until `workers` workers are registered (or a child died, or time ran out)."""
    deadline = time.monotonic() + timeout_s
    with Client(endpoint, timeout_s=1.0) as client:
        while True:
            procs.check_alive()
            try:
                if len(client.broker_status().get("workers") or []) >= workers:
                    return
            except BrokerUnavailable:
                pass  # still starting
            if time.monotonic() >= deadline:
                raise DemoError(
                    f"{workers} workers did not register within {timeout_s:g} s; "
                    f"see the logs in {procs.log_dir}"
                )
            time.sleep(POLL_S)


def run_demo(
    *,
    tasks: int = 3000,
    workers: int = 2,
    data_dir: Path = Path("demo-data"),
    result_timeout_s: float = 300.0,
    startup_timeout_s: float = 30.0,
    progress: TextIO | None = None,
    announce: Callable[[str], None] = lambda line: None,
) -> DemoSummary:
    """Start a broker and `workers` workers, run `tasks` demo tasks, stop everything.

    The database (data_dir/demo.db) starts empty on every run; the
    processes' logs are left in data_dir.
    """
    if tasks < 1 or workers < 1:
        raise ValueError("tasks and workers must be at least 1")
    data_dir.mkdir(parents=True, exist_ok=True)
    db = data_dir / "demo.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    procs = Processes(data_dir)
    try:
        procs.start("broker", ["broker", "-e", endpoint, "--db", str(db)])
        for i in range(workers):
            name = f"demo-worker-{i + 1}"
            procs.start(name, ["worker", "taskring.demo_tasks", "-e", endpoint, "--name", name])
        announce(f"broker on {endpoint}, {workers} workers starting (logs in {data_dir})")
        _wait_ready(endpoint, procs, workers, startup_timeout_s)
        with Client(endpoint) as client:
            return _run_tasks(client, tasks, workers, result_timeout_s, progress, announce)
    finally:
        procs.stop_all()


def _run_tasks(
    client: Client,
    tasks: int,
    workers: int,
    result_timeout_s: float,
    progress: TextIO | None,
    announce: Callable[[str], None],
) -> DemoSummary:
    started = time.monotonic()
    ids: list[int] = []
    for name, arglist, key in workload(tasks):
        if arglist:
            ids.extend(client.submit_many(name, arglist, key=key))
    submit_s = time.monotonic() - started
    announce(f"submitted {len(ids)} tasks in {submit_s:.2f} s")
    per_worker: Counter[str] = Counter()
    failures: list[TaskInfo] = []
    done = 0
    bar = _Bar(len(ids), progress)
    try:
        for info in client.as_completed(ids, timeout=result_timeout_s):
            done += 1
            per_worker[info.worker or "?"] += 1
            if not info.ok:
                failures.append(info)
            bar.update(done, len(failures))
    except ResultTimeout:
        pass  # reported as unfinished
    finally:
        bar.update(done, len(failures), force=True)
        bar.close()
    return DemoSummary(
        tasks=len(ids),
        workers=workers,
        submit_s=submit_s,
        wall_s=time.monotonic() - started,
        per_worker=dict(per_worker),
        failures=failures,
        unfinished=len(ids) - done,
    )
