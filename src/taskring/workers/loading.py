"""Import the user's task modules and check that they registered something."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from taskring.registry import TaskSpec, registered
from taskring.workers.errors import WorkerConfigError


def _registers(module: str, spec: TaskSpec) -> bool:
    owner = getattr(spec.fn, "__module__", "") or ""
    return owner == module or owner.startswith(module + ".")


def load_modules(modules: Iterable[str]) -> dict[str, TaskSpec]:
    """Import each module; return every registered task.

    Raises WorkerConfigError with a one-line message when a module cannot be
    imported or registers no task (a typo in a module name should fail loudly,
    not start a worker that refuses everything), or when no task exists at all.
    """
    for module in modules:
        before = registered()
        try:
            importlib.import_module(module)
        except Exception as e:  # any error while importing user code is a config error
            reason = " ".join(str(e).split()) or type(e).__name__
            raise WorkerConfigError(f"cannot import module {module!r}: {reason}") from e
        after = registered()
        # A module imported earlier adds nothing new, so also look at who defined the tasks.
        if after.keys() == before.keys() and not any(_registers(module, s) for s in after.values()):
            raise WorkerConfigError(f"module {module!r} registers no tasks (use @task)")
    specs = registered()
    if not specs:
        raise WorkerConfigError("no tasks registered: name the modules that define them")
    return specs
