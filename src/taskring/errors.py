"""The exceptions taskring raises to its users, one hierarchy under TaskringError."""

from __future__ import annotations


class TaskringError(Exception):
    """Base class of every error taskring raises on purpose."""


class BrokerUnavailable(TaskringError):
    """The broker did not answer within the timeout (requests were resent meanwhile)."""


class RequestRejected(TaskringError):
    """The broker answered a request with ERROR; `code` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class TaskNotFound(TaskringError):
    """No task with that id exists in the broker's log."""


class TaskFailed(TaskringError):
    """The task ended in state failed, dead or cancelled; `error` is the reason recorded."""

    def __init__(self, task_id: int, state: str, error: str | None) -> None:
        super().__init__(f"task {task_id} {state}: {error or 'no reason recorded'}")
        self.task_id = task_id
        self.state = state
        self.error = error


class ResultTimeout(TaskringError, TimeoutError):
    """The task did not reach a final state within the timeout."""
