"""taskring: a durable task queue for Python on ZeroMQ.

    from taskring import task, Client

    @task
    def add(a, b):
        return a + b

    with Client() as client:
        print(client.submit("mymodule.add", 1, 2).result())

TaskContext (what a task that takes `ctx` receives) lives with the workers and
is imported on first use, so importing taskring stays cheap for clients.
"""

from __future__ import annotations

from typing import Any

from taskring.client import Client, TaskHandle, TaskInfo
from taskring.errors import (
    BrokerUnavailable,
    RequestRejected,
    ResultTimeout,
    TaskFailed,
    TaskNotFound,
    TaskringError,
)
from taskring.registry import task

__version__ = "0.1.0"

__all__ = [
    "BrokerUnavailable",
    "Client",
    "RequestRejected",
    "ResultTimeout",
    "TaskContext",
    "TaskFailed",
    "TaskHandle",
    "TaskInfo",
    "TaskNotFound",
    "TaskringError",
    "__version__",
    "task",
]


def __getattr__(name: str) -> Any:
    if name == "TaskContext":
        from taskring.workers import TaskContext

        return TaskContext
    raise AttributeError(f"module 'taskring' has no attribute {name!r}")
