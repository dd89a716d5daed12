"""A chaos run: a broker, workers and clients under SIGKILL, SIGSTOP and SIGTERM; then the check.

1. Start the broker, the workers (taskring.chaos_tasks, each with --journal)
   and the client processes, on an ipc endpoint in the run's folder.
2. Play the schedule: kill -9 the broker or a worker and restart it after a
   pause, SIGSTOP a worker for a while, or SIGTERM a worker, which drains
   and leaves, and start it again after a pause. Now and then this process
   opens the live log read-write, reads it and closes it, as a sqlite3
   shell would. A process that exits on
   its own, or a drained worker that exits with an error, is a problem: it
   is reported and restarted.
3. End of the faults: everything is up again; the clients stop submitting.
4. Drain: broker and workers run on until every task in the log is final
   (or `drain_timeout_s` passes); then they are stopped with SIGTERM.
5. Check the history (taskring.verify) with every journal of the run.

The folder keeps tasks.db, clients/*.jsonl, workers/<name>-<n>.jsonl,
starts.jsonl and logs/, so `taskring verify` can look again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from taskring import protocol
from taskring.chaos.client import ClientPlan, plan_args
from taskring.chaos.processes import Supervisor
from taskring.chaos.schedule import (
    BROKER,
    KILL,
    READ,
    TERM,
    ChaosConfig,
    Fault,
    client_seed,
    make_schedule,
)
from taskring.client import Client
from taskring.errors import TaskringError
from taskring.verify import Report, check, format_report

# Past the worker's own limits (30 s drain, 5 s flush) with room to spare: a worker
# still draining then is a problem, killed and started again.
DRAIN_LIMIT_S = 60.0
TICK_S = 0.02
MAX_IPC_PATH = 100  # the kernel allows about 107 bytes for a unix socket path


class ChaosError(TaskringError):
    """The run could not be set up or started (its processes did not come up)."""


@dataclasses.dataclass(slots=True)
class ChaosResult:
    config: ChaosConfig
    root: Path
    schedule: list[Fault]
    report: Report
    problems: list[str]  # the run itself misbehaved: a process died on its own, a late drain
    faults_done: int
    faults_skipped: int  # their target was down, paused, draining, or (SIGTERM) starting
    chaos_s: float
    drain_s: float
    total_s: float

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.problems


def format_result(result: ChaosResult, show: int = 20) -> str:
    c, root = result.config, result.root
    lines = [
        f"chaos seed {c.seed}: {result.chaos_s:.1f} s of faults ({result.faults_done} done, "
        f"{result.faults_skipped} skipped), {c.workers} workers, {c.clients} clients; "
        f"drain {result.drain_s:.1f} s; total {result.total_s:.1f} s",
        format_report(result.report, show),
    ]
    lines.extend(f"PROBLEM: {p}" for p in result.problems)
    replay = f"taskring chaos --seed {c.seed} --duration {c.duration_s:g}"
    if c.synchronous != "full":
        replay += f" --synchronous {c.synchronous}"
    lines.append(f"replay: {replay}")
    lines.append(
        f"verify: taskring verify --drained --db {root / 'tasks.db'} --clients {root / 'clients'}"
        f" --workers {root / 'workers'} --starts {root / 'starts.jsonl'}"
    )
    return "\n".join(lines)


def run_chaos(
    config: ChaosConfig, root: Path, *, out: Callable[[str], None] = print
) -> ChaosResult:
    """Run the scenario in `root` (created; must not hold an earlier run)."""
    root = root.resolve()
    if (root / "tasks.db").exists():
        raise ChaosError(f"{root} already holds a chaos run; choose an empty folder")
    for sub in ("clients", "workers", "logs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    schedule = make_schedule(config)
    out(
        f"chaos seed {config.seed}, {config.duration_s:g} s, {config.workers} workers, "
        f"{config.clients} clients, broker --synchronous {config.synchronous}, folder {root}"
    )
    out(f"schedule ({len(schedule)} faults):")
    for fault in schedule:
        out(f"  {fault.at_s:6.2f} s  {fault.describe()}")
    socket_dir = None
    endpoint = f"ipc://{root}/broker.ipc"
    if len(endpoint) > MAX_IPC_PATH:
        socket_dir = Path(tempfile.mkdtemp(prefix="trc-"))
        endpoint = f"ipc://{socket_dir}/broker.ipc"
    run = _Run(config, root, endpoint, Supervisor(root, root / "logs"), out)
    started = time.monotonic()
    try:
        run.start()
        chaos_s = run.play(schedule)
        drain_s = run.drain()
        run.stop()
    finally:
        run.sup.stop_all()
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
    starts = root / "starts.jsonl"
    report = check(
        root / "tasks.db",
        [root / "clients"],
        [root / "workers"],
        start_logs=[starts] if starts.exists() else [],
        drained=True,
    )
    return ChaosResult(
        config=config,
        root=root,
        schedule=schedule,
        report=report,
        problems=run.problems,
        faults_done=run.faults_done,
        faults_skipped=run.faults_skipped,
        chaos_s=chaos_s,
        drain_s=drain_s,
        total_s=time.monotonic() - started,
    )


class _Run:
    def __init__(
        self,
        config: ChaosConfig,
        root: Path,
        endpoint: str,
        sup: Supervisor,
        out: Callable[[str], None],
    ) -> None:
        self.config = config
        self.root = root
        self.endpoint = endpoint
        self.sup = sup
        self.out = out
        self.db = root / "tasks.db"
        self.servers = [BROKER, *config.worker_names]
        self.clients = [f"c{i + 1}" for i in range(config.clients)]
        self.problems: list[str] = []
        self.faults_done = self.faults_skipped = 0
        # Workers sent SIGTERM on purpose, until they exit: (SIGTERM time, pause after exit).
        self.draining: dict[str, tuple[float, float]] = {}

    # ------------------------------------------------------------ processes

    def _broker_args(self, n: int) -> list[str]:
        c = self.config
        return [
            "-m", "taskring", "broker",
            "--endpoint", self.endpoint,
            "--db", str(self.db),
            "--heartbeat", str(c.heartbeat_s),
            "--liveness", str(c.liveness),
            "--synchronous", c.synchronous,
        ]  # fmt: skip

    def _worker_args(self, name: str) -> Callable[[int], list[str]]:
        def args(n: int) -> list[str]:
            return [
                "-m", "taskring", "worker", "taskring.chaos_tasks",
                "--endpoint", self.endpoint,
                "--name", name,
                "--concurrency", str(self.config.concurrency),
                "--journal", str(self._journal(name, n)),
            ]  # fmt: skip

        return args

    def _journal(self, name: str, n: int | None = None) -> Path:
        """The journal of a worker's n-th start (its latest by default)."""
        return self.root / "workers" / f"{name}-{n or self.sup.starts[name]}.jsonl"

    def _handles_sigterm(self, role: str) -> bool:
        """Whether the latest start of `role` has set its SIGTERM handler. Before, SIGTERM
        ends it at once, as it would any process still starting. A worker opens its
        journal after setting it; the broker answers only from its loop, after."""
        if role != BROKER:
            return self._journal(role).exists()
        try:
            with Client(self.endpoint, timeout_s=0.5) as client:
                client.broker_status()
        except TaskringError:
            return False
        return True

    def _client_args(self, index: int) -> Callable[[int], list[str]]:
        c = self.config
        plan = ClientPlan(
            name=self.clients[index],
            endpoint=self.endpoint,
            journal=str(self.root / "clients" / f"{self.clients[index]}.jsonl"),
            start_log=str(self.root / "starts.jsonl"),
            seed=client_seed(c, index),
            duration_s=c.duration_s,
            keys=c.keys,
            timeout_s=c.client_timeout_s,
        )
        return lambda n: plan_args(plan)

    def start(self) -> None:
        self.sup.start(BROKER, self._broker_args)
        self._wait(lambda status: True, "the broker to answer")
        for name in self.config.worker_names:
            self.sup.start(name, self._worker_args(name))
        names = set(self.config.worker_names)
        self._wait(
            lambda status: names <= {w["name"] for w in status.get("workers", [])},
            "the workers to register",
        )
        for i, name in enumerate(self.clients):
            self.sup.start(name, self._client_args(i))

    def _wait(self, ready: Callable[[dict[str, Any]], bool], what: str) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        with Client(self.endpoint, timeout_s=0.5) as client:
            while time.monotonic() < deadline:
                for role, code in self.sup.exited(self.servers):
                    raise ChaosError(
                        f"{role} exited with code {code} at start; see {self.sup.log_path(role)}"
                    )
                try:
                    if ready(client.broker_status()):
                        return
                except TaskringError:
                    pass  # not up yet
                time.sleep(0.1)
        raise ChaosError(f"timed out waiting for {what}; see the logs in {self.root / 'logs'}")

    def _watch(self, elapsed_s: float) -> None:
        """Processes that ended on their own: a problem; servers are started again."""
        for role, code in self.sup.exited([r for r in self.servers if r not in self.draining]):
            self._problem(
                f"{role} exited by itself with code {code} at {elapsed_s:.1f} s "
                f"(see {self.sup.log_path(role)}); restarted"
            )
            self.sup.restart(role)
        for role, code in self.sup.exited(self.clients):
            if code != 0:
                self._problem(
                    f"client {role} failed with code {code}; see {self.sup.log_path(role)}"
                )
            self.sup.down.add(role)  # reported once

    def _problem(self, line: str) -> None:
        self.problems.append(line)
        self.out(f"PROBLEM: {line}")

    # ------------------------------------------------------------ the faults

    def play(self, schedule: Sequence[Fault]) -> float:
        """Apply the faults on time; then bring every process back. Returns the seconds spent."""
        t0 = time.monotonic()
        faults = list(schedule)
        undo: list[tuple[float, str]] = []  # (due, role): restart a killed role, resume a paused
        while True:
            elapsed = time.monotonic() - t0
            for role, (sent, pause_s) in list(self.draining.items()):
                code = self.sup.drained(role)
                if code is None:
                    if elapsed - sent > DRAIN_LIMIT_S:
                        self._problem(f"{role} still draining {DRAIN_LIMIT_S:g} s after SIGTERM")
                        self.sup.kill(role)
                        del self.draining[role]
                        undo.append((elapsed + pause_s, role))
                    continue
                del self.draining[role]
                self.out(f"{elapsed:7.2f} s  {role} drained and left after {elapsed - sent:.2f} s")
                if code != 0:
                    self._problem(
                        f"{role} exited with code {code} after SIGTERM "
                        f"(see {self.sup.log_path(role)})"
                    )
                undo.append((elapsed + pause_s, role))
            for item in sorted(u for u in undo if u[0] <= elapsed):
                undo.remove(item)
                self._undo(item[1], elapsed)
            self._watch(elapsed)
            if faults and faults[0].at_s <= elapsed:
                fault = faults.pop(0)
                if self._apply(fault, elapsed) and fault.action != TERM:
                    undo.append((elapsed + fault.pause_s, fault.target))
            elif elapsed >= self.config.duration_s and not faults and not self.draining:
                break
            time.sleep(TICK_S)
        elapsed = time.monotonic() - t0
        for _, role in sorted(undo):
            self._undo(role, elapsed)
        self.out(f"{elapsed:7.2f} s  end of faults; every process is up")
        return elapsed

    def _apply(self, fault: Fault, elapsed: float) -> bool:
        """Apply a fault, or say why not; True if it is to be undone later."""
        if fault.action == READ:
            self.faults_done += 1
            self.out(f"{elapsed:7.2f} s  {fault.describe()}: {self._read_live_log()} tasks")
            return False
        role = fault.target
        busy = role in self.draining and fault.action != KILL  # a drain may be cut short
        if role in self.sup.down or role in self.sup.paused or busy:
            why = "is down, paused or draining"
        elif fault.action == TERM and not self._handles_sigterm(role):
            why = "is still starting"
        else:
            why = ""
        if why:
            self.faults_skipped += 1
            self.out(f"{elapsed:7.2f} s  skipped ({role} {why}): {fault.describe()}")
            return False
        self.faults_done += 1
        pid = self.sup.current[role].pid
        self.out(f"{elapsed:7.2f} s  {fault.describe()} (pid {pid})")
        if fault.action == KILL:
            self.sup.kill(role)
            self.draining.pop(role, None)
        elif fault.action == TERM:
            self.sup.drain(role)
            self.draining[role] = (elapsed, fault.pause_s)
        else:
            self.sup.pause(role)
        return True

    def _read_live_log(self) -> str:
        try:
            with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as conn:
                return str(conn.execute("SELECT count(*) FROM tasks").fetchone()[0])
        except sqlite3.Error as e:
            self._problem(f"the live log could not be read: {e}")
            return "?"

    def _undo(self, role: str, elapsed: float) -> None:
        if role in self.sup.down:
            proc = self.sup.restart(role)
            self.out(f"{elapsed:7.2f} s  {role} started again (pid {proc.pid})")
        elif role in self.sup.paused:
            self.sup.resume(role)
            self.out(f"{elapsed:7.2f} s  SIGCONT {role}")

    # ------------------------------------------------------------ the end

    def drain(self) -> float:
        """Clients finish; then wait until every task is final. Returns the seconds spent."""
        t0 = time.monotonic()
        client_deadline = t0 + self.config.client_timeout_s + 15.0
        while any(self.sup.current[c].poll() is None for c in self.clients):
            if time.monotonic() > client_deadline:
                late = [c for c in self.clients if self.sup.current[c].poll() is None]
                self._problem(f"clients {', '.join(late)} did not finish; terminated")
                self.sup.terminate(late)
                break
            self._watch(time.monotonic() - t0)
            time.sleep(0.1)
        self._watch(time.monotonic() - t0)
        deadline = t0 + self.config.drain_timeout_s
        next_note = t0
        while True:
            open_tasks = _unfinished(self.db)
            now = time.monotonic()
            if open_tasks == 0:
                break
            if now > deadline:
                self._problem(
                    f"{open_tasks} tasks still not final after a drain of "
                    f"{self.config.drain_timeout_s:g} s"
                )
                break
            if now >= next_note:
                self.out(f"drain: {open_tasks} tasks not final yet")
                next_note = now + 5.0
            self._watch(now - t0)
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        self.out(f"drain done in {elapsed:.1f} s")
        return elapsed

    def stop(self) -> None:
        """Workers first (they leave the ring), then the broker, each with SIGTERM."""
        # A server started again at the end of the faults may still be starting when a
        # short drain is over: SIGTERM would end it before it could leave cleanly.
        deadline = time.monotonic() + self.config.startup_timeout_s
        up = [role for role in self.servers if role not in self.sup.down]
        while not all(map(self._handles_sigterm, up)) and time.monotonic() < deadline:
            time.sleep(TICK_S)
        for role, code in {
            **self.sup.terminate(self.config.worker_names),
            **self.sup.terminate([BROKER]),
        }.items():
            if code != 0:
                self._problem(f"{role} exited with code {code} on SIGTERM")


def _unfinished(db: Path) -> int:
    """Tasks not final yet, read from the log without writing to it."""
    conn = sqlite3.connect(db.as_uri() + "?mode=ro", uri=True)
    try:
        final = ", ".join(f"'{state}'" for state in sorted(protocol.FINAL_STATES))
        row = conn.execute(f"SELECT count(*) FROM tasks WHERE state NOT IN ({final})").fetchone()
        return int(row[0])
    finally:
        conn.close()
