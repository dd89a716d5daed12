"""TaskContext: what a task whose first parameter is `ctx` receives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from taskring import protocol

# (task id, attempt, checkpoint number, packed state) -> stale. Blocks until the
# broker's ACK; raises WorkerStopped if the worker stops first.
CheckpointFn = Callable[[int, int, int, bytes], bool]
# (task id, attempt) -> whether the broker has said this attempt's lease is gone.
StaleFn = Callable[[int, int], bool]


class TaskContext:
    """The running attempt of one task, and its checkpoints.

    `state` is the last checkpointed state (None on a fresh start). It always
    holds the value as msgpack gives it back (tuples come back as lists), so a
    task sees the same thing whether it continues or resumes after a crash.

    A context belongs to its task's thread: checkpoint from one thread at a time.
    """

    def __init__(
        self,
        task_id: int,
        attempt: int,
        state: Any,
        number: int,
        send: CheckpointFn,
        *,
        limits: protocol.Limits = protocol.DEFAULT_LIMITS,
        is_stale: StaleFn | None = None,
    ) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.state = state
        self.number = number  # of the last checkpoint stored; the next one is number + 1
        self._lost = False  # a checkpoint's ACK called this attempt stale
        self._send = send
        self._limits = limits
        self._is_stale = is_stale

    @property
    def lease_lost(self) -> bool:
        """True once the broker said this attempt's lease is gone: the task was
        re-leased elsewhere, or cancelled. Its result will not be applied, so the
        task may stop early. Set by a stale checkpoint at once, else within a
        heartbeat interval of the broker learning it; cheap to poll in a thread
        pool, one round trip to the worker in a process pool."""
        if not self._lost and self._is_stale is not None:
            self._lost = self._is_stale(self.task_id, self.attempt)
        return self._lost

    def checkpoint(self, state: Any) -> None:
        """Store `state` with the task; returns once the broker has made it durable.

        Raises TypeError if msgpack cannot encode the state, ValueError if the
        encoding exceeds max_checkpoint_bytes, WorkerStopped if the worker stops
        before the broker acknowledged. A superseded attempt sets `lease_lost`
        instead of raising.
        """
        try:
            data = protocol.pack(state)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(
                "checkpoint state must be msgpack data (None, bool, int, float, str, bytes, "
                f"list, tuple, dict): {e}"
            ) from e
        limit = self._limits.max_checkpoint_bytes
        if len(data) > limit:
            raise ValueError(
                f"checkpoint state of {len(data)} bytes exceeds max_checkpoint_bytes ({limit})"
            )
        number = self.number + 1
        stale = self._send(self.task_id, self.attempt, number, data)
        self.number = number
        self.state = protocol.unpack(data)
        if stale:
            self._lost = True

    def __repr__(self) -> str:
        return (
            f"TaskContext(task_id={self.task_id}, attempt={self.attempt}, "
            f"number={self.number}, lease_lost={self.lease_lost})"
        )
