"""Progress of the probe grid: a bar on a terminal, plain log lines otherwise (CI, files, `ray job logs`)."""
from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)


class GridProgress:
    """Groups done (of all), heads trained, heads per second."""

    def __init__(self, groups: int, *, stream: TextIO | None = None, width: int = 30, min_interval: float = 5.0):
        self.total, self.stream, self.width = groups, stream or sys.stderr, width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = self.heads = 0
        self.t0 = time.perf_counter()
        self.min_interval, self._last_log = min_interval, 0.0

    def update(self, groups: int, heads: int) -> None:
        self.done += groups
        self.heads += heads
        elapsed = max(1e-9, time.perf_counter() - self.t0)
        text = f"{self.done}/{self.total} groups, {self.heads} heads, {self.heads / elapsed:.1f} heads/s"
        if self.tty:
            filled = int(self.width * self.done / max(1, self.total))
            self.stream.write(f"\rprobe grid [{'#' * filled}{'.' * (self.width - filled)}] {text}")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif self.done >= self.total or time.perf_counter() - self._last_log >= self.min_interval:
            log.info("probe grid: %s", text)
            self._last_log = time.perf_counter()
