"""run_worker in a real process: imports from the current directory, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.unit.worker_fakes import FakeBroker, assignment

from taskring import protocol

SRC = Path(__file__).resolve().parents[2] / "src"

SCRIPT = """\
import logging, sys
from taskring.workers import WorkerSettings, run_worker
logging.basicConfig(level=logging.INFO, format="%(message)s")
run_worker(WorkerSettings(endpoint=sys.argv[1], modules=("tasks",), name="sub", heartbeat_s=0.1))
"""


@pytest.mark.timeout(60)
def test_run_worker_serves_until_sigterm_then_says_disconnect(tmp_path: Path) -> None:
    # Given a tasks module in the current directory and a launcher somewhere else
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    (work / "tasks.py").write_text(
        "from taskring.workers import task\n\n@task(name='tmp.echo')\ndef echo(x):\n    return x\n"
    )
    (bin_dir / "launch.py").write_text(SCRIPT)
    broker = FakeBroker(heartbeat_s=0.1, liveness=10)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, str(bin_dir / "launch.py"), broker.endpoint],
        cwd=work,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # When it registers and runs a task
        ready = broker.register()
        assert "tmp.echo" in ready["tasks"]
        broker.dispatch(assignment(1, "tmp.echo", "hi"))
        seq, results = broker.result(timeout_s=10)
        assert protocol.unpack(results[1]["value"]) == "hi"
        broker.ack(seq)
        # Then SIGTERM ends it cleanly, with a goodbye
        proc.send_signal(signal.SIGTERM)
        assert broker.recv(protocol.DISCONNECT, timeout_s=10)["reason"] == "shutdown"
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0, stderr
        assert "worker sub ready" in stderr.splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        broker.close()
