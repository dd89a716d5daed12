"""The invariants, one small function each; every check returns the violations it finds.

Events are read in log order (events.id). `replay` walks one task's events
the way the broker's state machine should have moved: submitted -> queued,
leased -> running (attempt = the lease's), retried -> queued, succeeded /
failed / dead -> final, cancelled (queued or running) -> final. adopted,
checkpointed and stale change nothing.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence

from taskring.protocol import SPARED_NOTE
from taskring.verify.history import Event, History, Task

LOST = "lost"
DUPLICATED = "duplicated"
REGRESSION = "checkpoint regression"
FENCING = "fencing"
INCONSISTENT = "inconsistent"
UNFINISHED = "unfinished"
CATEGORIES = (LOST, DUPLICATED, REGRESSION, FENCING, INCONSISTENT, UNFINISHED)

FINAL = frozenset({"succeeded", "failed", "dead", "cancelled"})
STATE_AFTER = {
    "submitted": "queued",
    "leased": "running",
    "retried": "queued",
    "succeeded": "succeeded",
    "failed": "failed",
    "dead": "dead",
    "cancelled": "cancelled",
}
# Events that apply something to the current lease, so need one. A task is
# cancelled with or without one.
NEEDS_LEASE = frozenset({"adopted", "checkpointed", "retried", *FINAL} - {"cancelled"})


@dataclasses.dataclass(frozen=True, slots=True)
class Violation:
    category: str
    task_id: int | None
    message: str


def replay(events: Sequence[Event]) -> Iterator[tuple[Event, str | None, int]]:
    """Each event with the task's state and current attempt just before it."""
    state: str | None = None
    attempt = 0
    for event in events:
        yield event, state, attempt
        state = STATE_AFTER.get(event.kind, state)
        if event.kind == "leased":
            attempt = event.attempt


# ---------------------------------------------------------------- lost


def check_lost(h: History, drained: bool) -> list[Violation]:
    """Acknowledged tasks missing from the log (or not final after a drain), and results
    a worker was told were applied that the log does not show."""
    found: list[Violation] = []
    seen: dict[int, str] = {}
    for submit in h.submits or []:
        tid, task = submit.task_id, h.tasks.get(submit.task_id)
        if tid in seen:
            found.append(
                Violation(
                    LOST,
                    tid,
                    f"task {tid} was acknowledged for two submits ({seen[tid]}, {submit.source}):"
                    " one of them has no task",
                )
            )
            continue
        seen[tid] = submit.source
        if task is None:
            message = f"task {tid} acknowledged ({submit.source}) is not in the log"
        elif submit.name is not None and task.name != submit.name:
            message = f"task {tid} acknowledged as {submit.name} is {task.name} in the log"
        elif drained and task.state not in FINAL:
            message = f"task {tid} acknowledged ({submit.source}) is still {task.state}"
        else:
            continue
        found.append(Violation(LOST, tid, message))
    for cancel in h.cancels:
        # An answered CANCEL is a promise too: `cancelled` must be in the log for good,
        # and a final state it reported can never have changed.
        task = h.tasks.get(cancel.task_id)
        said = cancel.state or "no such task"
        if task is not None and task.state == cancel.state:
            continue
        now = task.state if task is not None else "not in the log"
        found.append(
            Violation(
                LOST,
                cancel.task_id,
                f"cancel of task {cancel.task_id} was answered {said} ({cancel.source}), "
                f"but the task is {now}",
            )
        )
    for ack in h.acks:
        if ack.kind != "result" or not ack.ok or ack.stale:
            continue
        task = h.tasks.get(ack.task_id)
        if task is None or task.state != "succeeded" or task.attempt != ack.attempt:
            now = f"{task.state} at attempt {task.attempt}" if task else "not in the log"
            found.append(
                Violation(
                    LOST,
                    ack.task_id,
                    f"result of task {ack.task_id} attempt {ack.attempt} was acknowledged to "
                    f"{ack.worker} as applied ({ack.source}), but the task is {now}",
                )
            )
    return found


def check_unfinished(h: History, drained: bool) -> list[Violation]:
    """After a drain, tasks not final that no client journal vouches for (those are lost)."""
    if not drained:
        return []
    acknowledged = {s.task_id for s in h.submits or []}
    return [
        Violation(UNFINISHED, t.id, f"task {t.id} is still {t.state} after the drain")
        for t in h.tasks.values()
        if t.state not in FINAL and t.id not in acknowledged
    ]


# ---------------------------------------------------------------- duplicated


def check_duplicated(h: History) -> list[Violation]:
    """Completions applied more than once: two final events, a success of a superseded
    attempt, or results of two attempts both acknowledged as applied."""
    found: list[Violation] = []
    for tid, events in h.events.items():
        finals = [e for e in events if e.kind in FINAL]
        if len(finals) > 1:
            seen = ", ".join(f"{e.kind} (attempt {e.attempt})" for e in finals)
            found.append(
                Violation(DUPLICATED, tid, f"task {tid} ended {len(finals)} times: {seen}")
            )
        task = h.tasks.get(tid)
        for e in finals:
            if e.kind == "succeeded" and task is not None and e.attempt != task.attempt:
                found.append(
                    Violation(
                        DUPLICATED,
                        tid,
                        f"task {tid} succeeded with attempt {e.attempt}, "
                        f"but its last attempt is {task.attempt}",
                    )
                )
    applied: dict[int, set[int]] = collections.defaultdict(set)
    for ack in h.acks:
        if ack.kind == "result" and ack.ok and not ack.stale:
            applied[ack.task_id].add(ack.attempt)
    for tid, attempts in sorted(applied.items()):
        if len(attempts) > 1:
            listed = ", ".join(map(str, sorted(attempts)))
            found.append(
                Violation(
                    DUPLICATED, tid, f"task {tid}: results of attempts {listed} all acknowledged"
                )
            )
    return found


# ---------------------------------------------------------------- fencing


def check_fencing(h: History) -> list[Violation]:
    """Each lease's attempt is the previous one + 1 and never overlaps a running one;
    only the current lease is applied; every attempt that ran was leased, and ran once."""
    found: list[Violation] = []
    leased: set[tuple[int, int]] = set()
    for tid, events in h.events.items():
        for e, state, attempt in replay(events):
            if state in FINAL:
                continue  # check_consistency reports anything after the end
            if e.kind == "leased":
                leased.add((tid, e.attempt))
                if state == "running":
                    message = f"leased attempt {e.attempt} while attempt {attempt} was running"
                elif e.attempt != attempt + 1:
                    message = f"leased attempt {e.attempt} after attempt {attempt}"
                else:
                    continue
            elif e.kind in NEEDS_LEASE and (state != "running" or e.attempt != attempt):
                message = (
                    f"{e.kind} of attempt {e.attempt} applied while the task was {state} "
                    f"at attempt {attempt}"
                )
            else:
                continue
            found.append(Violation(FENCING, tid, f"task {tid} {message}"))
    runs = collections.Counter((s.task_id, s.attempt) for s in h.starts)
    for (tid, attempt), count in sorted(runs.items()):
        if count > 1:
            found.append(Violation(FENCING, tid, f"task {tid} attempt {attempt} ran {count} times"))
        if (tid, attempt) not in leased:
            found.append(
                Violation(FENCING, tid, f"task {tid} attempt {attempt} ran without a lease")
            )
    return found


# ---------------------------------------------------------------- checkpoints


def check_checkpoints(h: History) -> list[Violation]:
    """Checkpoint numbers only grow; what was acknowledged is kept; a new attempt starts
    from the last acknowledged checkpoint, not from an older one."""
    found: list[Violation] = []
    logged: dict[tuple[int, int], int] = {}  # (task, attempt) -> highest checkpoint applied
    at_lease: dict[tuple[int, int], int] = {}  # (task, attempt) -> checkpoint stored then
    for tid, events in h.events.items():
        last = 0
        for e in events:
            if e.kind == "leased":
                at_lease[(tid, e.attempt)] = last
            if e.kind != "checkpointed":
                continue
            n = e.number
            if n is None:
                found.append(Violation(INCONSISTENT, tid, f"task {tid}: checkpoint without number"))
                continue
            if n <= last:
                found.append(
                    Violation(
                        REGRESSION,
                        tid,
                        f"task {tid} stored checkpoint {n} (attempt {e.attempt}) after {last}",
                    )
                )
            last = max(last, n)
            logged[(tid, e.attempt)] = max(logged.get((tid, e.attempt), 0), n)
        task = h.tasks.get(tid)
        if task is not None and task.checkpoint_no != last:
            found.append(
                Violation(
                    REGRESSION if task.checkpoint_no < last else INCONSISTENT,
                    tid,
                    f"task {tid} holds checkpoint {task.checkpoint_no}, "
                    f"its highest checkpointed event is {last}",
                )
            )
    acked: dict[tuple[int, int], int] = {}  # (task, attempt) -> highest acknowledged
    first: dict[tuple[int, int], int] = {}  # (task, attempt) -> lowest number it sent
    for ack in h.acks:
        if ack.kind != "checkpoint":
            continue
        key = (ack.task_id, ack.attempt)
        first[key] = min(first.get(key, ack.number), ack.number)
        if ack.stale:
            continue
        acked[key] = max(acked.get(key, 0), ack.number)
        if logged.get(key, 0) < ack.number:
            found.append(
                Violation(
                    REGRESSION,
                    ack.task_id,
                    f"checkpoint {ack.number} of task {ack.task_id} attempt {ack.attempt} was "
                    f"acknowledged to {ack.worker} ({ack.source}) but is not in the log",
                )
            )
    durable_by_task: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for (tid, attempt), n in [*logged.items(), *acked.items()]:
        durable_by_task[tid].append((attempt, n))
    # Where each attempt started: the start logs say it; else its first checkpoint - 1.
    starts = {key: n - 1 for key, n in first.items()}
    starts.update({(s.task_id, s.attempt): s.number for s in h.starts})
    for (tid, attempt), start in sorted(starts.items()):
        durable = max((n for a, n in durable_by_task[tid] if a < attempt), default=0)
        if start < durable:
            found.append(
                Violation(
                    REGRESSION,
                    tid,
                    f"task {tid} attempt {attempt} started from checkpoint {start}, "
                    f"but checkpoint {durable} was acknowledged before",
                )
            )
        elif start > at_lease.get((tid, attempt), start):
            found.append(
                Violation(
                    INCONSISTENT,
                    tid,
                    f"task {tid} attempt {attempt} started from checkpoint {start}, "
                    f"the log held {at_lease[(tid, attempt)]} when it was leased",
                )
            )
    return found


# ---------------------------------------------------------------- consistency


def check_consistency(h: History) -> list[Violation]:
    """The tasks table agrees with its events, a final task never changes again,
    and SQLite finds the file sound."""
    found: list[Violation] = []
    if h.integrity != "ok":
        found.append(Violation(INCONSISTENT, None, f"PRAGMA integrity_check: {h.integrity}"))
    for tid in sorted(h.events.keys() - h.tasks.keys()):
        found.append(Violation(INCONSISTENT, tid, f"events of task {tid}, which is not in tasks"))
    for tid, task in h.tasks.items():
        events = h.events.get(tid, [])
        if not events or events[0].kind != "submitted":
            found.append(Violation(INCONSISTENT, tid, f"task {tid} has no submitted event first"))
        state, attempt = None, 0
        for e, state_before, _ in replay(events):
            changes = e.kind in STATE_AFTER or e.kind in NEEDS_LEASE
            again = e.kind == "submitted" and state_before is not None
            if changes and (state_before in FINAL or again):
                found.append(
                    Violation(
                        INCONSISTENT,
                        tid,
                        f"task {tid}: {e.kind} (attempt {e.attempt}) after it was {state_before}",
                    )
                )
            state = STATE_AFTER.get(e.kind, state)
            attempt = e.attempt if e.kind == "leased" else attempt
        if task.state != state:
            found.append(
                Violation(INCONSISTENT, tid, f"task {tid} is {task.state}; its events say {state}")
            )
        if task.attempt != attempt:
            found.append(
                Violation(
                    INCONSISTENT,
                    tid,
                    f"task {tid} has attempt {task.attempt}; its last lease is attempt {attempt}",
                )
            )
        found += _check_spared(task, events)
    return found


def _check_spared(task: Task, events: Sequence[Event]) -> list[Violation]:
    """Spared attempts agree with their events, and a dead task used up its attempts."""
    found = []
    spared = sum(e.kind == "retried" and (e.detail or "").startswith(SPARED_NOTE) for e in events)
    if task.spared != spared:
        message = f"task {task.id} has {task.spared} spared attempts; its events spare {spared}"
        found.append(Violation(INCONSISTENT, task.id, message))
    counted = task.attempt - task.spared
    if task.state == "dead" and counted < task.max_attempts:
        message = f"task {task.id} is dead after {counted} counted attempts of {task.max_attempts}"
        found.append(Violation(INCONSISTENT, task.id, message))
    return found
