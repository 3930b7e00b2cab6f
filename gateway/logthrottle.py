"""One log line per kind of event per interval, however many events a flood brings.

A port under attack must not turn each refused connection into a log line
(the log would be the damage); the line that is written says how many like it
were folded into it, and the metrics keep the exact counts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable


class Throttled:
    """Logs the first event of each `key`, then at most one per `interval` seconds, counting the rest."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 4096) -> None:
        self.logger, self.interval, self.max_keys = logger, interval, max_keys
        self._lock = threading.Lock()
        self._seen: dict[Hashable, tuple[float, int]] = {}  # key -> (when last logged, events folded since)

    def log(self, level: int, key: Hashable, message: str, *args) -> bool:
        """Log `message % args` unless `key` was logged less than `interval` ago; True if it was written."""
        now = time.monotonic()
        with self._lock:
            last, folded = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.interval:
                self._seen[key] = (last, folded + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > self.max_keys:
                self._forget(now)
        if folded:
            message += f" (and {folded} more like it since the last such line)"
        self.logger.log(level, message, *args)
        return True

    def warning(self, key: Hashable, message: str, *args) -> bool:
        return self.log(logging.WARNING, key, message, *args)

    def info(self, key: Hashable, message: str, *args) -> bool:
        return self.log(logging.INFO, key, message, *args)

    def _forget(self, now: float) -> None:
        """Drop keys quiet for an interval (their folded counts are in the metrics), oldest first if still too many."""
        quiet = [key for key, (last, _) in self._seen.items() if now - last >= self.interval]
        for key in quiet:
            del self._seen[key]
        while len(self._seen) > self.max_keys:
            del self._seen[next(iter(self._seen))]
