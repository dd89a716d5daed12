"""The history checker on hand-built logs: each check catches the violation it names.

The logs are made with the broker's own Store (so the schema is the real
one), then their rows are written directly, to build histories a correct
broker would never write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from taskring.broker.store import Store
from taskring.chaos import ChaosConfig, make_schedule
from taskring.cli import app
from taskring.cli.common import ExitCode
from taskring.verify import VerifyError, check, format_report, load_history

runner = CliRunner()

Ev = tuple[Any, ...]  # (kind, attempt) or (kind, attempt, detail)


class Log:
    """A task log written row by row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = Store(path)

    def task(
        self,
        tid: int,
        events: list[Ev],
        *,
        state: str | None = None,
        attempt: int | None = None,
        checkpoint_no: int | None = None,
        name: str = "chaos.short",
        max_attempts: int = 5,
        spared: int = 0,
    ) -> None:
        """A task with its events; the row's fields default to what the events imply."""
        leases = [e[1] for e in events if e[0] == "leased"]
        numbers = [int(e[2].split()[1]) for e in events if e[0] == "checkpointed"]
        implied = "queued"
        for e in events:
            implied = {"leased": "running", "retried": "queued"}.get(e[0], implied)
            implied = e[0] if e[0] in ("succeeded", "failed", "dead", "cancelled") else implied
        conn = self.store.conn
        with self.store.turn():
            conn.execute(
                "INSERT INTO tasks (id, name, payload, state, attempt, max_attempts,"
                " checkpoint_no, spared, created_at, updated_at)"
                " VALUES (?, ?, x'9290', ?, ?, ?, ?, ?, 1, 1)",
                (
                    tid,
                    name,
                    state or implied,
                    attempt if attempt is not None else max(leases, default=0),
                    max_attempts,
                    checkpoint_no if checkpoint_no is not None else max(numbers, default=0),
                    spared,
                ),
            )
            for e in events:
                detail = e[2] if len(e) > 2 else None
                conn.execute(
                    "INSERT INTO events (task_id, at, kind, attempt, worker, detail)"
                    " VALUES (?, 1, ?, ?, 'w1', ?)",
                    (tid, e[0], e[1], detail),
                )

    def close(self) -> None:
        self.store.close()


def ran(*numbers: int, attempt: int = 1, end: str = "succeeded") -> list[Ev]:
    """submitted, leased `attempt`, checkpoints `numbers`, then `end`."""
    return [
        ("submitted", 0),
        ("leased", attempt),
        *[("checkpointed", attempt, f"checkpoint {n}") for n in numbers],
        (end, attempt),
    ]


def jsonl(path: Path, *records: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def result(tid: int, attempt: int, *, ok: bool = True, stale: bool = False) -> dict[str, Any]:
    return {
        "kind": "result",
        "id": tid,
        "attempt": attempt,
        "ok": ok,
        "stale": stale,
        "worker": "w1",
    }


def ckpt(tid: int, attempt: int, number: int, *, stale: bool = False) -> dict[str, Any]:
    return {"kind": "checkpoint", "id": tid, "attempt": attempt, "number": number, "stale": stale}


@pytest.fixture
def log(tmp_path: Path) -> Any:
    log = Log(tmp_path / "tasks.db")
    yield log
    log.close()


def messages(report: Any, category: str) -> list[str]:
    return [v.message for v in report.violations if v.category == category]


# ---------------------------------------------------------------- a clean run


def test_a_clean_history_has_no_violation(log, tmp_path):
    # Given two tasks that ran as they should, one resumed from its checkpoint
    log.task(1, ran())
    log.task(
        2,
        [
            ("submitted", 0),
            ("leased", 1),
            ("checkpointed", 1, "checkpoint 1"),
            ("retried", 1, "worker w1 lost"),
            ("leased", 2),
            ("stale", 1, "checkpoint of attempt 1 refused"),
            ("checkpointed", 2, "checkpoint 2"),
            ("succeeded", 2),
        ],
    )
    clients = jsonl(tmp_path / "c1.jsonl", {"ids": [1, 2], "name": "chaos.short"})
    workers = jsonl(
        tmp_path / "w1.jsonl",
        ckpt(2, 1, 1),
        ckpt(2, 1, 2, stale=True),
        ckpt(2, 2, 2),
        result(2, 1, stale=True),
        result(1, 1),
        result(2, 2),
    )
    starts = jsonl(
        tmp_path / "starts.jsonl",
        {"id": 2, "attempt": 1, "number": 0},
        {"id": 2, "attempt": 2, "number": 1},
    )
    # When checking it with every journal
    report = check(log.path, [clients], [workers], start_logs=[starts])
    # Then nothing is wrong, and the stale messages are counted as fenced
    assert report.ok, format_report(report)
    assert (report.acknowledged, report.fenced, report.stale_acks) == (2, 1, 2)
    assert report.attempts == {1: 1, 2: 1}
    assert report.states == {"succeeded": 2}
    assert report.integrity == "ok"
    assert "OK: no violation" in format_report(report)


def test_without_client_journals_the_report_says_what_it_cannot_see(log):
    log.task(1, ran())
    report = check(log.path)
    assert report.ok
    assert report.acknowledged is None
    text = format_report(report)
    assert "n/a" in text
    assert "only what the database alone can show" in text


# ---------------------------------------------------------------- lost


def test_an_acknowledged_id_missing_from_the_log_is_lost(log, tmp_path):
    log.task(1, ran())
    clients = jsonl(tmp_path / "c1.jsonl", {"ids": [1, 2]})
    report = check(log.path, [clients])
    assert report.lost == 1
    assert "task 2 acknowledged (c1.jsonl:1) is not in the log" in messages(report, "lost")


def test_an_acknowledged_task_not_final_is_lost_only_after_a_drain(log, tmp_path):
    log.task(1, [("submitted", 0), ("leased", 1)])
    clients = jsonl(tmp_path / "c1.jsonl", {"ids": [1]})
    assert check(log.path, [clients], drained=True).lost == 1
    assert check(log.path, [clients], drained=False).ok


def test_an_id_acknowledged_for_two_submits_is_lost(log, tmp_path):
    log.task(1, ran())
    clients = jsonl(tmp_path / "c1.jsonl", {"ids": [1]}, {"ids": [1]})
    assert check(log.path, [clients]).lost == 1


def test_an_acknowledged_result_that_was_not_applied_is_lost(log, tmp_path):
    # Given a task dead-lettered at attempt 1, whose worker was told its ok result applied
    log.task(1, ran(end="dead"))
    workers = jsonl(tmp_path / "w1.jsonl", result(1, 1))
    report = check(log.path, [], [workers])
    assert report.lost == 1
    assert "the task is dead at attempt 1" in messages(report, "lost")[0]


def test_a_cancel_answered_cancelled_must_leave_the_task_cancelled(log, tmp_path):
    # Given a client journal of three answered cancels
    log.task(1, [("submitted", 0), ("cancelled", 0)])
    log.task(2, ran())
    log.task(3, ran())
    clients = jsonl(
        tmp_path / "c1.jsonl",
        {"ids": [1, 2, 3]},
        {"cancel": 1, "state": "cancelled"},
        {"cancel": 2, "state": "succeeded"},  # too late: it had ended, and stays so
        {"cancel": 3, "state": "cancelled"},  # answered cancelled, yet it succeeded
    )
    # Then only the broken promise is a violation, and the journal is read whole
    report = check(log.path, [clients])
    assert messages(report, "lost") == [
        "cancel of task 3 was answered cancelled (c1.jsonl:4), but the task is succeeded"
    ]
    assert report.acknowledged == 3
    assert not [n for n in report.notes if "unreadable" in n]


def test_unfinished_tasks_without_journals_are_violations_after_a_drain(log):
    log.task(1, [("submitted", 0)])
    assert check(log.path, drained=True).unfinished == 1
    assert check(log.path, drained=False).ok


# ---------------------------------------------------------------- duplicated


def test_two_final_events_are_a_duplicate(log):
    log.task(
        1,
        [("submitted", 0), ("leased", 1), ("succeeded", 1), ("succeeded", 1)],
    )
    report = check(log.path)
    assert report.duplicated == 1
    assert "task 1 ended 2 times" in messages(report, "duplicated")[0]


def test_tasks_cancelled_queued_or_running_are_clean(log):
    # Given one task cancelled before any lease, one while running, whose result was refused
    log.task(1, [("submitted", 0), ("cancelled", 0)])
    log.task(2, [("submitted", 0), ("leased", 1), ("cancelled", 1), ("stale", 1)])
    # Then neither breaks a rule: cancelled is final and needs no lease
    report = check(log.path, drained=True)
    assert report.violations == []


def test_a_cancelled_task_that_also_succeeded_is_a_duplicate(log):
    log.task(1, [("submitted", 0), ("leased", 1), ("cancelled", 1), ("succeeded", 1)])
    assert "task 1 ended 2 times: cancelled (attempt 1), succeeded (attempt 1)" in messages(
        check(log.path), "duplicated"
    )


def test_a_success_of_a_superseded_attempt_is_a_duplicate(log):
    # succeeded by attempt 1, yet its last attempt is 2
    log.task(1, ran(), attempt=2)
    assert check(log.path).duplicated == 1


def test_results_of_two_attempts_both_acknowledged_are_a_duplicate(log, tmp_path):
    log.task(1, ran())
    workers = jsonl(tmp_path / "w1.jsonl", result(1, 1), result(1, 2))
    report = check(log.path, [], [workers])
    assert report.duplicated == 1
    assert report.lost == 1  # and attempt 2's result is not the one in the log


# ---------------------------------------------------------------- fencing


def test_a_lease_that_skips_an_attempt_breaks_the_fencing_token(log):
    log.task(1, [("submitted", 0), ("leased", 1), ("retried", 1), ("leased", 3), ("succeeded", 3)])
    report = check(log.path)
    assert messages(report, "fencing") == ["task 1 leased attempt 3 after attempt 1"]


def test_a_lease_while_another_attempt_runs_is_a_fencing_violation(log):
    log.task(1, [("submitted", 0), ("leased", 1), ("leased", 2), ("succeeded", 2)])
    assert messages(check(log.path), "fencing") == [
        "task 1 leased attempt 2 while attempt 1 was running"
    ]


def test_applying_a_superseded_attempt_is_a_fencing_violation(log):
    log.task(
        1,
        [("submitted", 0), ("leased", 1), ("retried", 1), ("leased", 2), ("succeeded", 1)],
        attempt=2,
    )
    report = check(log.path)
    assert (
        "succeeded of attempt 1 applied while the task was running at attempt 2"
        in (messages(report, "fencing")[0])
    )


def test_an_attempt_that_ran_without_a_lease_or_twice_is_a_fencing_violation(log, tmp_path):
    log.task(1, ran())
    starts = jsonl(
        tmp_path / "starts.jsonl",
        {"id": 1, "attempt": 1, "number": 0},
        {"id": 1, "attempt": 1, "number": 0},
        {"id": 1, "attempt": 2, "number": 0},
    )
    assert messages(check(log.path, start_logs=[starts]), "fencing") == [
        "task 1 attempt 1 ran 2 times",
        "task 1 attempt 2 ran without a lease",
    ]


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_numbers_going_back_are_a_regression(log):
    log.task(1, ran(1, 3, 2), checkpoint_no=3)
    assert messages(check(log.path), "checkpoint regression") == [
        "task 1 stored checkpoint 2 (attempt 1) after 3"
    ]


def test_a_stored_checkpoint_below_its_events_is_a_regression(log):
    log.task(1, ran(1, 2), checkpoint_no=1)
    assert check(log.path).regressions == 1


def test_an_acknowledged_checkpoint_missing_from_the_log_is_a_regression(log, tmp_path):
    log.task(1, ran(1))
    workers = jsonl(tmp_path / "w1.jsonl", ckpt(1, 1, 1), ckpt(1, 1, 2))
    report = check(log.path, [], [workers])
    assert report.regressions == 1
    assert (
        "checkpoint 2 of task 1 attempt 1 was acknowledged"
        in messages(report, "checkpoint regression")[0]
    )


# Attempt 1 stores checkpoints 1 and 2, then attempt 2 runs to the end.
CHECKPOINT_2_THEN_A_RETRY = [
    ("submitted", 0),
    ("leased", 1),
    ("checkpointed", 1, "checkpoint 1"),
    ("checkpointed", 1, "checkpoint 2"),
    ("retried", 1),
    ("leased", 2),
    ("succeeded", 2),
]


def test_an_attempt_starting_below_an_acknowledged_checkpoint_is_a_regression(log, tmp_path):
    # Given attempt 1 had checkpoint 2 acknowledged, and attempt 2 started from 1
    log.task(1, CHECKPOINT_2_THEN_A_RETRY)
    starts = jsonl(tmp_path / "s.jsonl", {"id": 1, "attempt": 2, "number": 1})
    report = check(log.path, start_logs=[starts])
    assert messages(report, "checkpoint regression") == [
        "task 1 attempt 2 started from checkpoint 1, but checkpoint 2 was acknowledged before"
    ]


def test_without_start_logs_an_attempts_start_is_read_from_its_first_checkpoint(log, tmp_path):
    # Attempt 2's first checkpoint is 2, so it started from 1; 2 had been acknowledged
    log.task(1, CHECKPOINT_2_THEN_A_RETRY)
    workers = jsonl(tmp_path / "w.jsonl", ckpt(1, 1, 2), ckpt(1, 2, 2, stale=True))
    assert check(log.path, [], [workers]).regressions == 1


# ---------------------------------------------------------------- consistency


def test_a_state_other_than_its_events_imply_is_inconsistent(log):
    log.task(1, ran(), state="queued")
    assert messages(check(log.path), "inconsistent") == [
        "task 1 is queued; its events say succeeded"
    ]


def test_a_change_after_a_final_state_is_inconsistent(log):
    log.task(1, [*ran(), ("checkpointed", 1, "checkpoint 1")])
    report = check(log.path)
    assert "task 1: checkpointed (attempt 1) after it was succeeded" in messages(
        report, "inconsistent"
    )


SPARED = "not counted against max_attempts (it was likely still waiting): worker w1 lost"


def test_spared_attempts_must_agree_with_their_events(log):
    # Given a task whose events spare one attempt, and rows that say one and none
    events = [("submitted", 0), ("leased", 1), ("retried", 1, SPARED), *ran()[1:]]
    events[3:] = [("leased", 2), ("succeeded", 2)]
    log.task(1, events, spared=1)
    log.task(2, events, spared=0)
    # Then only the second disagrees
    assert messages(check(log.path), "inconsistent") == [
        "task 2 has 0 spared attempts; its events spare 1"
    ]


def test_a_task_s_own_error_text_does_not_pass_for_a_spared_attempt(log):
    # Given a task retried after an error that quotes a spared attempt's detail
    quoted = f"ValueError: upstream said {SPARED}"
    log.task(1, [("submitted", 0), ("leased", 1), ("retried", 1, quoted), *ran(attempt=2)[1:]])
    # Then its attempt was counted, and the log is consistent
    assert messages(check(log.path), "inconsistent") == []


def test_a_task_dead_before_its_counted_attempts_ran_out_is_inconsistent(log):
    # Given two tasks of two attempts, dead after two leases, one of them spared
    lost = [("leased", 1), ("retried", 1, SPARED), ("leased", 2)]
    log.task(1, [("submitted", 0), *lost, ("dead", 2)], max_attempts=2, spared=1)
    log.task(2, [("submitted", 0), ("leased", 1), ("retried", 1), ("leased", 2), ("dead", 2)],
             max_attempts=2)  # fmt: skip
    # Then the one that had only one counted attempt should not be dead
    assert messages(check(log.path), "inconsistent") == [
        "task 1 is dead after 1 counted attempts of 2"
    ]


def test_a_task_without_its_submitted_event_is_inconsistent(log):
    log.task(1, ran()[1:])
    assert "task 1 has no submitted event first" in messages(check(log.path), "inconsistent")


def test_attempts_per_task_is_a_histogram(log):
    log.task(1, ran())
    log.task(2, ran())
    log.task(3, [("submitted", 0), ("leased", 1), ("retried", 1), ("leased", 2), ("succeeded", 2)])
    assert check(log.path).attempts == {1: 2, 2: 1}


def test_violations_are_listed_first_n(log):
    for tid in range(1, 31):
        log.task(tid, ran(), state="queued")
    text = format_report(check(log.path, drained=False), show=5)
    assert "VIOLATIONS: 30 (first 5 shown)" in text
    assert len([line for line in text.splitlines() if "inconsistent: " in line]) == 5


# ---------------------------------------------------------------- bad input


def test_a_missing_database_is_a_user_error(tmp_path):
    with pytest.raises(VerifyError, match="no such database"):
        check(tmp_path / "nope.db")


def test_a_file_that_is_not_a_taskring_log_is_a_user_error(tmp_path):
    (tmp_path / "x.db").write_text("hello")
    with pytest.raises(VerifyError, match=r"x\.db"):
        check(tmp_path / "x.db")


def test_a_torn_last_journal_line_is_skipped_and_noted(log, tmp_path):
    log.task(1, ran())
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(result(1, 1)) + '\n{"kind": "resu')
    report = check(log.path, [], [path])
    assert report.ok
    assert any("1 unreadable line" in note for note in report.notes)


def test_a_file_with_no_record_is_not_a_journal(log, tmp_path):
    log.task(1, ran())
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\nat all\n")
    with pytest.raises(VerifyError, match="is not a journal"):
        check(log.path, [bad])


def test_verify_does_not_write_to_the_log(log):
    log.task(1, ran())
    log.close()
    before = log.path.read_bytes()
    check(log.path)
    assert log.path.read_bytes() == before


# ---------------------------------------------------------------- the commands


def test_verify_command_exit_codes(log, tmp_path):
    # Given a clean log: exit 0 and the table
    log.task(1, ran())
    ok = runner.invoke(app, ["verify", "--db", str(log.path)])
    assert ok.exit_code == ExitCode.OK, ok.output
    assert "OK: no violation" in ok.stdout
    # Given an acknowledged task that is missing: exit 1
    clients = jsonl(tmp_path / "c.jsonl", {"ids": [1, 7]})
    bad = runner.invoke(app, ["verify", "--db", str(log.path), "--clients", str(clients)])
    assert bad.exit_code == ExitCode.FAILED
    assert "lost: task 7" in bad.stdout
    # Given a missing journal: exit 2, one line, no traceback
    missing = runner.invoke(app, ["verify", "--db", str(log.path), "--workers", "nope.jsonl"])
    assert missing.exit_code == ExitCode.USAGE
    assert missing.stderr.strip() == "error: no such file or folder: nope.jsonl"


def test_verify_command_reads_folders_of_journals(log, tmp_path):
    log.task(1, ran())
    (tmp_path / "clients").mkdir()
    jsonl(tmp_path / "clients" / "c1.jsonl", {"ids": [1]})
    out = runner.invoke(
        app, ["verify", "--drained", "--db", str(log.path), "--clients", str(tmp_path / "clients")]
    )
    assert out.exit_code == ExitCode.OK, out.output
    assert "journals: 1 client" in out.stdout


def test_chaos_command_refuses_a_folder_with_an_earlier_run(tmp_path):
    (tmp_path / "tasks.db").write_bytes(b"")
    out = runner.invoke(app, ["chaos", "--dir", str(tmp_path), "--duration", "1"])
    assert out.exit_code == ExitCode.USAGE
    assert "already holds a chaos run" in out.stderr


# ---------------------------------------------------------------- the schedule


def test_a_seed_names_one_schedule():
    a = make_schedule(ChaosConfig(seed=42, duration_s=60))
    assert a == make_schedule(ChaosConfig(seed=42, duration_s=60))
    assert a != make_schedule(ChaosConfig(seed=43, duration_s=60))
    assert all(0 < f.at_s < 59 for f in a)
    assert {f.target for f in a} <= {"broker", "w1", "w2", "w3", "log"}
    assert all(f.action == "kill" for f in a if f.target == "broker")
    assert [f.at_s for f in a] == sorted(f.at_s for f in a)
    # And graceful stops are part of it, of workers only
    stops = [f for f in a if f.action == "term"]
    assert len(stops) >= 4 and all(f.target != "broker" for f in stops)
    # And so are reads of the live log by another process, and only of the log
    reads = [f for f in a if f.action == "read"]
    assert len(reads) >= 10 and {f.target for f in reads} == {"log"}
    assert {f.action for f in a if f.target == "log"} == {"read"}


def test_graceful_stops_and_reads_leave_a_seed_s_kills_and_pauses_as_they_were():
    # Given seed 42, whose first faults were these before graceful stops and reads
    before = [(2.28, "kill", "broker", 0.49), (3.95, "kill", "w3", 1.14)]
    before += [(6.58, "kill", "w1", 0.14), (8.24, "kill", "w1", 0.89)]
    # When its schedule is drawn now, Then its kills and pauses are unchanged: the
    # graceful stops and the reads come from streams of their own
    faults = make_schedule(ChaosConfig(seed=42, duration_s=60))
    others = [
        (f.at_s, f.action, f.target, f.pause_s) for f in faults if f.action in ("kill", "stop")
    ]
    assert others[:4] == before
    assert len(others) == 25


def test_a_log_from_before_spared_attempts_still_verifies(log):
    # Given a clean log whose tasks table has no spared column (migrated before m002)
    log.task(1, ran())
    log.store.conn.execute("ALTER TABLE tasks DROP COLUMN spared")
    log.close()
    # Then it verifies clean, every task taken as spared nothing
    assert check(log.path).violations == []
    assert load_history(log.path, (), ()).tasks[1].spared == 0
