"""Worker parts without sockets: the runner, the task context, module loading, the inbox."""

from __future__ import annotations

import dataclasses
import os
import re
import select
from typing import Any

import pytest
from tests.unit import worker_tasks  # noqa: F401 - registers the wt.* tasks

from taskring import protocol
from taskring.errors import TaskringError
from taskring.protocol import Assignment
from taskring.registry import registered
from taskring.workers import TaskContext, Worker, WorkerConfigError, WorkerSettings
from taskring.workers.inbox import Inbox
from taskring.workers.loading import load_modules
from taskring.workers.pools import WaitingLine
from taskring.workers.runner import run_assignment


def run(name: str, *args: Any, payload: bytes | None = None, **kwargs: Any) -> Any:
    packed = protocol.pack([list(args), kwargs]) if payload is None else payload
    a = Assignment(id=1, attempt=1, name=name, payload=packed, state=None, number=0)
    return run_assignment(a, registered(), lambda *_: False)


def test_a_return_value_is_packed() -> None:
    outcome = run("wt.add", 2, b=3)
    assert (outcome.ok, protocol.unpack(outcome.value), outcome.error) == (True, 5, None)


def test_an_unknown_name_lists_what_this_worker_registered() -> None:
    outcome = run("wt.missing")
    assert outcome.ok is False and outcome.retry is False
    assert outcome.error.startswith("unknown task 'wt.missing': this worker registered ")
    assert "wt.add" in outcome.error


@pytest.mark.parametrize("payload", [b"\xc1", protocol.pack("not a list"), protocol.pack([1, 2])])
def test_an_undecodable_payload_is_not_retried(payload: bytes) -> None:
    outcome = run("wt.add", payload=payload)
    assert outcome.ok is False and outcome.retry is False
    assert outcome.error.startswith("cannot decode task 'wt.add': ")


def test_an_exception_is_retried_with_type_message_and_traceback_tail() -> None:
    outcome = run("wt.fail", "boom")
    assert outcome.ok is False and outcome.retry is True
    first, *rest = outcome.error.splitlines()
    assert first == "ValueError: boom"
    assert "worker_tasks.py" in "\n".join(rest) and "raise ValueError(message)" in outcome.error


def test_an_unpackable_return_value_is_not_retried() -> None:
    outcome = run("wt.unpackable")
    assert outcome.ok is False and outcome.retry is False
    assert "cannot be encoded with msgpack" in outcome.error


def test_an_async_task_is_refused_clearly() -> None:
    outcome = run("wt.async")
    assert outcome.retry is False and "async tasks are not supported" in outcome.error


def test_checkpoint_numbers_packs_and_updates_state() -> None:
    sent: list[tuple[int, int, int, bytes]] = []

    def send(task_id: int, attempt: int, number: int, state: bytes) -> bool:
        sent.append((task_id, attempt, number, state))
        return number == 5

    ctx = TaskContext(3, 2, {"i": 3}, 3, send)
    ctx.checkpoint((1, 2))
    assert sent == [(3, 2, 4, protocol.pack([1, 2]))]
    assert (ctx.state, ctx.number, ctx.lease_lost) == ([1, 2], 4, False)  # as msgpack gives back
    ctx.checkpoint("x")
    assert ctx.lease_lost is True  # stale: recorded, not applied; no exception


def test_checkpoint_rejects_what_msgpack_cannot_hold() -> None:
    ctx = TaskContext(1, 1, None, 0, lambda *_: pytest.fail("nothing should be sent"))
    with pytest.raises(TypeError, match="checkpoint state must be msgpack data"):
        ctx.checkpoint({object()})
    small = protocol.Limits(max_checkpoint_bytes=8)
    ctx = TaskContext(1, 1, None, 0, lambda *_: False, limits=small)
    with pytest.raises(ValueError, match="exceeds max_checkpoint_bytes"):
        ctx.checkpoint("x" * 100)
    assert (ctx.state, ctx.number) == (None, 0)


def test_a_missing_module_is_one_clear_line() -> None:
    with pytest.raises(WorkerConfigError) as e:
        load_modules(["no_such_tasks_module"])
    assert str(e.value) == (
        "cannot import module 'no_such_tasks_module': No module named 'no_such_tasks_module'"
    )
    assert isinstance(e.value, TaskringError)


def test_a_module_without_tasks_is_an_error() -> None:
    with pytest.raises(WorkerConfigError, match="module 'json' registers no tasks"):
        Worker(WorkerSettings(modules=("json",)))


def test_a_module_imported_before_still_counts_its_tasks() -> None:
    assert "wt.add" in load_modules(["tests.unit.worker_tasks"])


def test_settings_are_checked() -> None:
    with pytest.raises(WorkerConfigError, match="pool must be"):
        WorkerSettings(pool="fork")  # type: ignore[arg-type]
    with pytest.raises(WorkerConfigError, match="concurrency"):
        WorkerSettings(concurrency=0)
    with pytest.raises(WorkerConfigError, match=r"prefetch must be 0\.\.990"):
        WorkerSettings(concurrency=10, prefetch=991)
    with pytest.raises(WorkerConfigError, match="prefetch"):
        WorkerSettings(prefetch=-1)
    assert WorkerSettings(concurrency=8, prefetch=0).capacity == 8
    assert WorkerSettings(name="w1").worker_name() == "w1"
    # The default: host, pid and a random part, which two processes of one pid get apart
    default = WorkerSettings().worker_name()
    assert re.fullmatch(rf".+-{os.getpid()}-[0-9a-f]{{4}}", default)
    names = {WorkerSettings().worker_name() for _ in range(20)}
    assert len(names) > 1


@pytest.mark.parametrize(("concurrency", "prefetch"), [(1, 1), (8, 8), (500, 500), (600, 400)])
def test_prefetch_defaults_to_concurrency_within_1000_held(concurrency: int, prefetch: int) -> None:
    settings = WorkerSettings(concurrency=concurrency)
    assert (settings.prefetched, settings.capacity) == (prefetch, concurrency + prefetch)
    # And the default follows a concurrency changed later
    again = dataclasses.replace(settings, concurrency=2)
    assert (again.prefetched, again.capacity) == (2, 4)


def test_the_inbox_wakes_a_poller_and_refuses_puts_after_close() -> None:
    inbox = Inbox()
    assert select.select([inbox.fileno()], [], [], 0)[0] == []
    assert inbox.put("a") and inbox.put("b")
    assert select.select([inbox.fileno()], [], [], 0)[0] == [inbox.fileno()]
    assert inbox.take() == ["a", "b"]
    assert select.select([inbox.fileno()], [], [], 0)[0] == []
    inbox.put("c")
    assert inbox.close() == ["c"]
    assert inbox.put("d") is False
    inbox.wake()  # harmless after close


def test_the_inbox_writes_one_wake_up_per_take_and_never_misses_one() -> None:
    # Given an inbox that received many items before the loop read it
    inbox = Inbox()
    for i in range(100):
        inbox.put(i)
    # Then the pipe holds one byte, not a hundred
    assert os.read(inbox.fileno(), 4096) == b"\0"
    # And the loop that read that byte still finds every item, and after that
    # take the next put wakes the poller again
    assert inbox.take() == list(range(100))
    inbox.put("next")
    assert select.select([inbox.fileno()], [], [], 0)[0] == [inbox.fileno()]
    assert inbox.take() == ["next"]
    inbox.close()


def test_a_take_empties_a_pipe_holding_more_wake_ups_than_one_read_takes() -> None:
    # Given wake-ups that each write a byte (a signal handler's), more than one read holds
    inbox = Inbox()
    for _ in range(10_000):
        inbox.wake()
    inbox.put("item")
    # Then one take reads them all, and the poller sleeps until the next put
    assert inbox.take() == ["item"]
    assert select.select([inbox.fileno()], [], [], 0)[0] == []
    inbox.put("next")
    assert select.select([inbox.fileno()], [], [], 0)[0] == [inbox.fileno()]
    inbox.close()


def test_arguments_that_do_not_fit_fail_at_once_without_retry() -> None:
    # Given a two-argument task sent one argument
    a = Assignment(1, 1, "wt.add", protocol.pack([[1], {}]), None, 0)
    outcome = run_assignment(a, registered(), lambda *_: True)
    # Then it fails, naming the signature, and another attempt is not asked for
    assert not outcome.ok and outcome.retry is False
    assert "wt.add(a, b)" in (outcome.error or "") and "'b'" in (outcome.error or "")


def test_taking_the_waiting_tasks_leaves_a_slot_s_stop_signal_in_the_queue() -> None:
    # Given a waiting line holding two assignments, then the signal that stops one slot
    waiting = WaitingLine()
    first, second = (Assignment(i, 1, "wt.add", b"", None, 0) for i in (1, 2))
    waiting.put(first)
    waiting.put(second)
    waiting.stop_slots(1)
    # When the waiting tasks are taken
    taken = waiting.take()
    # Then both assignments come out, and the stop signal is still there for its slot
    assert taken == [first, second]
    assert waiting.next_to_start() is None
    # And an empty line gives nothing
    assert waiting.take() == []


def test_once_told_to_stop_starting_a_slot_sets_aside_what_it_takes() -> None:
    # Given a waiting line of three assignments, the first of them started
    waiting = WaitingLine()
    tasks = [Assignment(i, 1, "wt.add", b"", None, 0) for i in (1, 2, 3)]
    for a in tasks:
        waiting.put(a)
    assert waiting.next_to_start() == tasks[0]
    assert waiting.unstarted() == 2
    # When the worker stops starting tasks, and a slot that frees takes the next
    waiting.stop_starting()
    waiting.stop_slots(1)
    # Then the slot starts nothing and stops
    assert waiting.next_to_start() is None
    # And both unstarted assignments are there to be handed back, in order
    assert waiting.unstarted() == 2
    assert waiting.take() == tasks[1:]
    assert waiting.take() == [] and waiting.unstarted() == 0
