"""Log lines that a peer can provoke at will, at most once per interval per kind."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """`log.warning(kind, message, *args)` logs the first line of each kind, then at most one line per
    `interval` seconds, saying how many of that kind were left out in between."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0):
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, kind: str, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self._interval) < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        left_out = self._suppressed.pop(kind, 0)
        if left_out:
            message += f" ({left_out} more like it in the last {self._interval:g}s were not logged)"
        self._logger.log(level, message, *args)

    def warning(self, kind: str, message: str, *args) -> None:
        self.log(logging.WARNING, kind, message, *args)

    def error(self, kind: str, message: str, *args) -> None:
        self.log(logging.ERROR, kind, message, *args)
