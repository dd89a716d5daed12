"""The processes of a chaos run: started, killed, paused and restarted by role.

A role is "broker", a worker name or a client name; each start of a role is
a new `sys.executable -m ...` child in its own session (so a Ctrl-C in the
terminal reaches only the runner), logging to logs/<role>-<n>.log. Every
signal goes to a Popen handle this supervisor holds, never to a name, and
`stop_all` ends every child it ever started.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

STOP_GRACE_S = 10.0  # SIGTERM to SIGKILL


class Supervisor:
    def __init__(self, root: Path, log_dir: Path) -> None:
        self.root = root
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.current: dict[str, subprocess.Popen[bytes]] = {}
        self.everything: list[subprocess.Popen[bytes]] = []
        self.starts: collections.Counter[str] = collections.Counter()
        self.down: set[str] = set()  # killed on purpose, waiting for their restart
        self.paused: set[str] = set()  # SIGSTOPped on purpose
        self._args: dict[str, Callable[[int], Sequence[str]]] = {}

    def start(self, role: str, args: Callable[[int], Sequence[str]]) -> subprocess.Popen[bytes]:
        """Start `role`; args(n) gives the command line of its n-th start (1, 2, ...)."""
        self._args[role] = args
        self.starts[role] += 1
        n = self.starts[role]
        with (self.log_dir / f"{role}-{n}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *args(n)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.current[role] = proc
        self.everything.append(proc)
        self.down.discard(role)
        return proc

    def restart(self, role: str) -> subprocess.Popen[bytes]:
        return self.start(role, self._args[role])

    def log_path(self, role: str) -> Path:
        return self.log_dir / f"{role}-{self.starts[role]}.log"

    def kill(self, role: str) -> None:
        """SIGKILL, and reap it; `role` stays down until restart()."""
        proc = self.current[role]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.down.add(role)
        self.paused.discard(role)

    def pause(self, role: str) -> None:
        self.current[role].send_signal(signal.SIGSTOP)
        self.paused.add(role)

    def drain(self, role: str) -> None:
        """SIGTERM without waiting: `role` drains and exits on its own (see drained())."""
        self.current[role].send_signal(signal.SIGTERM)

    def drained(self, role: str) -> int | None:
        """The exit code once a draining `role` has exited (it is then down), else None."""
        code = self.current[role].poll()
        if code is not None:
            self.down.add(role)
        return code

    def resume(self, role: str) -> None:
        if self.current[role].poll() is None:
            self.current[role].send_signal(signal.SIGCONT)
        self.paused.discard(role)

    def exited(self, roles: Sequence[str]) -> list[tuple[str, int]]:
        """Roles among `roles` whose process ended without being killed here: (role, code)."""
        gone = []
        for role in roles:
            proc = self.current.get(role)
            if proc is not None and role not in self.down:
                code = proc.poll()
                if code is not None:
                    gone.append((role, code))
        return gone

    def terminate(self, roles: Sequence[str], grace_s: float = STOP_GRACE_S) -> dict[str, int]:
        """SIGTERM (after SIGCONT), wait, SIGKILL the late ones; returns the exit codes."""
        procs = {r: self.current[r] for r in roles if r in self.current and r not in self.down}
        _terminate(list(procs.values()), grace_s)
        for role in procs:
            self.down.add(role)
        return {role: proc.returncode for role, proc in procs.items()}

    def stop_all(self) -> None:
        """Every child ever started is ended and reaped, whatever state it is in."""
        _terminate(self.everything, STOP_GRACE_S)


def _terminate(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    try:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    except BaseException:
        for proc in procs:  # a second Ctrl-C: no more waiting
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()
        raise
