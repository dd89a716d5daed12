"""Chaos runs: a broker, workers and clients killed at random moments, then checked.

    from taskring.chaos import ChaosConfig, run_chaos, format_result
    result = run_chaos(ChaosConfig(seed=7, duration_s=20), Path("chaos-run"))
    print(format_result(result))

`taskring chaos` and tests/chaos/test_chaos.py run this same code.
"""

from __future__ import annotations

from taskring.chaos.runner import ChaosError, ChaosResult, format_result, run_chaos
from taskring.chaos.schedule import ChaosConfig, Fault, make_schedule

__all__ = [
    "ChaosConfig",
    "ChaosError",
    "ChaosResult",
    "Fault",
    "format_result",
    "make_schedule",
    "run_chaos",
]
