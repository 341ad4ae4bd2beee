"""Progress for long steps: a bar on a terminal, plain log lines in a journal or CI log.

A bar redrawn with carriage returns is unreadable once captured to a file, and log lines
scroll a terminal away; so the choice follows whether stderr is a terminal.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

_BAR_WIDTH = 28


class Progress:
    """Counts ``total`` units of work for one labelled task; use as a context manager."""

    def __init__(
        self, label: str, total: int, *, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = enabled and self.stream.isatty()
        self.started = time.monotonic()
        self._last_line = -1

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()

    def advance(self, units: int = 1, note: str = "") -> None:
        """Record finished work; ``note`` (e.g. the epoch's loss) is shown with it."""
        self.done = min(self.done + units, self.total)
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        if self.interactive:
            filled = round(_BAR_WIDTH * self.done / self.total)
            bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
            self.stream.write(
                f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {note}\033[K"
            )
            self.stream.flush()
            return
        # One line per tenth of the work at most, so a 1000-batch loop logs 10 lines.
        tenth = self.done * 10 // self.total
        if tenth != self._last_line or self.done == self.total:
            self._last_line = tenth
            self.stream.write(
                f"{self.label}: {self.done}/{self.total} ({elapsed:.1f}s) {note}".rstrip() + "\n"
            )
            self.stream.flush()
