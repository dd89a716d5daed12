"""The broker: the poll loop, the hash ring, leases and the SQLite task log."""

from __future__ import annotations

import logging
import signal
from types import FrameType

from taskring.broker.server import Broker
from taskring.broker.settings import BrokerSettings

__all__ = ["Broker", "BrokerSettings", "run_broker"]

log = logging.getLogger(__name__)


def run_broker(settings: BrokerSettings) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP rereads the allowed keys. Handlers set flags."""
    broker = Broker(settings)

    def request_stop(signum: int, frame: FrameType | None) -> None:
        broker.stop()

    def request_reload(signum: int, frame: FrameType | None) -> None:
        broker.reload_keys()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, request_reload)
    try:
        log.info("broker ready on %s (db %s)", broker.endpoint, settings.db_path)
        broker.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        broker.close()
        log.info("broker stopped")
