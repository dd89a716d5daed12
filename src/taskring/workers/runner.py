"""Run one assignment: look up the task, decode its input, call it, encode its outcome.

Both pools call run_assignment, the thread pool in its threads and the process
pool in its children, so a task behaves the same in either. It never raises:
every way a task can end becomes a TaskOutcome, and `retry` says whether
another attempt could end differently.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Mapping
from typing import Any

from taskring import protocol
from taskring.protocol import Assignment, TaskOutcome
from taskring.registry import TaskSpec
from taskring.workers.context import CheckpointFn, StaleFn, TaskContext

TRACEBACK_FRAMES = 4  # frames kept from the end of a task's traceback


def failure(
    a: Assignment, error: str, *, retry: bool, limits: protocol.Limits, started: bool = True
) -> TaskOutcome:
    return TaskOutcome(a.id, a.attempt, False, None, error[: limits.max_error_len], retry, started)


def describe_exception(e: BaseException) -> str:
    """ "ExcType: message" and the last few frames, enough to find the line that failed."""
    head = f"{type(e).__name__}: {e}"
    frames = traceback.extract_tb(e.__traceback__)[-TRACEBACK_FRAMES:]
    if not frames:
        return head
    return head + "\nTraceback (last frames):\n" + "".join(traceback.format_list(frames)).rstrip()


def _decode_input(a: Assignment) -> tuple[list[Any], dict[str, Any], Any]:
    """args, kwargs and checkpoint state; ValueError says what is wrong."""
    try:
        decoded = protocol.unpack(a.payload)
    except protocol.ProtocolError as e:
        raise ValueError(f"payload is not msgpack: {e.message}") from e
    if (
        not isinstance(decoded, list)
        or len(decoded) != 2
        or not isinstance(decoded[0], list)
        or not isinstance(decoded[1], dict)
    ):
        raise ValueError("payload must be msgpack of [args list, kwargs map]")
    args, kwargs = decoded
    state = None
    if a.state is not None:
        try:
            state = protocol.unpack(a.state)
        except protocol.ProtocolError as e:
            raise ValueError(f"checkpoint state is not msgpack: {e.message}") from e
    return args, kwargs, state


def _misfit(spec: TaskSpec, args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """Why these arguments cannot bind to the task's signature, or None if they can.

    Checked only after a call raised TypeError: binding on every call cost
    more than a no-op task itself.
    """
    try:
        spec.signature.bind(*((None,) if spec.wants_context else ()), *args, **kwargs)
    except TypeError as e:
        return str(e)
    return None


def run_assignment(
    a: Assignment,
    specs: Mapping[str, TaskSpec],
    checkpoint: CheckpointFn,
    *,
    limits: protocol.Limits = protocol.DEFAULT_LIMITS,
    is_stale: StaleFn | None = None,
) -> TaskOutcome:
    spec = specs.get(a.name)
    if spec is None:
        known = ", ".join(sorted(specs)) or "nothing"
        error = f"unknown task {a.name!r}: this worker registered {known}"
        return failure(a, error, retry=False, limits=limits)
    try:
        args, kwargs, state = _decode_input(a)
    except ValueError as e:
        return failure(a, f"cannot decode task {a.name!r}: {e}", retry=False, limits=limits)

    try:
        if spec.wants_context:
            ctx = TaskContext(
                a.id, a.attempt, state, a.number, checkpoint, limits=limits, is_stale=is_stale
            )
            value = spec.fn(ctx, *args, **kwargs)
        else:
            value = spec.fn(*args, **kwargs)
    except BaseException as e:  # even SystemExit must become a result, not a lost task
        if isinstance(e, TypeError) and (mismatch := _misfit(spec, args, kwargs)) is not None:
            # Arguments that do not fit the function fail the same way on every
            # attempt: say so once, without retries. A TypeError raised inside
            # the task is retried like any other exception.
            error = f"arguments do not fit {a.name}({', '.join(spec.signature.parameters)}): "
            return failure(a, error + mismatch, retry=False, limits=limits)
        return failure(a, describe_exception(e), retry=True, limits=limits)

    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # no "coroutine was never awaited" warning
        error = f"task {a.name!r} returned an awaitable; async tasks are not supported"
        return failure(a, error, retry=False, limits=limits)
    try:
        packed = protocol.pack(value)
    except (TypeError, ValueError, OverflowError) as e:
        error = f"return value of task {a.name!r} cannot be encoded with msgpack: {e}"
        return failure(a, error, retry=False, limits=limits)
    if len(packed) > limits.max_result_bytes:
        error = (
            f"return value of task {a.name!r} is {len(packed)} bytes packed, "
            f"over max_result_bytes ({limits.max_result_bytes})"
        )
        return failure(a, error, retry=False, limits=limits)
    return TaskOutcome(a.id, a.attempt, True, packed, None, False)
