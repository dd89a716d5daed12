"""An optional append-only record of what the broker acknowledged to this worker.

`taskring verify` and the chaos suite compare it with the broker's log: every
result and checkpoint acknowledged here must be in the log. A line is
written after the ACK arrives, so a crash can only make the journal claim
less, never more.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO


class AckJournal:
    def __init__(self, path: str, worker: str) -> None:
        self.worker = worker
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file: IO[str] = os.fdopen(fd, "a", buffering=1)  # one write per line

    def result(self, task_id: int, attempt: int, ok: bool, stale: bool) -> None:
        self._write({"kind": "result", "id": task_id, "attempt": attempt, "ok": ok, "stale": stale})

    def checkpoint(self, task_id: int, attempt: int, number: int, stale: bool) -> None:
        self._write(
            {"kind": "checkpoint", "id": task_id, "attempt": attempt, "number": number,
             "stale": stale}
        )  # fmt: skip

    def _write(self, record: dict[str, object]) -> None:
        record["worker"] = self.worker
        record["at"] = time.time_ns() / 1e9
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()
