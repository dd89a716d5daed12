"""The @task decorator and the registry of functions a worker may run.

A worker runs only functions that its own code registered here: a message
can name a task, but it can never make a worker import or evaluate anything.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

DEFAULT_MAX_ATTEMPTS = 3

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True, slots=True)
class TaskSpec:
    name: str
    fn: Callable[..., Any]
    wants_context: bool  # first parameter is named `ctx`: pass it a TaskContext
    max_attempts: int
    signature: inspect.Signature  # to refuse arguments that do not fit, before calling


_registry: dict[str, TaskSpec] = {}


def _wants_context(fn: Callable[..., Any]) -> bool:
    params = list(inspect.signature(fn).parameters)
    return bool(params) and params[0] == "ctx"


@overload
def task(fn: F, /) -> F: ...
@overload
def task(
    *, name: str | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> Callable[[F], F]: ...
def task(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> F | Callable[[F], F]:
    """Register a function as a task, named `module.qualname` unless `name` is given.

    A function whose first parameter is `ctx` receives a TaskContext with the
    last checkpoint (`ctx.state`) and `ctx.checkpoint(state)`.
    """
    if not 1 <= max_attempts <= 1000:
        raise ValueError("max_attempts must be between 1 and 1000")

    def register(func: F) -> F:
        task_name = name or f"{func.__module__}.{func.__qualname__}"
        existing = _registry.get(task_name)
        if existing is not None and existing.fn is not func:
            raise ValueError(f"task {task_name!r} is registered twice")
        _registry[task_name] = TaskSpec(
            task_name, func, _wants_context(func), max_attempts, inspect.signature(func)
        )
        func.task_name = task_name  # type: ignore[attr-defined]
        return func

    return register(fn) if fn is not None else register


def registered() -> dict[str, TaskSpec]:
    """A snapshot of every task registered in this process."""
    return dict(_registry)
