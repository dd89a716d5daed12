"""Sequence numbers, acknowledgements and resends: the reliability every peer shares.

A sender numbers each message that needs an answer, keeps it until the
answer comes, and resends the very same frames (same sequence number) when
the answer is late, waiting longer each time. The receiver makes a resend
harmless: the broker deduplicates submits on (client id, seq) in its store,
and results and checkpoints on (task id, attempt), so a resend can never
create a second task or apply a result twice.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """Resend timing: first wait, growth factor and ceiling, in seconds."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 5.0

    def after(self, attempt: int) -> float:
        return min(self.max_s, self.initial_s * self.factor**attempt)


@dataclasses.dataclass(slots=True)
class _Pending:
    frames: list[bytes]
    due: float
    resends: int


class Outstanding:
    """Messages sent and not yet acknowledged, each with its resend deadline."""

    def __init__(self, backoff: Backoff | None = None) -> None:
        self.backoff = backoff or Backoff()
        self._seq = itertools.count(1)
        self._pending: dict[int, _Pending] = {}

    def next_seq(self) -> int:
        return next(self._seq)

    def add(self, seq: int, frames: list[bytes], now: float) -> None:
        self._pending[seq] = _Pending(frames, now + self.backoff.after(0), 0)

    def ack(self, seq: int) -> list[bytes] | None:
        """Forget seq; returns its frames, or None for a duplicate or unknown ack."""
        pending = self._pending.pop(seq, None)
        return pending.frames if pending else None

    def due(self, now: float) -> list[list[bytes]]:
        """Frames whose answer is late; each is rescheduled with a longer wait."""
        late = []
        for pending in self._pending.values():
            if pending.due <= now:
                pending.resends += 1
                pending.due = now + self.backoff.after(pending.resends)
                late.append(pending.frames)
        return late

    def resend_all(self, now: float) -> list[list[bytes]]:
        """Everything unacknowledged, for a peer that just reconnected."""
        for pending in self._pending.values():
            pending.due = now + self.backoff.after(0)
        return [p.frames for p in self._pending.values()]

    def next_due(self) -> float | None:
        return min((p.due for p in self._pending.values()), default=None)

    def __contains__(self, seq: int) -> bool:
        return seq in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def __iter__(self) -> Iterator[int]:
        return iter(self._pending)
