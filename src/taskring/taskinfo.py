"""What a client knows about one task: TaskInfo (a checked view) and TaskHandle."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeGuard

from taskring import protocol
from taskring.errors import TaskFailed, TaskringError

if TYPE_CHECKING:
    from taskring.client import Client


def malformed(what: str) -> TaskringError:
    return TaskringError(f"malformed answer from the broker: {what}")


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, slots=True)
class TaskInfo:
    """One task as the broker reported it (a protocol task view, checked)."""

    id: int
    name: str
    state: str
    key: str | None
    attempt: int
    max_attempts: int
    worker: str | None
    error: str | None
    created_at: float
    updated_at: float
    packed_result: bytes | None = dataclasses.field(default=None, repr=False)
    spared: int = 0  # attempts that did not start, so not counted against max_attempts

    @property
    def done(self) -> bool:
        """True once the task is in a final state (it will not change again).

        Any state but queued and running is final, also one this client does
        not know yet: a newer broker's final state must not leave wait() hanging.
        """
        return self.state not in protocol.PENDING_STATES

    @property
    def ok(self) -> bool:
        return self.state == protocol.SUCCEEDED

    @property
    def value(self) -> Any:
        """The task's return value, unpacked; None until it succeeded."""
        if self.packed_result is None:
            return None
        try:
            return protocol.unpack(self.packed_result)
        except protocol.ProtocolError as e:
            raise malformed(f"result of task {self.id} is not msgpack: {e}") from e

    @classmethod
    def from_view(cls, view: Any) -> TaskInfo:
        """Check a view from the wire; raises TaskringError when a field is wrong."""
        # The common case in one pass of exact type checks (a wait() on 20,000
        # tasks makes 20,000 of these); anything else is checked field by field.
        if type(view) is dict:
            get = view.get
            task_id, name, state, attempt = get("id"), get("name"), get("state"), get("attempt")
            key, worker, error, result = get("key"), get("worker"), get("error"), get("result")
            max_attempts, created, updated = (
                get("max_attempts"),
                get("created_at"),
                get("updated_at"),
            )
            spared = get("spared", 0)  # absent from brokers before it
            if (
                type(task_id) is int
                and type(name) is str
                and type(state) is str
                and type(attempt) is int
                and type(max_attempts) is int
                and type(created) is float
                and type(updated) is float
                and (key is None or type(key) is str)
                and (worker is None or type(worker) is str)
                and (error is None or type(error) is str)
                and (result is None or type(result) is bytes)
                and type(spared) is int
            ):
                return cls(
                    task_id, name, state, key, attempt, max_attempts, worker, error,
                    created, updated, result, spared,
                )  # fmt: skip
        if not isinstance(view, dict):
            raise malformed("a task view is not a map")
        values: dict[str, Any] = {}
        for name, kind, optional in _VIEW_FIELDS:
            value = view.get(name)
            if value is None and optional:
                values[name] = None
                continue
            if not isinstance(value, kind) or isinstance(value, bool):
                raise malformed(f"task view field {name!r} is {type(value).__name__}")
            values[name] = value
        spared = view.get("spared", 0)
        if not is_int(spared):
            raise malformed(f"task view field 'spared' is {type(spared).__name__}")
        return cls(
            id=values["id"],
            name=values["name"],
            state=values["state"],
            key=values["key"],
            attempt=values["attempt"],
            max_attempts=values["max_attempts"],
            worker=values["worker"],
            error=values["error"],
            created_at=float(values["created_at"]),
            updated_at=float(values["updated_at"]),
            packed_result=values["result"],
            spared=spared,
        )


_VIEW_FIELDS: tuple[tuple[str, type | tuple[type, ...], bool], ...] = (
    ("id", int, False),
    ("name", str, False),
    ("state", str, False),
    ("key", str, True),
    ("attempt", int, False),
    ("max_attempts", int, False),
    ("worker", str, True),
    ("error", str, True),
    ("created_at", (int, float), False),
    ("updated_at", (int, float), False),
    ("result", bytes, True),
)


def outcome(info: TaskInfo) -> Any:
    """The value of a finished task, or TaskFailed."""
    if info.state == protocol.SUCCEEDED:
        return info.value
    raise TaskFailed(info.id, info.state, info.error)


class TaskHandle:
    """A submitted task: its id, and shortcuts to ask the client about it.

    `unknown_name` is True when no worker had ever registered the task's name
    at submit time (the task is queued until one does); `known_names` then
    lists the names the broker knows.
    """

    __slots__ = ("_client", "id", "known_names", "unknown_name")

    def __init__(
        self,
        client: Client,
        task_id: int,
        *,
        unknown_name: bool = False,
        known_names: tuple[str, ...] = (),
    ) -> None:
        self._client = client
        self.id = task_id
        self.unknown_name = unknown_name
        self.known_names = known_names

    def result(self, timeout: float | None = None) -> Any:
        return self._client.result(self.id, timeout)

    def status(self) -> TaskInfo:
        return self._client.status(self.id)

    def __repr__(self) -> str:
        return f"TaskHandle(id={self.id})"
