"""Real taskring processes for tests: a Cluster of subprocesses, stopped by their own PID.

The helpers live here, not in conftest.py, so a test module imports them by
a name that no other conftest.py can shadow (`from cluster import Cluster,
wait_for`): pytest imports every conftest.py without a package under the
same module name, `conftest`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from taskring.client import Client
from taskring.security import CurveClientConfig

SUPPORT = Path(__file__).parent / "support"
SRC = Path(__file__).parent.parent / "src"


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll `condition` until it returns something truthy; fail with a sentence."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Cluster:
    """A broker and workers as subprocesses of `python -m taskring`."""

    def __init__(self, root: Path, heartbeat_s: float = 0.2, liveness: int = 3) -> None:
        self.root = root
        self.curve: CurveClientConfig | None = None  # the keys client() connects with
        self.endpoint = f"ipc://{root}/broker.ipc"
        if len(self.endpoint) > 100:  # ipc paths are limited to about 107 bytes
            raise RuntimeError(f"temporary path too long for an ipc endpoint: {root}")
        self.db = root / "tasks.db"
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._logs = 0

    def run(self, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        """`python -m taskring ARGS` to its end, with the cluster's environment."""
        return subprocess.run(
            [sys.executable, "-m", "taskring", *args],
            cwd=self.root,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SUPPORT), str(SRC), *filter(None, [env.get("PYTHONPATH")])]
        )
        return env

    def _spawn(
        self, args: list[str], label: str, *, python_args: tuple[str, ...] = ("-m", "taskring")
    ) -> subprocess.Popen[bytes]:
        env = self._env()
        self._logs += 1
        log = open(self.root / f"{self._logs:02d}-{label}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, *python_args, *args],
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def start_script(self, script: str, *args: str) -> subprocess.Popen[bytes]:
        """Run tests/support/<script> with the cluster's environment (e.g. a client process)."""
        return self._spawn(list(args), Path(script).stem, python_args=(str(SUPPORT / script),))

    def client(self, timeout_s: float = 10.0) -> Client:
        return Client(self.endpoint, timeout_s=timeout_s, curve=self.curve)

    def status(self, timeout_s: float = 2.0) -> dict | None:  # type: ignore[type-arg]
        try:
            with self.client(timeout_s=timeout_s) as c:
                return c.broker_status()
        except Exception:
            return None

    def start_broker(self, *extra: str) -> subprocess.Popen[bytes]:
        self.broker = self._spawn(
            [
                "broker",
                "--endpoint", self.endpoint,
                "--db", str(self.db),
                "--heartbeat", str(self.heartbeat_s),
                "--liveness", str(self.liveness),
                *extra,
            ],
            "broker",
        )  # fmt: skip
        wait_for(lambda: self.status(timeout_s=0.5), 20, "the broker to answer STATUS")
        return self.broker

    def start_worker(
        self, name: str, *extra: str, module: str = "tt_tasks", concurrency: int = 4
    ) -> subprocess.Popen[bytes]:
        proc = self._spawn(
            [
                "worker", module,
                "--endpoint", self.endpoint,
                "--name", name,
                "--concurrency", str(concurrency),
                *extra,
            ],
            f"worker-{name}",
        )  # fmt: skip
        self.workers[name] = proc
        return proc

    def wait_workers(self, *names: str, timeout_s: float = 20) -> dict:  # type: ignore[type-arg]
        def registered() -> dict | None:  # type: ignore[type-arg]
            status = self.status()
            if status and set(names) <= {w["name"] for w in status["workers"]}:
                return status
            return None

        return wait_for(registered, timeout_s, f"workers {', '.join(names)} to register")  # type: ignore[no-any-return]

    def signal(self, proc: subprocess.Popen[bytes], signum: int) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    def stop(self, proc: subprocess.Popen[bytes], timeout_s: float = 10) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        self.signal(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        self.signal(proc, signal.SIGKILL)
        proc.wait(5)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                self.stop(proc, timeout_s=5)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.root.glob("*.log"))
        )
