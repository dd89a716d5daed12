"""Fixtures that start real taskring processes and always stop them, by their own PID."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import SRC, SUPPORT, Cluster, wait_for

__all__ = ["SRC", "SUPPORT", "Cluster", "wait_for"]  # `from conftest import ...` still works


@pytest.fixture
def cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    # A short folder name keeps the ipc path under the kernel's limit.
    root = Path(tmp_path_factory.mktemp("c", numbered=True))
    c = Cluster(root)
    try:
        yield c
    finally:
        c.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(c.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
