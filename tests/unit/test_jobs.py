"""The broker's in-memory queue window over the queued tasks in SQLite."""

from __future__ import annotations

from taskring.broker.jobs import Job, TaskQueue


class Log:
    """The queued tasks as SQLite holds them: what TaskQueue reads back, by id."""

    def __init__(self) -> None:
        self.queued: set[int] = set()

    def load(self, after_id: int, limit: int) -> list[Job]:
        return [job(i) for i in sorted(i for i in self.queued if i > after_id)[:limit]]


def job(task_id: int) -> Job:
    return Job(task_id, "t.add", b"\x92\x90\x80", None, 0, 3, None, 0, 0.0, 0)


def drain(queue: TaskQueue) -> list[int]:
    popped = []
    while (j := queue.pop()) is not None:
        popped.append(j.id)
    return popped


def test_a_job_back_from_a_lease_newer_than_the_last_read_is_not_read_again() -> None:
    # Given a queue whose last read from the log ended at task 1, while tasks 2 and 3
    # were leased (say, loaded at start, or a rewind after they went out)
    log = Log()
    log.queued = {1}
    queue = TaskQueue(window=2, load=log.load)
    assert drain(queue) == [1]
    # When both leases are lost, so they come back queued and fill the window, and a
    # task is submitted, so the queue spills
    log.queued = {2, 3, 6}
    queue.add_back(job(3))
    queue.add_back(job(2))
    queue.add_new(job(6))
    # Then draining it yields each task once, though the log still calls every popped
    # task queued (the leases granted in this turn are written at its end)
    assert drain(queue) == [2, 3, 6]


def test_rewind_reads_the_queue_again_from_the_start() -> None:
    log = Log()
    log.queued = {1, 2, 3}
    queue = TaskQueue(window=2, load=log.load)
    assert queue.pop() is not None  # task 1 taken, and let go
    queue.rewind()
    assert drain(queue) == [1, 2, 3]
