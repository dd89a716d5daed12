"""What every benchmark prints (machine, durability in force, tables, goals) and its options."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import shutil
import signal
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

import taskring


@dataclasses.dataclass(frozen=True)
class Goal:
    bench: str
    what: str  # the goal, e.g. ">= 12,500 tasks/s"
    measured: str
    met: bool | None  # None: not measured (a reference was skipped)


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs; medians are reported (default 3)"
    )
    parser.add_argument(
        "--synchronous",
        choices=("full", "normal"),
        default="full",
        help="the taskring broker's SQLite synchronous mode (default full)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where databases and logs go (default: a temp dir)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs, databases)")
    return parser


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def workdir(args: argparse.Namespace) -> Iterator[Path]:
    # SIGTERM unwinds like Ctrl-C, so every `with Children(...)` stops what it
    # started: killed by default, a benchmark left its broker, workers, Redis and
    # consumers running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    path = Path(tempfile.mkdtemp(prefix="taskring-bench-", dir=args.workdir))
    ok = False
    try:
        yield path
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"(logs and databases kept in {path})")


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.UTC)
    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}, taskring {taskring.__version__}, nice {os.nice(0)}, "
        f"load average {load}, {now:%Y-%m-%d %H:%M} UTC"
    )


def taskring_durability(synchronous: str) -> str:
    if synchronous == "full":
        return (
            "taskring: --synchronous full: SQLite WAL, one commit per broker turn, the WAL "
            "fdatasynced before any acknowledgement of it leaves (survives power loss)"
        )
    return (
        "taskring: --synchronous normal: SQLite WAL, one commit per broker turn, acknowledgements "
        "after the commit, no sync (survives a killed process, not a power loss)"
    )


def huey_durability(workdir: Path) -> str:
    """SqliteHuey sets journal_mode=wal and leaves synchronous to SQLite's build default."""
    probe = workdir / "sync-probe.db"
    conn = sqlite3.connect(probe)
    conn.execute("PRAGMA journal_mode=wal")
    level = conn.execute("PRAGMA synchronous").fetchone()[0]
    conn.close()
    name = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(level, str(level))
    return f"Huey: SqliteHuey defaults (WAL, synchronous={name} as SQLite's default, autocommit)"


def header(title: str, settings: str, durability: Sequence[str], notes: Sequence[str] = ()) -> None:
    print(f"== {title}")
    print(f"   {machine()}")
    print(f"   {settings}")
    for line in durability:
        print(f"   durability: {line}")
    for line in notes:
        print(f"   {line}")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        cells = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("   " + "  ".join(cells).rstrip())


def show_goals(goals: Sequence[Goal]) -> None:
    print()
    table(["goal", "measured", "met"], [(g.what, g.measured, _met(g.met)) for g in goals])
    print()


def _met(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "NO")


def runs(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    return "[" + ", ".join(fmt.format(v) for v in values) + "]"
