"""Retention: idle sessions are deleted by a background thread, never on a request's time."""

from __future__ import annotations

import logging
import threading

from .directory import SessionDirectory

log = logging.getLogger(__name__)


class SessionExpirer:
    """Deletes idle sessions in the background, so that expiry never costs a request its time."""

    def __init__(self, service: SessionDirectory, ttl_seconds: float):
        self.service = service
        self.ttl = ttl_seconds
        self.interval = min(60.0, max(0.05, ttl_seconds / 4))
        # Set by stop(); the thread sleeps on it, so stopping is immediate.
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="session-expirer", daemon=True)

    def start(self) -> SessionExpirer:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                expired = self.service.expire(self.ttl)
            except Exception:  # a locked or closing database: try again next round
                log.warning("session expiry failed", exc_info=True)
                continue
            if expired:
                log.info("expired %d idle sessions", len(expired))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
