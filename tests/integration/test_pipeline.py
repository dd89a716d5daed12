"""The whole pipeline with real processes: a broker and workers started as `taskring` commands."""

from __future__ import annotations

import collections
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from cluster import Cluster, wait_for
from taskring.errors import TaskNotFound

pytestmark = pytest.mark.timeout(120)


def test_a_thousand_tasks_all_succeed_with_correct_results(cluster: Cluster) -> None:
    # Given a broker and three workers
    cluster.start_broker()
    for name in ("w1", "w2", "w3"):
        cluster.start_worker(name)
    cluster.wait_workers("w1", "w2", "w3")
    with cluster.client() as client:
        # When 1,000 tasks are submitted
        ids = client.submit_many("tt_tasks.add", [(i, 2 * i) for i in range(1000)])
        done = client.wait(ids, timeout=60)
    # Then every one succeeded with its own result, and all three workers took part
    assert len(set(ids)) == 1000
    assert [done[i].state for i in ids] == ["succeeded"] * 1000
    assert [done[i].value for i in ids] == [3 * i for i in range(1000)]
    assert {done[i].worker for i in ids} == {"w1", "w2", "w3"}


def test_workers_with_different_task_modules_each_get_only_their_own(cluster: Cluster) -> None:
    # Given a worker running tt_tasks and one running crash_tasks
    cluster.start_broker()
    cluster.start_worker("w-tt", module="tt_tasks")
    cluster.start_worker("w-crash", module="crash_tasks")
    cluster.wait_workers("w-tt", "w-crash")
    with cluster.client() as client:
        # When tasks of both modules are submitted, and one of a module no worker runs
        adds = client.submit_many("tt_tasks.add", [(i, i) for i in range(200)])
        squares = client.submit_many("crash_tasks.square", [(i,) for i in range(200)])
        orphan = client.submit("nobody.runs", 1)
        done = client.wait(adds + squares, timeout=60)
        # Then each ran, with the right result, on the worker that registered it
        assert {(done[i].state, done[i].worker) for i in adds} == {("succeeded", "w-tt")}
        assert {(done[i].state, done[i].worker) for i in squares} == {("succeeded", "w-crash")}
        assert [done[i].value for i in squares] == [i * i for i in range(200)]
        # ... and the task nobody runs waits, queued, instead of failing on a wrong worker
        assert client.status(orphan.id).state == "queued"


def test_tasks_with_the_same_key_run_on_the_same_worker(cluster: Cluster) -> None:
    cluster.start_broker()
    for name in ("w1", "w2", "w3"):
        cluster.start_worker(name)
    cluster.wait_workers("w1", "w2", "w3")
    keys = [f"user-{i % 30}" for i in range(600)]
    with cluster.client() as client:
        ids = client.submit_many(
            "tt_tasks.add", [(i, i) for i in range(600)], key=lambda a: keys[a[0]]
        )
        done = client.wait(ids, timeout=60)
    workers_by_key = collections.defaultdict(set)
    for task_id, key in zip(ids, keys, strict=True):
        assert done[task_id].state == "succeeded"
        workers_by_key[key].add(done[task_id].worker)
    assert all(len(workers) == 1 for workers in workers_by_key.values()), workers_by_key
    assert len({next(iter(w)) for w in workers_by_key.values()}) == 3  # the keys spread out


def test_a_fourth_worker_takes_over_only_its_share_of_keys(cluster: Cluster) -> None:
    cluster.start_broker()
    for name in ("w1", "w2", "w3"):
        cluster.start_worker(name)
    cluster.wait_workers("w1", "w2", "w3")
    keys = [f"account-{i}" for i in range(300)]

    def owners(client) -> dict[str, str]:  # type: ignore[no-untyped-def]
        ids = client.submit_many("tt_tasks.echo", [(k,) for k in keys], key=lambda a: a[0])
        done = client.wait(ids, timeout=60)
        return {done[i].value: done[i].worker for i in ids}

    with cluster.client() as client:
        before = owners(client)
        cluster.start_worker("w4")
        status = cluster.wait_workers("w1", "w2", "w3", "w4")
        after = owners(client)
    moved = [k for k in keys if before[k] != after[k]]
    share = next(w["share"] for w in status["workers"] if w["name"] == "w4")
    # Only keys that now belong to w4 moved, and about w4's share of them
    assert moved and all(after[k] == "w4" for k in moved)
    assert len(moved) / len(keys) <= share + 0.08
    assert {after[k] for k in keys if k not in moved} <= {"w1", "w2", "w3"}


def test_broker_restart_with_sigterm_completes_every_queued_task(cluster: Cluster) -> None:
    # Given many queued tasks and a broker stopped with SIGTERM halfway through
    cluster.start_broker()
    cluster.start_worker("w1", concurrency=2)
    cluster.wait_workers("w1")
    with cluster.client() as client:
        ids = client.submit_many("tt_tasks.nap", [(0.01,) for _ in range(300)])
        wait_for(
            lambda: client.broker_status()["states"].get("succeeded", 0) >= 30,
            30,
            "some tasks to finish",
        )
    assert cluster.stop(cluster.broker) == 0  # type: ignore[arg-type]
    # When a new broker starts on the same database
    cluster.start_broker()
    # Then every task submitted before the restart completes, once
    with cluster.client() as client:
        done = client.wait(ids, timeout=60)
        assert [done[i].state for i in ids] == ["succeeded"] * len(ids)
        history = client.history(ids[-1])[1]
    assert [e["kind"] for e in history].count("succeeded") == 1


def test_a_second_broker_on_a_live_log_exits_with_one_line(cluster: Cluster) -> None:
    # Given a broker serving a log
    cluster.start_broker()
    assert cluster.broker is not None
    # When `taskring broker` is started on the same log, on another endpoint
    second = cluster.run(
        "broker", "--db", str(cluster.db), "--endpoint", f"ipc://{cluster.root}/second.ipc"
    )
    # Then it exits 2 with one line that names the broker holding the log
    assert second.returncode == 2, second.stderr
    assert second.stderr.splitlines() == [
        f"error: task log {str(cluster.db)!r} is in use by another broker "
        f"(pid {cluster.broker.pid}); stop that one first, or give this one another --db"
    ]
    # And the first broker still serves
    status = cluster.status()
    assert status is not None and status["states"] == {}


def test_heartbeats_flow_while_a_task_busy_loops(cluster: Cluster) -> None:
    # Given a worker with a short liveness window (0.2 s x 3)
    cluster.start_broker()
    cluster.start_worker("w1", concurrency=1)
    cluster.wait_workers("w1")
    window = cluster.heartbeat_s * cluster.liveness
    with cluster.client() as client:
        # When a task holds the CPU for three liveness windows
        handle = client.submit("tt_tasks.spin", 3 * window)
        assert handle.result(timeout=30) > 0
        # Then the worker was never declared dead: one lease, one attempt
        info, events = client.history(handle.id)
    assert info.attempt == 1
    assert [e["kind"] for e in events] == ["submitted", "leased", "succeeded"]


def test_a_worker_sigterm_drains_and_leaves_cleanly(cluster: Cluster) -> None:
    cluster.start_broker()
    proc = cluster.start_worker("w1", concurrency=1)
    cluster.wait_workers("w1")
    with cluster.client() as client:
        handle = client.submit("tt_tasks.nap_started", 0.5)

        def started() -> bool:
            # Started in a thread, not only leased: a leased task that has not
            # reached a thread yet is handed back on SIGTERM, not run.
            _, events = client.history(handle.id)
            return any(e["kind"] == "checkpointed" for e in events)

        wait_for(started, 10, "the task to start")
        cluster.signal(proc, signal.SIGTERM)
        assert handle.result(timeout=20) == 0.5  # finished, not abandoned
        assert proc.wait(10) == 0
        assert client.status(handle.id).attempt == 1


def test_a_cancelled_running_task_stops_at_its_next_checkpoint(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Given a worker with one slot running a long task that checkpoints after every unit
    cluster.start_broker()
    cluster.start_worker("w1", module="crash_tasks", concurrency=1)
    cluster.wait_workers("w1")
    log = tmp_path / "units.log"
    with cluster.client() as client:
        handle = client.submit("crash_tasks.units", str(log), 500, 1, 0.01)
        wait_for(lambda: log.exists() and "unit" in log.read_text(), 20, "the task to start")
        # When it is cancelled while it runs
        assert client.cancel([handle.id]) == {handle.id: "cancelled"}
        # Then it stops early: its slot runs the next task, and its log stops growing
        assert client.submit("crash_tasks.square", 7).result(timeout=20) == 49
        units = log.read_text().count("unit,")
        assert units < 500
        time.sleep(0.3)
        assert log.read_text().count("unit,") == units
        # ... and it stays cancelled: the result of the stopped attempt was refused
        info, events = client.history(handle.id)
    assert info is not None and info.state == "cancelled"
    kinds = [e["kind"] for e in events]
    assert kinds[:3] == ["submitted", "leased", "checkpointed"]
    assert "cancelled" in kinds and "succeeded" not in kinds
    assert kinds.count("stale") >= 1


def test_submit_many_keeps_to_a_broker_with_a_smaller_message_limit(cluster: Cluster) -> None:
    # Given a broker that takes messages of 256 KiB at most (and tasks of 64 KiB)
    small = ["--max-payload-bytes", "65536", "--max-checkpoint-bytes", "65536"]
    cluster.start_broker("--max-message-bytes", "262144", *small, "--max-result-bytes", "65536")
    with cluster.client() as client:
        # When 40 tasks of 50 KB arguments are submitted at once (2 MB)
        ids = client.submit_many("tt_tasks.add", [(b"x" * 50_000, i) for i in range(40)])
        # Then the client learnt the limit, and every task was acknowledged
        assert client.broker_limits().max_message_bytes == 262_144
        assert len(set(ids)) == 40
        assert client.broker_status()["states"] == {"queued": 40}


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_a_cancelled_task_that_never_checkpoints_hears_it_within_a_heartbeat(
    cluster: Cluster, pool: str
) -> None:
    # Given a worker with one slot running a task that polls ctx.lease_lost for 30 s
    cluster.start_broker()
    cluster.start_worker("w1", "--pool", pool, module="crash_tasks", concurrency=1)
    cluster.wait_workers("w1")
    with cluster.client() as client:
        handle = client.submit("crash_tasks.until_lease_lost", 30.0)
        wait_for(lambda: client.status(handle.id).state == "running", 20, "the task to start")
        # When it is cancelled
        assert client.cancel([handle.id]) == {handle.id: "cancelled"}
        # Then it stops within moments (a broker heartbeat is 0.2 s here), freeing the slot
        started = time.monotonic()
        assert client.submit("crash_tasks.square", 7).result(timeout=20) == 49
        assert time.monotonic() - started < 10
        assert client.status(handle.id).state == "cancelled"


def test_a_second_broker_on_a_live_ipc_endpoint_exits_and_leaves_it_to_the_first(
    cluster: Cluster,
) -> None:
    # Given a broker serving an ipc endpoint
    cluster.start_broker()
    # When another broker, on another log, is started on the same endpoint
    second = cluster.run(
        "broker", "--db", str(cluster.root / "other.db"), "--endpoint", cluster.endpoint
    )
    # Then it exits 2 with one line, and did not take the endpoint over: libzmq
    # would have deleted the first broker's socket file to bind its own
    assert second.returncode == 2, second.stderr
    assert second.stderr.splitlines() == [
        f"error: {cluster.endpoint} is in use by another process; "
        "give this broker another --endpoint"
    ]
    status = cluster.status()
    assert status is not None and status["states"] == {}
    # And its log was never opened
    assert not (cluster.root / "other.db").exists()


def test_a_broker_replaces_the_ipc_file_of_a_broker_that_died(cluster: Cluster) -> None:
    # Given the socket file of a broker that was killed
    cluster.start_broker()
    assert cluster.broker is not None
    cluster.kill(cluster.broker)
    assert Path(cluster.endpoint.removeprefix("ipc://")).exists()
    # When a broker starts on that endpoint, Then it serves
    cluster.start_broker()
    assert cluster.status() is not None


def test_a_broker_does_not_bind_an_ipc_path_that_is_a_file(cluster: Cluster) -> None:
    # Given a file of value where the endpoint would go
    precious = cluster.root / "precious.db"
    precious.write_bytes(b"keep me")
    # When a broker is started on it, Then it exits 2 with one line, and the file is kept
    run = cluster.run("broker", "--db", str(cluster.db), "--endpoint", f"ipc://{precious}")
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        f"error: ipc://{precious}: {precious} exists and is not a socket"
    ]
    assert precious.read_bytes() == b"keep me"


def test_prune_deletes_the_tasks_that_ended_long_ago_and_nothing_else(cluster: Cluster) -> None:
    # Given twenty tasks that succeeded and one that waits, queued, for a worker
    cluster.start_broker()
    cluster.start_worker("w1")
    cluster.wait_workers("w1")
    with cluster.client() as client:
        ids = client.submit_many("tt_tasks.add", [(i, i) for i in range(20)])
        client.wait(ids, timeout=30)
        waiting = client.submit("nobody.runs", 1).id
    # When `taskring prune --older-than 1h` runs, Then nothing has ended that long ago
    prune = ("prune", "--older-than", "1h", "-e", cluster.endpoint)
    now = cluster.run(*prune)
    assert (now.returncode, now.stdout.split()[:2]) == (0, ["pruned", "0"]), now.stderr
    # Given the same log two hours on: stopped, its finished tasks' last change moved
    # back (the broker is the log's one writer while it runs), and served again
    assert cluster.broker is not None
    cluster.stop(cluster.broker)
    with sqlite3.connect(cluster.db) as conn:
        conn.execute("UPDATE tasks SET updated_at = updated_at - 7200 WHERE state = 'succeeded'")
    conn.close()
    cluster.start_broker()
    # When pruned again, Then the twenty are gone with their history, and the waiting one stays
    later = cluster.run(*prune)
    assert (later.returncode, later.stdout.split()[:2]) == (0, ["pruned", "20"]), later.stderr
    with cluster.client() as client:
        with pytest.raises(TaskNotFound):
            client.status(ids[0])
        assert client.history(ids[-1]) == (None, [])
        assert client.status(waiting).state == "queued"
        assert client.broker_status()["states"] == {"queued": 1}
        # And a new task gets an id never given out before
        assert client.submit("nobody.runs", 2).id == waiting + 1


def test_of_two_live_workers_given_one_name_one_stops_and_says_why(cluster: Cluster) -> None:
    # Given a worker named dup, and a second process started with the same name
    cluster.start_broker()
    first = cluster.start_worker("dup")
    cluster.wait_workers("dup")
    second = cluster.start_worker("dup")
    # Then one of them stops within seconds, exit status 2, saying why
    stopped = wait_for(
        lambda: next((p for p in (first, second) if p.poll() is not None), None),
        20,
        "one of the two processes named dup to stop",
    )
    kept = second if stopped is first else first
    assert stopped.returncode == 2
    assert "'dup' is taken by another live process" in cluster.logs()
    assert kept.poll() is None
    # And the one left runs every task, none dead-lettered by the two fighting over it
    with cluster.client() as client:
        ids = client.submit_many("tt_tasks.add", [(i, i) for i in range(200)])
        done = client.wait(ids, timeout=30)
    assert {done[i].state for i in ids} == {"succeeded"}
