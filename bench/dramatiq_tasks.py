"""The reference Dramatiq app: Redis broker, Redis results, the same no-op actor.

The dramatiq CLI imports this module by name, so the Redis URL reaches it
through the environment (BENCH_REDIS_URL); the benchmark sets it for the
workers and for itself.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

SETTING = os.environ["BENCH_REDIS_URL"]
broker = RedisBroker(url=SETTING)
broker.add_middleware(Results(backend=RedisBackend(url=SETTING)))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, max_retries=0)
def noop(i: int) -> int:
    return i
