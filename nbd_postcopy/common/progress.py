"""A one-line progress bar on stderr: done/total, rate and ETA.

On a terminal the line redraws in place (at most every `interval` seconds). Elsewhere (logs, CI,
pipes) it stays silent until `finish()`, which always prints one summary line unless `quiet`.

    bar = Progress("staging", total=pages, unit="pages")
    for chunk in chunks:
        ...
        bar.advance(len(chunk))
    bar.finish()
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    def __init__(self, label: str, total: int, unit: str = "pages", *, stream: TextIO | None = None,
                 quiet: bool = False, interval: float = 0.2):
        self.label = label
        self.total = max(total, 0)
        self.unit = unit
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.interval = interval
        self.live = not quiet and self.stream.isatty()
        self.started = time.monotonic()
        self._last_draw = 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Units per second so far."""
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = done
        if self.live and time.monotonic() - self._last_draw >= self.interval:
            self._draw()

    def line(self) -> str:
        """The current progress line (without the carriage return)."""
        fraction = self.done / self.total if self.total else 1.0
        filled = int(BAR_WIDTH * min(fraction, 1.0))
        rate = self.rate
        eta = _duration((self.total - self.done) / rate) if rate > 0 and self.done < self.total else "-"
        return (f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.done}/{self.total} "
                f"{self.unit} {fraction:4.0%} {rate:,.0f} {self.unit}/s ETA {eta}")

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        self.stream.write("\r" + self.line() + "\x1b[K")
        self.stream.flush()

    def finish(self, note: str = "") -> None:
        """Print the summary line: total, time and rate, plus an optional note."""
        if self.quiet:
            return
        summary = (f"{self.label}: {self.done}/{self.total} {self.unit} in {self.elapsed:.2f}s "
                   f"({self.rate:,.0f} {self.unit}/s)")
        if note:
            summary += f"; {note}"
        self.stream.write(("\r\x1b[K" if self.live else "") + summary + "\n")
        self.stream.flush()
