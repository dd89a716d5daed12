"""The history checker: did the queue keep its promises over a run?

It reads the broker's SQLite log (`tasks` and its append-only `events`),
and, when given them, what the other processes were told: each client's
journal of acknowledged submits, each worker's --journal of acknowledged
results and checkpoints, and the start records of the chaos tasks. The
vocabulary is that of the Jepsen checker for RabbitMQ queues.

acknowledged
    Task ids the client journals say the broker acknowledged (one JSON line
    per acknowledged submit: `{"ids": [...], "name": ...}`).
lost
    An acknowledged id missing from `tasks`, recorded under another name,
    acknowledged for two different submits, or (after a drained run) not in a
    final state. Also a result a worker journal records as acknowledged and
    applied (ok, not stale) whose task is not `succeeded` with that attempt,
    and a CANCEL a client journal records as answered (`{"cancel": id,
    "state": ...}`) whose task is not in the state the answer gave.
duplicated
    A completion applied more than once: a task with more than one final
    event (succeeded / failed / dead), a `succeeded` event whose attempt is
    not the task's last attempt, or ok results of two attempts of one task
    both acknowledged as applied in the worker journals.
fenced
    Not a violation: messages of superseded attempts the broker refused,
    counted as `stale` events in the log (and stale ACKs in worker journals).
checkpoint regressions
    Per task, `checkpointed` event numbers that do not strictly increase in
    log order (across attempts); `tasks.checkpoint_no` lower than the highest
    checkpointed event; a checkpoint acknowledged (not stale) in a worker
    journal that the log does not hold; an attempt that started from a
    checkpoint number below the highest one acknowledged for an earlier
    attempt. Where an attempt started is read from the start logs (the chaos
    tasks write `{"id", "attempt", "number"}` as each attempt begins), or
    else from the lowest checkpoint number it sent, minus one (each attempt
    numbers its checkpoints on from the one it received).
fencing violations
    A lease whose attempt is not the previous lease's + 1 (the fencing token
    must grow by one), a lease granted while another attempt was running, an
    event that applies something (adopted, checkpointed, retried, final) for
    an attempt that was not the current running lease, and an attempt that
    ran without a lease in the log or ran twice.
inconsistent
    `tasks.state` differs from the state the last state-changing event
    implies, `tasks.attempt` from the last lease, a task without a
    `submitted` event first, events of a task that does not exist, any
    state-changing event after a final one, or PRAGMA integrity_check not ok.
unfinished
    After a drained run, a task not final that no client journal vouches for
    (with journals, acknowledged ones count as lost instead).
attempts per task
    A histogram of `tasks.attempt`.

Without client journals the checker sees only what the database holds: it
cannot tell whether an acknowledged task is missing, and says so in the
report. `check(..., drained=False)` is for a log whose broker still runs:
tasks not yet final are then not counted.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path

from taskring.verify.checks import (
    CATEGORIES,
    Violation,
    check_checkpoints,
    check_consistency,
    check_duplicated,
    check_fencing,
    check_lost,
    check_unfinished,
)
from taskring.verify.history import History, VerifyError, journal_files, load_history
from taskring.verify.report import Report, format_report

__all__ = [
    "CATEGORIES",
    "History",
    "Report",
    "VerifyError",
    "Violation",
    "check",
    "check_history",
    "format_report",
    "journal_files",
    "load_history",
]


def check(
    db_path: str | Path,
    client_journals: Sequence[str | Path] = (),
    worker_journals: Sequence[str | Path] = (),
    *,
    start_logs: Sequence[str | Path] = (),
    drained: bool = True,
) -> Report:
    """Check a run's history; raises VerifyError when an input cannot be read.

    Journal arguments may name files or folders (their *.jsonl files).
    """
    history = load_history(db_path, client_journals, worker_journals, start_logs)
    return check_history(history, drained=drained)


def check_history(history: History, *, drained: bool = True) -> Report:
    violations = [
        *check_consistency(history),
        *check_lost(history, drained),
        *check_unfinished(history, drained),
        *check_duplicated(history),
        *check_fencing(history),
        *check_checkpoints(history),
    ]
    notes = list(history.notes)
    if history.submits is None:
        notes.append(
            "no client journals: what was acknowledged is unknown, so this checks only "
            "what the database alone can show"
        )
    if not history.files.get("worker"):
        notes.append("no worker journals: acknowledged results and checkpoints not cross-checked")
    if not drained:
        notes.append("live: tasks not final yet are not counted as lost")
    tasks = history.tasks.values()
    stale_events = sum(1 for es in history.events.values() for e in es if e.kind == "stale")
    return Report(
        db=history.db,
        drained=drained,
        tasks=len(history.tasks),
        states=dict(collections.Counter(t.state for t in tasks)),
        acknowledged=(
            None if history.submits is None else len({s.task_id for s in history.submits})
        ),
        fenced=stale_events,
        stale_acks=sum(1 for a in history.acks if a.stale),
        attempts=dict(collections.Counter(t.attempt for t in tasks)),
        integrity=history.integrity,
        files=dict(history.files),
        violations=violations,
        notes=notes,
    )
