"""examples/c_client (a C client written from protocol.md alone) against a real broker."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
C_CLIENT_DIR = ROOT / "examples" / "c_client"
TASKRING = (sys.executable, "-m", "taskring")

TASKS_MODULE = textwrap.dedent(
    """
    from taskring.registry import task

    @task(name="cdemo.add")
    def add(a, b):
        return a + b

    @task(name="cdemo.describe")
    def describe(a, b):
        return {"sum": a + b, "args": [a, b], "half": a / 2, "text": 'say "hi"', "none": None}

    @task(name="cdemo.boom", max_attempts=1)
    def boom(n):
        raise ValueError(f"boom {n}")
    """
)

LINE = re.compile(r"^(\d+) (queued|running|succeeded|failed|dead) (.*)$")


def _pkg_config_has(name: str) -> bool:
    return subprocess.run(["pkg-config", "--exists", name], check=False).returncode == 0


def _build_client(out_dir: Path) -> Path:
    missing = [tool for tool in ("gcc", "make", "pkg-config") if shutil.which(tool) is None]
    if not missing:
        if not _pkg_config_has("libzmq"):
            missing.append("libzmq (libzmq3-dev)")
        if not (_pkg_config_has("msgpack-c") or _pkg_config_has("msgpack")):
            missing.append("msgpack-c (libmsgpack-dev)")
    if missing:
        pytest.skip(f"cannot build the C client, missing: {', '.join(missing)}")
    build = subprocess.run(
        ["make", "-C", str(C_CLIENT_DIR), f"OUT={out_dir / 'trc_run'}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert build.returncode == 0, f"make failed:\n{build.stdout}\n{build.stderr}"
    return out_dir / "trc_run"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.timeout(60)
def test_c_client_against_real_broker(tmp_path: Path) -> None:
    trc_run = _build_client(tmp_path)
    (tmp_path / "cdemo.py").write_text(TASKS_MODULE)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH", "")) if p)
    logs = {name: tmp_path / f"{name}.log" for name in ("broker", "worker")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(trc_run), "--timeout", "20", *args],
            capture_output=True,
            text=True,
            timeout=40,
            check=False,
        )

    def context(result: subprocess.CompletedProcess[str]) -> str:
        tails = "\n".join(
            f"--- {n}.log\n{p.read_text()[-2000:]}" for n, p in logs.items() if p.exists()
        )
        return (
            f"rc={result.returncode}\nstdout={result.stdout!r}\nstderr={result.stderr!r}\n{tails}"
        )

    procs: list[subprocess.Popen[bytes]] = []
    try:
        with logs["broker"].open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [*TASKRING, "broker", "--endpoint", endpoint, "--db", str(tmp_path / "x.db")],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        with logs["worker"].open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [*TASKRING, "worker", "cdemo", "--endpoint", endpoint],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )

        # Not strict: accepted even if the worker has not registered yet.
        r = run(endpoint, "cdemo.add", "2", "3")
        m = LINE.match(r.stdout.strip())
        assert r.returncode == 0 and m and m.group(2, 3) == ("succeeded", "5"), context(r)
        first_id = int(m.group(1))
        assert first_id >= 1

        # Strict, for a name the worker has registered by now; ids increase.
        r = run("--strict", endpoint, "cdemo.add", "40", "-2")
        m = LINE.match(r.stdout.strip())
        assert r.returncode == 0 and m and m.group(2, 3) == ("succeeded", "38"), context(r)
        assert int(m.group(1)) > first_id

        # A structured result, printed as JSON-ish text.
        r = run(endpoint, "cdemo.describe", "7", "1")
        m = LINE.match(r.stdout.strip())
        assert r.returncode == 0 and m and m.group(2) == "succeeded", context(r)
        expected = '{"sum": 8, "args": [7, 1], "half": 3.5, "text": "say \\"hi\\"", "none": null}'
        assert m.group(3) == expected, context(r)

        # A task that raises with max_attempts 1 is dead-lettered: exit 1, the reason printed.
        r = run(endpoint, "cdemo.boom", "9")
        m = LINE.match(r.stdout.strip())
        assert r.returncode == 1 and m and m.group(2) == "dead", context(r)
        assert "ValueError: boom 9" in m.group(3) and "gave up after 1 of 1 attempts" in m.group(3)

        # strict true and an unregistered name: ERROR unknown-task, nothing stored, exit 2.
        r = run("--strict", endpoint, "cdemo.missing", "1")
        assert r.returncode == 2, context(r)
        assert r.stdout == "", context(r)
        assert "unknown-task" in r.stderr and "cdemo.add" in r.stderr, context(r)

        # Bad input on the command line: a usage error before anything is sent.
        r = run(endpoint, "cdemo.add", "two", "3")
        assert r.returncode == 2 and "not a 64-bit integer" in r.stderr, context(r)
    finally:
        for proc in reversed(procs):
            _stop(proc)
