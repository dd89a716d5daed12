"""Chosen crashes with real processes and real signals, then the invariants of DESIGN.md.

Each test starts `python -m taskring` processes through the `cluster` fixture
(heartbeat 0.2 s x liveness 3), kills or freezes one of them at a chosen
moment with SIGKILL or SIGSTOP, and checks what must hold afterwards against
three witnesses that the crash cannot corrupt: the broker's SQLite log, the
workers' --journal of what the broker acknowledged, and the tasks' own logs
of the work they did (tests/support/crash_tasks.py).
"""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cluster import Cluster, wait_for
from taskring import protocol
from taskring.client import Client
from taskring.clock import wall_clock

pytestmark = pytest.mark.chaos

SLACK_S = 0.6  # scheduling delay allowed on top of protocol timings on a loaded 2-core machine


# ---------------------------------------------------------------- witnesses


def lines(path: Path) -> list[str]:
    """Whole lines of a file that another process appends to (a torn last line is skipped)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


def journal(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(path)]


def acked_checkpoints(path: Path, task_id: int, attempt: int) -> list[int]:
    """Checkpoint numbers the broker acknowledged as applied (not stale) to this attempt."""
    return [
        r["number"]
        for r in journal(path)
        if r["kind"] == "checkpoint"
        and r["id"] == task_id
        and r["attempt"] == attempt
        and not r["stale"]
    ]


def work_log(path: Path) -> tuple[dict[int, int], list[tuple[int, int]]]:
    """crash_tasks.units' log: {attempt: state it started from}, [(attempt, unit)] in order."""
    starts: dict[int, int] = {}
    units: list[tuple[int, int]] = []
    for line in lines(path):
        kind, attempt, value = line.split(",")
        if kind == "start":
            starts[int(attempt)] = int(value)
        else:
            units.append((int(attempt), int(value)))
    return starts, units


def blocked_in_call(submits: Path) -> bool:
    """The submitter's last line says it is inside a submit call."""
    last = lines(submits)[-1:]
    return bool(last) and last[0].startswith("call")


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute(sql, params).fetchall()


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in events]


def running_on(client: Client, task_id: int) -> str | None:
    info = client.status(task_id)
    return info.worker if info.state == protocol.RUNNING else None


def leased_to(client: Client, task_id: int, attempt: int) -> dict[str, Any] | None:
    _, events = client.history(task_id)
    return next((e for e in events if e["kind"] == "leased" and e["attempt"] == attempt), None)


def start_workers(
    cluster: Cluster, *names: str, concurrency: int = 1, extra: tuple[str, ...] = ()
) -> dict[str, tuple[subprocess.Popen[bytes], Path]]:
    """Workers running crash_tasks, each with its journal; waits until all registered."""
    started = {}
    for name in names:
        path = cluster.root / f"{name}.journal"
        proc = cluster.start_worker(
            name, "--journal", str(path), *extra, module="crash_tasks", concurrency=concurrency
        )
        started[name] = (proc, path)
    cluster.wait_workers(*names)
    return started


def restart_broker(cluster: Cluster) -> float:
    """SIGKILL the broker, then start a new one on the same database; the kill's wall time."""
    assert cluster.broker is not None
    killed_at = wall_clock()  # wall clock, as the journals and the log have it
    cluster.kill(cluster.broker)
    cluster.start_broker()
    return killed_at


# ---------------------------------------------------------------- 1. worker killed


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_a_killed_worker_s_task_resumes_elsewhere_from_its_last_acknowledged_checkpoint(
    cluster: Cluster, pool: str
) -> None:
    # Given two workers and a long task that checkpoints every 4 units of 0.1 s
    cluster.start_broker()
    workers = start_workers(cluster, "w1", "w2", extra=("--pool", pool))
    work = cluster.root / "units.log"
    n, per = 24, 4
    window_s = cluster.heartbeat_s * cluster.liveness
    with cluster.client() as client:
        handle = client.submit("crash_tasks.units", str(work), n, per, 0.1)
        first = wait_for(lambda: running_on(client, handle.id), 10, "the task to start")
        other = next(name for name in workers if name != first)
        proc, first_journal = workers[first]

        # When its worker is SIGKILLed just after its second checkpoint was acknowledged
        wait_for(
            lambda: len(acked_checkpoints(first_journal, handle.id, 1)) >= 2,
            10,
            "two acknowledged checkpoints",
            interval_s=0.005,
        )
        killed_at = wall_clock()  # wall clock, to compare with the log's event times
        cluster.kill(proc)
        acked = max(acked_checkpoints(first_journal, handle.id, 1))

        # Then the other worker gets attempt 2 within the liveness window
        lease = wait_for(lambda: leased_to(client, handle.id, 2), 10, "attempt 2 to be leased")
        assert lease["worker"] == other
        assert lease["at"] - killed_at <= window_s + SLACK_S
        value = handle.result(timeout=30)
        info, events = client.history(handle.id)

    # and attempt 2 started from the last acknowledged checkpoint, continuing its numbering
    starts, units = work_log(work)
    assert starts == {1: 0, 2: acked * per}
    assert acked_checkpoints(workers[other][1], handle.id, 2)[0] == acked + 1
    # and no unit before that checkpoint was done twice; at most one checkpoint's worth was
    # (a process pool's child outlives its killed worker briefly, but cannot checkpoint)
    done = collections.Counter(unit for _, unit in units)
    assert set(done) == set(range(n))
    assert all(done[unit] == 1 for unit in range(acked * per)), done
    assert len(units) <= n + per
    assert value["attempt"] == 2 and value["done"] == n
    if pool == "thread":
        assert value["pid"] == workers[other][0].pid
    assert info is not None and info.attempt == 2
    assert kinds(events).count("succeeded") == 1


# ---------------------------------------------------------------- 2. broker killed


def check_log_after_broker_crash(
    cluster: Cluster, ids: list[int], journals: list[Path], killed_at: float | None = None
) -> dict[int, Any]:
    """Every task completes exactly once; the workers' acknowledged results are all kept."""
    with cluster.client(timeout_s=20) as client:
        done = client.wait(ids, timeout=40)
        assert [info.state for info in done.values()] == ["succeeded"] * len(ids)
    assert cluster.broker is not None
    assert cluster.stop(cluster.broker) == 0
    rows = dict(query(cluster.db, "SELECT id, attempt FROM tasks WHERE state = 'succeeded'"))
    assert set(ids) <= rows.keys()
    # A result acknowledged to a worker (and not refused as stale) is the one in the log.
    records = [
        r
        for path in journals
        for r in journal(path)
        if r["kind"] == "result" and r["ok"] and not r["stale"]
    ]
    if killed_at is not None:  # the crashed broker had acknowledged some of them
        assert any(r["at"] < killed_at for r in records)
    acknowledged = [(r["id"], r["attempt"]) for r in records]
    kept = [(i, a) for i, a in acknowledged if rows.get(i) == a]
    assert kept == acknowledged
    # Each task succeeded once, whatever the crash interrupted.
    twice = query(
        cluster.db,
        "SELECT task_id FROM events WHERE kind = 'succeeded' GROUP BY task_id HAVING count(*) > 1",
    )
    assert twice == []
    assert query(cluster.db, "PRAGMA integrity_check") == [("ok",)]
    return done


def test_broker_killed_in_a_burst_of_submits_loses_no_acknowledged_task(cluster: Cluster) -> None:
    # Given a client process submitting 400 tasks, four SUBMITs in flight at a time
    cluster.start_broker()
    workers = start_workers(cluster, "w1", "w2", concurrency=4)
    acks = cluster.root / "submits.log"
    submitter = cluster.start_script(
        "submitter.py", cluster.endpoint, str(acks), "400", "--window", "4"
    )

    # When the broker is SIGKILLed in the middle of the burst and started again
    wait_for(lambda: sum(1 for s in lines(acks) if s.startswith("ok")) >= 100, 20, "100 acks")
    killed_at = restart_broker(cluster)

    # Then the client rode out the outage, and every acknowledged id is its own task
    assert submitter.wait(40) == 0, lines(acks)[-3:]
    acked = {
        int(i): int(task_id) for _, i, task_id in (s.split() for s in lines(acks) if s[:2] == "ok")
    }
    assert sorted(acked) == list(range(400))
    journals = [p for _, p in workers.values()]
    done = check_log_after_broker_crash(cluster, sorted(acked.values()), journals, killed_at)
    assert all(done[task_id].value == i * i for i, task_id in acked.items())
    # and no resend created a second task
    assert query(cluster.db, "SELECT count(*) FROM tasks") == [(400,)]


@pytest.mark.parametrize("phase", ["dispatch", "results"])
def test_broker_killed_while_tasks_run_keeps_every_acknowledged_result(
    cluster: Cluster, phase: str
) -> None:
    # Given two workers and a thousand short tasks
    cluster.start_broker()
    workers = start_workers(cluster, "w1", "w2", concurrency=4)
    with cluster.client() as client:
        ids = client.submit_many("crash_tasks.whoami", [(0.002,)] * 1000)
        # When the broker is SIGKILLed as the first TASKs leave it, or while results stream in
        if phase == "results":
            wait_for(
                lambda: client.broker_status()["states"].get("succeeded", 0) >= 300,
                20,
                "300 results",
                interval_s=0.01,
            )
    killed_at = restart_broker(cluster)
    # Then every task completes once, and every result acknowledged before the crash is kept
    journals = [p for _, p in workers.values()]
    check_log_after_broker_crash(cluster, ids, journals, killed_at if phase == "results" else None)


# ---------------------------------------------------------------- 2b. the live log read elsewhere


def test_a_live_log_opened_and_closed_elsewhere_keeps_what_is_acknowledged_after(
    cluster: Cluster,
) -> None:
    # Given a broker with full durability (the default) and 50 acknowledged tasks
    cluster.start_broker()
    start_workers(cluster, "w1")
    with cluster.client() as client:
        before = client.submit_many("crash_tasks.whoami", [(0,)] * 50)
    # When another process opens the live log, reads it and closes it, as a
    # sqlite3 shell would (query() opens it read-write)
    assert query(cluster.db, "SELECT count(*) FROM tasks") == [(50,)]
    # and 50 more tasks are acknowledged before the broker is SIGKILLed
    with cluster.client() as client:
        after = client.submit_many("crash_tasks.whoami", [(0,)] * 50)
    restart_broker(cluster)
    # Then the log still has every acknowledged task: the other process did not
    # delete the WAL that the broker went on committing into
    rows = query(cluster.db, "SELECT id FROM tasks ORDER BY id")
    assert [task_id for (task_id,) in rows] == sorted(before + after)


# ---------------------------------------------------------------- 3. leases survive a restart


def test_a_worker_keeps_its_lease_through_a_broker_restart(cluster: Cluster) -> None:
    # Given a worker running a long task that has checkpointed
    cluster.start_broker()
    workers = start_workers(cluster, "w1")
    proc, path = workers["w1"]
    work = cluster.root / "units.log"
    with cluster.client() as client:
        handle = client.submit("crash_tasks.units", str(work), 20, 5, 0.1)
        wait_for(lambda: acked_checkpoints(path, handle.id, 1), 10, "a checkpoint")

    # When the broker is SIGKILLed and started again while the task runs
    restart_broker(cluster)

    # Then the worker registers again, the broker re-adopts the lease, and the task ends once
    with cluster.client(timeout_s=20) as client:
        value = client.result(handle.id, timeout=30)
        info, events = client.history(handle.id)
    starts, units = work_log(work)
    assert starts == {1: 0}
    assert units == [(1, unit) for unit in range(20)]
    assert value == {"attempt": 1, "pid": proc.pid, "done": 20}
    assert info is not None and info.attempt == 1
    assert kinds(events).count("adopted") == 1
    assert kinds(events).count("succeeded") == 1
    assert "retried" not in kinds(events)
    assert {e["attempt"] for e in events if e["kind"] != "submitted"} == {1}
    # checkpoints made during and after the outage are all stored, in order
    assert acked_checkpoints(path, handle.id, 1) == [1, 2, 3]


# ---------------------------------------------------------------- 4. clients ride an outage


def test_clients_submitting_through_an_outage_get_one_task_per_submit(cluster: Cluster) -> None:
    # Given a client process submitting, four SUBMITs in flight at a time
    cluster.start_broker()
    cluster.start_worker("w1", module="crash_tasks")
    steady, late = cluster.root / "steady.log", cluster.root / "late.log"
    clients = [
        cluster.start_script("submitter.py", cluster.endpoint, str(steady), "200", "--window", "4")
    ]
    wait_for(lambda: sum(1 for s in lines(steady) if s.startswith("ok")) >= 20, 20, "20 acks")

    # When the broker dies mid-stream, and a new client starts submitting while it is down
    assert cluster.broker is not None
    cluster.kill(cluster.broker)
    clients.append(
        cluster.start_script("submitter.py", cluster.endpoint, str(late), "40", "--window", "4")
    )
    for path in (steady, late):
        wait_for(lambda p=path: blocked_in_call(p), 10, "a submit waiting for the broker")
    cluster.start_broker()

    # Then both finish, and the log has exactly one task per submitted item
    assert [c.wait(40) for c in clients] == [0, 0]
    calls = [sum(1 for s in lines(path) if s.startswith("call")) for path in (steady, late)]
    assert calls == [50, 10]  # 4 tasks a call, one SUBMIT each
    rows = query(cluster.db, "SELECT client, client_seq, client_idx, payload FROM tasks")
    by_client = collections.defaultdict(list)
    for client_id, seq, idx, payload in rows:
        by_client[client_id].append((seq, idx, protocol.unpack(payload)[0][0]))
    assert sorted(len(v) for v in by_client.values()) == [40, 200]
    for tasks in by_client.values():
        # one SUBMIT per item (batch=1), numbered without a gap (after the one STATUS that
        # asked the broker's limits): every resend kept its sequence number
        seqs = sorted(seq for seq, _, _ in tasks)
        assert seqs == list(range(2, len(tasks) + 2))
        assert sorted(i for _, _, i in tasks) == list(range(len(tasks)))


# ---------------------------------------------------------------- 5. fencing


def test_a_frozen_worker_s_late_checkpoint_and_result_are_recorded_not_applied(
    cluster: Cluster,
) -> None:
    # Given two workers and a long task with frequent checkpoints
    cluster.start_broker()
    workers = start_workers(cluster, "w1", "w2")
    work = cluster.root / "units.log"
    n, per = 30, 3
    with cluster.client() as client:
        handle = client.submit("crash_tasks.units", str(work), n, per, 0.1)
        first = wait_for(lambda: running_on(client, handle.id), 10, "the task to start")
        other = next(name for name in workers if name != first)
        proc, first_journal = workers[first]
        wait_for(
            lambda: acked_checkpoints(first_journal, handle.id, 1),
            10,
            "a checkpoint",
            interval_s=0.005,
        )

        # When its worker is frozen until the task is leased to the other worker, then resumed
        cluster.signal(proc, signal.SIGSTOP)
        try:
            lease = wait_for(lambda: leased_to(client, handle.id, 2), 10, "attempt 2")
        finally:
            cluster.signal(proc, signal.SIGCONT)
        assert lease["worker"] == other

        # Then its late checkpoint and result are acknowledged as stale
        def stale_records() -> list[dict[str, Any]]:
            return [r for r in journal(first_journal) if r["stale"]]

        stale = wait_for(lambda: len(stale_records()) >= 2 and stale_records(), 20, "stale acks")
        value = handle.result(timeout=30)
        info, events = client.history(handle.id)

    assert [(r["kind"], r["id"], r["attempt"]) for r in stale] == [
        ("checkpoint", handle.id, 1),
        ("result", handle.id, 1),
    ]
    # recorded in the log as stale
    refused = [e["detail"] for e in events if e["kind"] == "stale"]
    assert [(e["attempt"], e["worker"]) for e in events if e["kind"] == "stale"] == [(1, first)] * 2
    assert "checkpoint of attempt 1 refused" in refused[0]
    assert "result of attempt 1 refused" in refused[1]
    # and never applied: attempt 1's stored checkpoints are those acknowledged as applied,
    applied = [e for e in events if e["kind"] == "checkpointed" and e["attempt"] == 1]
    assert len(applied) == len(acked_checkpoints(first_journal, handle.id, 1))
    # the last stored checkpoint is attempt 2's, and the result is attempt 2's
    last = acked_checkpoints(workers[other][1], handle.id, 2)[-1]
    assert query(cluster.db, "SELECT checkpoint_no FROM tasks WHERE id = ?", handle.id) == [(last,)]
    assert value == {"attempt": 2, "pid": workers[other][0].pid, "done": n}
    assert info is not None and info.attempt == 2 and info.worker == other
    assert [(e["attempt"], e["worker"]) for e in events if e["kind"] == "succeeded"] == [(2, other)]
    assert proc.poll() is None  # the resumed worker lives on


def test_a_resumed_worker_is_not_sent_more_than_it_can_run_beside_its_lost_task(
    cluster: Cluster,
) -> None:
    # Given two one-slot workers, one of them frozen until its long task moved to the other
    cluster.start_broker()
    workers = start_workers(cluster, "w1", "w2")
    work = cluster.root / "units.log"
    with cluster.client() as client:
        handle = client.submit("crash_tasks.units", str(work), 20, 10, 0.1)
        first = wait_for(lambda: running_on(client, handle.id), 10, "the task to be leased")
        wait_for(lambda: work_log(work)[0], 10, "the task to start")
        proc = workers[first][0]
        cluster.signal(proc, signal.SIGSTOP)
        try:
            wait_for(lambda: leased_to(client, handle.id, 2), 10, "attempt 2")
            # When tasks wait for a free slot as the frozen worker comes back, still
            # running its superseded attempt (it reports it in `held`)
            quick = client.submit_many("crash_tasks.square", [(i,) for i in range(5)])
        finally:
            cluster.signal(proc, signal.SIGCONT)
        # Then they run once its slot is free: none is refused by a full worker, none dies
        done = client.wait(quick, timeout=30)
        assert [(info.state, info.attempt) for info in done.values()] == [("succeeded", 1)] * 5
        assert client.result(handle.id, timeout=30)["attempt"] == 2


def test_a_draining_worker_does_not_use_up_the_attempts_of_queued_tasks(
    cluster: Cluster,
) -> None:
    # Given a worker with three slots, one running a long task
    cluster.start_broker()
    proc = cluster.start_worker("w1", module="crash_tasks", concurrency=3)
    cluster.wait_workers("w1")
    with cluster.client() as client:
        long = client.submit("crash_tasks.whoami", 1.0)
        wait_for(lambda: running_on(client, long.id), 10, "the long task to start")
        # When it is asked to stop (it drains) and tasks are submitted meanwhile
        cluster.signal(proc, signal.SIGTERM)
        quick = client.submit_many("crash_tasks.square", [(i,) for i in range(3)])
        assert proc.wait(10) == 0
        # Then they wait for another worker with attempts left, and run there
        cluster.start_worker("w2", module="crash_tasks")
        done = client.wait(quick, timeout=20)
    assert [info.state for info in done.values()] == ["succeeded"] * 3


def test_a_worker_stopped_while_its_broker_is_down_starts_nothing_more(
    cluster: Cluster,
) -> None:
    # Given a worker with one slot running a 3 s task, and two more tasks waiting in it
    cluster.start_broker()
    # (a flush timeout that outlasts the broker's restart on a loaded machine)
    extra = ("--prefetch", "2", "--flush-timeout", "30")
    proc = cluster.start_worker("w1", *extra, module="crash_tasks", concurrency=1)
    cluster.wait_workers("w1")
    logs = [cluster.root / f"task-{i}.log" for i in range(3)]
    (worker_log,) = cluster.root.glob("*-worker-w1.log")
    with cluster.client(timeout_s=30) as client:
        long = client.submit("crash_tasks.units", str(logs[0]), 30, 100, 0.1)
        wait_for(lambda: lines(logs[0]), 10, "the long task to start")
        waiting = [client.submit("crash_tasks.units", str(log), 1, 100, 0.0).id for log in logs[1:]]
        wait_for(lambda: all(running_on(client, i) == "w1" for i in waiting), 10, "the leases")
        # When the broker dies, and once the worker has noticed (it dropped its
        # connection) it is asked to stop, with no broker to tell that it drains
        cluster.kill(cluster.broker)  # type: ignore[arg-type]
        wait_for(lambda: "broker silent for" in worker_log.read_text(), 10, "the worker to notice")
        assert len(lines(logs[0])) < 25, "the long task ended too soon for this test"
        cluster.signal(proc, signal.SIGTERM)
        # And the long task finishes, freeing the slot, before the broker is back
        wait_for(lambda: len(lines(logs[0])) == 31, 10, "the long task to finish")
        time.sleep(0.3)  # long enough for the freed slot to start the next task
        cluster.start_broker()
        # Then the worker started neither waiting task, handed them back and left
        assert proc.wait(20) == 0
        assert [lines(log) for log in logs[1:]] == [[], []]
        # And another worker runs each of them once, without using up an attempt
        cluster.start_worker("w2", module="crash_tasks", concurrency=1)
        done = client.wait([long.id, *waiting], timeout=30)
    assert [(info.state, info.worker) for info in done.values()] == [
        ("succeeded", "w1"),
        ("succeeded", "w2"),
        ("succeeded", "w2"),
    ]
    assert [lines(log) for log in logs[1:]] == [["start,2,0", "unit,2,0"]] * 2
    assert [done[i].spared for i in waiting] == [1, 1]


# ---------------------------------------------------------------- 6. poison tasks


def test_a_poison_task_is_dead_lettered_while_the_process_pool_restarts_its_children(
    cluster: Cluster,
) -> None:
    # Given a worker with a pool of two child processes
    cluster.start_broker()
    proc = cluster.start_worker("w1", "--pool", "process", module="crash_tasks", concurrency=2)
    cluster.wait_workers("w1")
    deaths = cluster.root / "poison.log"
    with cluster.client() as client:
        before = client.wait(client.submit_many("crash_tasks.whoami", [(0.05,)] * 4), timeout=20)
        # When a task that kills its process is submitted among others
        poison = client.submit("crash_tasks.poison", str(deaths))
        others = client.submit_many("crash_tasks.whoami", [(0.05,)] * 20)
        done = client.wait([poison.id, *others], timeout=40)
        # Then it is dead-lettered after its three attempts, with the reason
        assert done[poison.id].state == "dead"
        assert done[poison.id].attempt == 3
        error = done[poison.id].error or ""
        assert "worker process died (exit code 17)" in error
        assert "gave up after 3 of 3 attempts" in error
        # and every other task succeeded, in child processes of the one worker process
        assert [done[i].state for i in others] == ["succeeded"] * len(others)
        killed = {int(pid) for pid in lines(deaths)}
        assert len(killed) == 3
        after = client.wait(client.submit_many("crash_tasks.whoami", [(0.05,)] * 4), timeout=20)
        assert cluster.status()["workers"][0]["pid"] == proc.pid  # type: ignore[index]
    assert proc.poll() is None
    pids = {info.value for info in [*before.values(), *after.values()]}
    assert proc.pid not in pids
    # the dead children were replaced: tasks after the poison ran in new processes
    served_after = {info.value for info in after.values()}
    assert served_after.isdisjoint(killed)
    assert not served_after <= {info.value for info in before.values()}


def test_a_poison_task_that_kills_whole_workers_is_dead_lettered(cluster: Cluster) -> None:
    # Given three thread-pool workers, restarted by a supervisor when they die
    cluster.start_broker()
    names = ("w1", "w2", "w3")
    for name in names:
        cluster.start_worker(name, module="crash_tasks", concurrency=2)
    cluster.wait_workers(*names)
    deaths = cluster.root / "poison.log"
    restarts = collections.Counter[str]()
    with cluster.client() as client:
        # When a task that kills its worker process is submitted among others
        # (they may share a worker with the poison and die with it: attempts to spare)
        poison = client.submit("crash_tasks.poison", str(deaths))
        others = [client.submit("crash_tasks.whoami", 0.02, max_attempts=10).id for _ in range(30)]

        def supervise() -> bool:
            for name in names:
                if cluster.workers[name].poll() is not None:
                    restarts[name] += 1
                    cluster.start_worker(name, module="crash_tasks", concurrency=2)
            return all(info.done for info in client.wait([poison.id, *others], timeout=0).values())

        wait_for(supervise, 40, "every task to finish", interval_s=0.1)
        done = client.wait([poison.id, *others], timeout=5)

    # Then the poison task is dead after its three counted attempts, the others all
    # succeeded. A lease granted while the poison waited behind running tasks is spared
    # (the worker likely died of something else), at most three times: 3 to 6 leases,
    # each of which ran it and killed its worker
    assert done[poison.id].state == "dead"
    assert 3 <= done[poison.id].attempt <= 6
    error = done[poison.id].error or ""
    assert "worker w" in error and "gave up after 3 of 3 attempts" in error, error
    assert [done[i].state for i in others] == ["succeeded"] * len(others)
    assert len(set(lines(deaths))) == done[poison.id].attempt
    assert sum(restarts.values()) >= 2  # the third death may come after the last check
