"""Errors the worker side raises on purpose, under taskring's TaskringError."""

from __future__ import annotations

from taskring.errors import TaskringError


class WorkerConfigError(TaskringError):
    """The worker cannot start as configured (bad setting, missing module, no tasks).

    The message is one line, fit to print as it is: the CLI shows it and exits.
    """


class WorkerStopped(TaskringError):
    """The worker stopped before the broker acknowledged a checkpoint.

    Raised inside a task by `ctx.checkpoint()`: the state may not be durable,
    and the broker re-runs the task from its previous checkpoint.
    """


class WorkerNameTaken(TaskringError):
    """Another live worker process registered this worker's name with the broker.

    Two processes of one name take the routing id from each other, and their
    tasks use up attempts; the one the broker did not keep stops with this.
    """
