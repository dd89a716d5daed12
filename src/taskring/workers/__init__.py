"""The worker side of taskring: an I/O thread that owns the socket, a pool that runs tasks.

from taskring.workers import WorkerSettings, run_worker
run_worker(WorkerSettings(modules=("tasks",), concurrency=8))
"""

from __future__ import annotations

from taskring.registry import task
from taskring.workers.context import TaskContext
from taskring.workers.errors import WorkerConfigError, WorkerNameTaken, WorkerStopped
from taskring.workers.settings import WorkerSettings
from taskring.workers.worker import Worker, run_worker

__all__ = [
    "TaskContext",
    "Worker",
    "WorkerConfigError",
    "WorkerNameTaken",
    "WorkerSettings",
    "WorkerStopped",
    "run_worker",
    "task",
]
