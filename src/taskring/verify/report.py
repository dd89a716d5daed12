"""The checker's findings: counts, a histogram, violation lines, and their text form."""

from __future__ import annotations

import dataclasses

from taskring.verify.checks import (
    DUPLICATED,
    FENCING,
    INCONSISTENT,
    LOST,
    REGRESSION,
    UNFINISHED,
    Violation,
)


@dataclasses.dataclass(slots=True)
class Report:
    db: str
    drained: bool  # tasks had time to finish: one not final is lost
    tasks: int
    states: dict[str, int]
    acknowledged: int | None  # None: no client journals, so not known
    fenced: int  # `stale` events: messages of superseded attempts refused
    stale_acks: int  # stale ACKs the worker journals recorded
    attempts: dict[int, int]  # attempts -> tasks with that many
    integrity: str
    files: dict[str, int]
    violations: list[Violation]
    notes: list[str]

    def count(self, category: str) -> int:
        return sum(1 for v in self.violations if v.category == category)

    @property
    def lost(self) -> int:
        return self.count(LOST)

    @property
    def duplicated(self) -> int:
        return self.count(DUPLICATED)

    @property
    def regressions(self) -> int:
        return self.count(REGRESSION)

    @property
    def fencing(self) -> int:
        return self.count(FENCING)

    @property
    def inconsistent(self) -> int:
        return self.count(INCONSISTENT)

    @property
    def unfinished(self) -> int:
        """Tasks not final after a drain (0 when not drained): a violation."""
        return self.count(UNFINISHED)

    @property
    def ok(self) -> bool:
        return not self.violations


def _histogram(counts: dict[int, int] | dict[str, int]) -> str:
    return "  ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "-"


def format_report(report: Report, show: int = 20) -> str:
    """A compact table of the counts, then the first `show` violations and any notes."""
    f = report.files
    rows: list[tuple[str, object, str]] = [
        (
            "acknowledged",
            "n/a" if report.acknowledged is None else report.acknowledged,
            "task ids in the client journals",
        ),
        ("lost", report.lost, "acknowledged, then missing, not final, or not applied"),
        ("duplicated", report.duplicated, "completions applied more than once"),
        (
            "fenced",
            report.fenced,
            f"stale messages refused ({report.stale_acks} stale ACKs in worker journals)",
        ),
        ("checkpoint regressions", report.regressions, "a checkpoint lost or gone backwards"),
        ("fencing violations", report.fencing, "leases out of order, stale ones applied"),
        ("inconsistent", report.inconsistent, "tasks table disagrees with its events"),
        ("unfinished", report.unfinished, "not final after the drain" if report.drained else ""),
    ]
    lines = [
        f"history of {report.db}: {report.tasks} tasks; journals: {f.get('client', 0)} client, "
        f"{f.get('worker', 0)} worker, {f.get('start', 0)} start log"
    ]
    for label, value, meaning in rows:
        lines.append(f"  {label:<24}{value!s:>7}  {meaning}".rstrip())
    lines.append(f"  {'states':<24}{_histogram(report.states)}")
    lines.append(f"  {'attempts per task':<24}{_histogram(report.attempts)}")
    lines.append(f"  {'integrity_check':<24}{report.integrity}")
    lines.extend(f"  note: {note}" for note in report.notes)
    if report.ok:
        lines.append("OK: no violation")
    else:
        shown = report.violations[:show]
        lines.append(f"VIOLATIONS: {len(report.violations)} (first {len(shown)} shown)")
        lines.extend(f"  {v.category}: {v.message}" for v in shown)
    return "\n".join(lines)
