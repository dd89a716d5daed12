"""Options of the chaos suite: a replayable seed and a run length.

    pytest tests/chaos --chaos-seed 1234 --chaos-duration 300

Without --chaos-seed a random seed is drawn and printed. The options are
registered when pytest starts from this folder or a file in it (as `make
chaos` does); from the root folder the defaults apply.
"""

from __future__ import annotations

import secrets

import pytest

# pytest imports every conftest.py outside a package as the module `conftest`, the
# last one winning; re-exported so `from conftest import Cluster, wait_for` (as in
# tests/integration/test_pipeline.py) finds them whichever came last.
from cluster import Cluster, wait_for
from taskring.chaos import ChaosConfig

__all__ = ["Cluster", "wait_for"]

DEFAULT_DURATION_S = 45.0
# Start-up, client wind-down, drain (bounded by drain_timeout_s) and the checker.
OVERHEAD_S = 200.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos")
    group.addoption("--chaos-seed", type=int, default=None, help="seed of the chaos schedule")
    group.addoption(
        "--chaos-duration",
        type=float,
        default=DEFAULT_DURATION_S,
        help=f"seconds of faults in the chaos run (default {DEFAULT_DURATION_S:g})",
    )


def _duration(config: pytest.Config) -> float:
    return float(config.getoption("chaos_duration", default=None) or DEFAULT_DURATION_S)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A longer --chaos-duration gets a timeout to match."""
    for item in items:
        if "chaos_config" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(_duration(config) + OVERHEAD_S), append=False)


# Both of the broker's durability modes: with "normal" the WAL is checkpointed from a
# thread of its own (broker/checkpointer.py), under the same kills.
@pytest.fixture(params=["full", "normal"])
def chaos_config(request: pytest.FixtureRequest) -> ChaosConfig:
    seed = request.config.getoption("chaos_seed", default=None)
    if seed is None:
        seed = secrets.randbelow(2**31)
    print(f"chaos seed {seed} (replay: pytest tests/chaos --chaos-seed {seed})")
    return ChaosConfig(seed=seed, duration_s=_duration(request.config), synchronous=request.param)
