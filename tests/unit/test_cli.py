"""The command line: argument handling, exit codes, one-line errors.

Commands that talk to a broker run against a scripted fake broker (a ROUTER
served from a background thread); no real broker or worker is started here.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from typer.testing import CliRunner

from taskring import protocol
from taskring.cli import app
from taskring.cli.common import ExitCode

runner = CliRunner()
COMMANDS = [
    "broker",
    "worker",
    "submit",
    "result",
    "cancel",
    "prune",
    "status",
    "tasks",
    "history",
    "demo",
]
SRC = Path(__file__).resolve().parents[2] / "src"

Handler = Callable[[bytes, dict[str, Any]], tuple[bytes, dict[str, Any]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def view(task_id: int, state: str, **fields: Any) -> dict[str, Any]:
    row = {
        "id": task_id,
        "name": "add",
        "state": state,
        "key": None,
        "attempt": 1,
        "max_attempts": 3,
        "spared": 0,
        "worker": "w1",
        "result": None,
        "error": None,
        "created_at": 1.0,
        "updated_at": 2.0,
    }
    row.update(fields)
    return protocol.task_view(row)


class ScriptedBroker:
    """Answers each client request with handler(command, body) -> (command, body)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.received: list[tuple[bytes, dict[str, Any]]] = []
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            if not self.sock.poll(50, zmq.POLLIN):
                continue
            identity, proto, command, raw = self.sock.recv_multipart()
            body = protocol.unpack(raw)
            self.received.append((command, body))
            answer, fields = self.handler(command, body)
            out = {"seq": body["seq"], **fields}
            self.sock.send_multipart([identity, *protocol.frames(proto, answer, out)])

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], ScriptedBroker]]:
    started: list[ScriptedBroker] = []

    def start(handler: Handler) -> ScriptedBroker:
        started.append(ScriptedBroker(handler))
        return started[-1]

    yield start
    for broker in started:
        broker.close()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    return lines[0]


# ---------------------------------------------------------------- user mistakes


def test_a_bare_word_argument_is_rejected_with_a_hint():
    # Given an argument that is not JSON
    # When submitting it
    result = runner.invoke(app, ["submit", "add", "1", "foo"])
    # Then exit 2 with one line saying how to quote it, and no traceback
    assert result.exit_code == ExitCode.USAGE
    assert one_line(result.stderr) == (
        "error: argument 'foo' is not JSON (quote strings: '\"foo\"')"
    )
    assert "Traceback" not in result.output


def test_kwargs_must_be_a_json_object():
    result = runner.invoke(app, ["submit", "add", "--kwargs", "[1, 2]"])
    assert result.exit_code == ExitCode.USAGE
    assert "JSON object" in one_line(result.stderr)


@pytest.mark.parametrize(
    "command", [["submit", "add", "1"], ["status"], ["tasks"], ["result", "1"]]
)
def test_an_unreachable_broker_is_one_line_and_exit_3(command):
    # Given an endpoint nobody listens on
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # When a command needs the broker
    result = runner.invoke(app, [*command, "--endpoint", endpoint, "--timeout", "0.5"])
    # Then exit 3 and one line naming the endpoint and what to do
    assert result.exit_code == ExitCode.UNAVAILABLE
    assert one_line(result.stderr) == (
        f"error: broker at {endpoint} did not answer within 0.5 s (is `taskring broker` running?)"
    )


def test_a_worker_for_a_missing_module_is_one_line_and_exit_2():
    # Given a module that does not exist
    # When starting a worker for it (no broker needed: it fails while importing)
    result = runner.invoke(app, ["worker", "nonexistent_module_xyz", "--log-level", "error"])
    # Then exit 2 with one line naming the module
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "nonexistent_module_xyz" in one_line(result.stderr)
    assert "Traceback" not in result.output


def test_a_broker_whose_message_limit_cannot_carry_a_task_is_refused(tmp_path):
    # Given a message limit of 256 KiB and tasks of up to 1 MiB (the default)
    db = tmp_path / "tasks.db"
    args = ["broker", "--db", str(db), "--max-message-bytes", "262144", "--log-level", "error"]
    # When the broker is started, Then it refuses in one line, and writes nothing
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "--max-message-bytes 262144 cannot carry one task" in one_line(result.stderr)
    assert not db.exists()


def test_a_broker_on_a_sqlite_too_old_says_so_without_blaming_the_file(tmp_path, monkeypatch):
    # Given a Python whose SQLite predates UPDATE ... FROM
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    db = tmp_path / "tasks.db"
    # When the broker is started, Then it refuses in one line that names the version
    result = runner.invoke(app, ["broker", "--db", str(db), "--log-level", "error"])
    assert result.exit_code == ExitCode.USAGE, result.output
    line = one_line(result.stderr)
    assert "needs SQLite 3.33 or later" in line and "3.31.1" in line
    assert str(db) not in line
    assert not db.exists()


def test_a_worker_takes_its_drain_and_flush_timeouts_from_the_command_line(monkeypatch):
    # Given a worker command with both timeouts, and run_worker replaced by a recorder
    import taskring.workers

    seen = []
    monkeypatch.setattr(taskring.workers, "run_worker", seen.append)
    args = ["worker", "mod", "--drain-timeout", "12.5", "--flush-timeout", "0"]
    # When it runs, Then the worker's settings carry them
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # And without them, the worker's own defaults
    assert runner.invoke(app, ["worker", "mod"]).exit_code == 0
    given, default = seen
    assert (given.drain_timeout_s, given.flush_timeout_s) == (12.5, 0.0)
    own = taskring.workers.WorkerSettings(modules=("mod",))
    assert (default.drain_timeout_s, default.flush_timeout_s) == (
        own.drain_timeout_s,
        own.flush_timeout_s,
    )
    # And a negative one is refused before anything starts
    result = runner.invoke(app, ["worker", "mod", "--flush-timeout", "-1"])
    assert result.exit_code == ExitCode.USAGE
    assert "--flush-timeout" in result.output + result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_works_for_every_command(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_python_dash_m_taskring_runs_the_cli():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "taskring", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("taskring ")


# ---------------------------------------------------------------- against a fake broker


def test_submit_prints_the_task_id(serve):
    # Given a broker that accepts every submit as task 12
    broker = serve(lambda command, body: (protocol.REPLY, {"ids": [12], "unknown": []}))
    # When submitting JSON arguments
    result = runner.invoke(
        app, ["submit", "add", "1", '"x"', "--kwargs", '{"k": [1]}', "-e", broker.endpoint]
    )
    # Then the id is printed, the arguments arrived typed, and the submit was strict
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "12"
    (_, body), *_ = broker.received
    (item,) = body["tasks"]
    assert protocol.unpack(item["payload"]) == [[1, "x"], {"k": [1]}]
    assert body["strict"] is True


def test_an_unknown_task_name_is_refused_with_the_known_names(serve):
    # Given a broker that knows only add and mul
    message = "no worker has registered task 'ad'; known tasks: add, mul"
    broker = serve(
        lambda command, body: (
            protocol.ERROR,
            {"code": protocol.E_UNKNOWN_TASK, "message": message},
        )
    )
    # When submitting a misspelled name
    result = runner.invoke(app, ["submit", "ad", "1", "-e", broker.endpoint])
    # Then exit 2 with the broker's one line
    assert result.exit_code == ExitCode.USAGE
    assert one_line(result.stderr) == f"error: {message}"


def test_queue_unknown_queues_and_warns(serve):
    # Given a broker that queues an unknown name and says which names it knows
    broker = serve(
        lambda command, body: (
            protocol.REPLY,
            {"ids": [3], "unknown": ["ad"], "known": ["add", "mul"]},
        )
    )
    # When submitting with --queue-unknown
    result = runner.invoke(app, ["submit", "ad", "--queue-unknown", "-e", broker.endpoint])
    # Then the id is printed, a warning names the known tasks, and the submit was not strict
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "3"
    assert "known tasks: add, mul" in one_line(result.stderr)
    assert broker.received[0][1]["strict"] is False


def test_submit_wait_prints_the_result_as_json(serve):
    def handler(command: bytes, body: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        if command == protocol.SUBMIT:
            return protocol.REPLY, {"ids": [5], "unknown": []}
        return protocol.REPLY, {
            "tasks": [view(5, protocol.SUCCEEDED, result=protocol.pack({"sum": 3}))]
        }

    broker = serve(handler)
    result = runner.invoke(app, ["submit", "add", "1", "2", "--wait", "-e", broker.endpoint])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == '{"sum": 3}'


def test_result_of_a_failed_task_exits_1_with_the_error(serve):
    broker = serve(
        lambda command, body: (
            protocol.REPLY,
            {"tasks": [view(5, protocol.FAILED, error="ZeroDivisionError: division by zero")]},
        )
    )
    result = runner.invoke(app, ["result", "5", "-e", broker.endpoint])
    assert result.exit_code == ExitCode.FAILED
    assert one_line(result.stderr) == "error: task 5 failed: ZeroDivisionError: division by zero"


def test_result_no_wait_of_a_running_task(serve):
    broker = serve(lambda c, b: (protocol.REPLY, {"tasks": [view(5, protocol.RUNNING)]}))
    result = runner.invoke(app, ["result", "5", "--no-wait", "-e", broker.endpoint])
    assert result.exit_code == ExitCode.NOT_FINISHED
    assert "running" in one_line(result.stderr)


def test_status_shows_workers_and_states(serve):
    status = {
        "workers": [
            {
                "name": "w1",
                "host": "h",
                "pid": 7,
                "pool": "thread",
                "capacity": 4,
                "load": 3,
                "share": 0.5,
                "tasks": ["add"],
                "last_seen_s": 0.2,
            }
        ],
        "states": {"queued": 9, "running": 3},
        "broker": {"version": "0.1.0", "uptime_s": 5.0, "db": "t.db", "endpoint": "tcp://x"},
    }
    broker = serve(lambda c, b: (protocol.REPLY, status))
    result = runner.invoke(app, ["status", "-e", broker.endpoint])
    assert result.exit_code == 0, result.output
    assert "w1" in result.stdout and "3/4" in result.stdout and "50.0%" in result.stdout
    assert any(line.split() == ["queued", "9"] for line in result.stdout.splitlines())


def test_cancel_says_what_became_of_each_task_and_exits_1_if_any_was_not_cancelled(serve):
    # Given a broker that cancels 5, finds 6 already succeeded, and knows no 7
    answers = {5: protocol.CANCELLED, 6: protocol.SUCCEEDED, 7: None}

    def handler(command: bytes, body: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        assert command == protocol.CANCEL
        return protocol.REPLY, {"states": [answers.get(i, protocol.CANCELLED) for i in body["ids"]]}

    broker = serve(handler)
    # When all three are cancelled, Then each gets a line and the exit status is 1
    mixed = runner.invoke(app, ["cancel", "5", "6", "7", "-e", broker.endpoint])
    assert mixed.exit_code == 1
    assert mixed.stdout == "task 5: cancelled\n"
    assert mixed.stderr.splitlines() == [
        "task 6: already succeeded, left as it is",
        "task 7: no such task",
    ]
    # And cancelling only what can be cancelled exits 0
    assert runner.invoke(app, ["cancel", "5", "-e", broker.endpoint]).exit_code == 0
    assert broker.received[0][1]["ids"] == [5, 6, 7]


def test_tasks_and_history_render(serve):
    def handler(command: bytes, body: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        if command == protocol.TASKS:
            views = [view(2, protocol.RUNNING, attempt=5, spared=2), view(1, protocol.QUEUED)]
            below = body.get("before_id") or 3
            return protocol.REPLY, {"tasks": [v for v in views if v["id"] < below]}
        event = {"at": 1.0, "kind": "submitted", "attempt": 0, "worker": None, "detail": None}
        return protocol.REPLY, {"task": view(1, protocol.QUEUED), "events": [event]}

    broker = serve(handler)
    listed = runner.invoke(app, ["tasks", "--state", "running", "-e", broker.endpoint])
    assert listed.exit_code == 0, listed.output
    assert broker.received[0][1]["state"] == "running"
    assert broker.received[0][1]["results"] is False  # the table shows none
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["2", "1"]
    # And attempts that did not start are shown apart from the counted ones
    assert "5/3 (2 not counted)" in listed.stdout.splitlines()[1]
    assert "1/3" in listed.stdout.splitlines()[2]
    assert "not counted" not in listed.stdout.splitlines()[2]
    shown = runner.invoke(app, ["history", "1", "-e", broker.endpoint])
    assert shown.exit_code == 0, shown.output
    assert "submitted" in shown.stdout


# ---------------------------------------------------------------- prune


def test_prune_asks_until_the_broker_has_gone_through_the_log(serve):
    # Given a broker that deletes 3 tasks in its first window and 1 in its last
    pages = {0: {"deleted": 3, "next": 2000}, 2000: {"deleted": 1, "next": None}}
    broker = serve(lambda command, body: (protocol.REPLY, pages[body["after_id"]]))
    # When finished tasks older than 30 days are pruned
    began = time.time()
    result = runner.invoke(app, ["prune", "--older-than", "30d", "-e", broker.endpoint])
    # Then both windows were asked for, with the cutoff 30 days back and every final state
    assert result.exit_code == 0, result.output
    assert [(c, b["after_id"]) for c, b in broker.received] == [
        (protocol.PRUNE, 0),
        (protocol.PRUNE, 2000),
    ]
    body = broker.received[0][1]
    assert "states" not in body
    assert began - 30 * 86400 - 1 < body["before"] < time.time() - 30 * 86400 + 1
    # And one line says how many went
    assert one_line(result.stdout).startswith("pruned 4 finished tasks that ended before ")


def test_prune_of_some_states_names_them(serve):
    broker = serve(lambda command, body: (protocol.REPLY, {"deleted": 2, "next": None}))
    states = ["--state", "succeeded", "--state", "dead"]
    result = runner.invoke(app, ["prune", "--older-than", "12h", *states, "-e", broker.endpoint])
    assert result.exit_code == 0, result.output
    assert broker.received[0][1]["states"] == ["dead", "succeeded"]
    assert one_line(result.stdout).startswith("pruned 2 dead, succeeded tasks")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--older-than", "10m"], "at least 1h"),
        (["--older-than", "30 days"], "not a duration"),
        (["--older-than", "-3d"], "not a duration"),
        (["--older-than", "2d", "--state", "running"], "running"),
    ],
)
def test_a_bad_prune_is_refused_before_anything_is_sent(serve, args, says):
    broker = serve(lambda command, body: (protocol.REPLY, {"deleted": 0, "next": None}))
    result = runner.invoke(app, ["prune", *args, "-e", broker.endpoint])
    assert result.exit_code == ExitCode.USAGE
    assert says in result.stderr + result.output
    assert broker.received == []


def test_a_prune_reply_that_does_not_go_on_is_an_error_not_a_loop(serve):
    # Given a broker whose `next` never moves past where it was asked to start
    broker = serve(lambda command, body: (protocol.REPLY, {"deleted": 0, "next": body["after_id"]}))
    result = runner.invoke(app, ["prune", "--older-than", "2d", "-e", broker.endpoint])
    assert result.exit_code == ExitCode.USAGE
    assert "malformed answer" in one_line(result.stderr)
    assert len(broker.received) == 1
