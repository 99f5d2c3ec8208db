"""Migration progress on a terminal: pass, dirty pages left, throughput, ETA.

Shown when stderr is a terminal (one line, redrawn in place) or with --progress (one line per
update, at most a few per second, for logs and pipes). Never printed otherwise.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

MiB = 1 << 20


class Progress:
    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = self.tty if enabled is None else enabled
        self.interval = 0.1 if self.tty else 0.5
        self._last = 0.0
        self._width = 0

    def update(
        self, number: int, pages_left: int, rate: float, eta: float, *, force: bool = False,
        final: bool = False,
    ) -> None:  # fmt: skip
        """pass `number`, `pages_left` dirty pages still to send in it, `rate` bytes/s."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        what = "stop-and-copy" if final else f"pass {number}"
        line = (f"migration: {what}: {pages_left:,} dirty pages left, "
                f"{rate / MiB:,.1f} MiB/s, ETA {eta:.2f} s")  # fmt: skip
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, message: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + message.ljust(self._width) + "\n")
        else:
            self.stream.write(message + "\n")
        self.stream.flush()
