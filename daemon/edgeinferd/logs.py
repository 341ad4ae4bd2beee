"""structlog set-up: the journal under systemd, readable lines on a terminal, JSON otherwise.

Per-request events are logged at debug level only, so the hot path pays a
level check and nothing more at the default level.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from edgeinferd import journal

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog once for the process (the daemon's entry point calls this)."""
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if fmt == "auto" and stream is sys.stderr and journal.stderr_is_journal():
        # Under systemd: native journal entries with PRIORITY and MODEL=,
        # REQUEST_ID=, DURATION_MS= fields (journalctl -u edgeinferd MODEL=x).
        structlog.configure(
            processors=[*processors, journal.JournalRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
            logger_factory=journal.JournalLoggerFactory(),
            cache_logger_on_first_use=True,
        )
        return
    processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    if console:
        processors.append(structlog.dev.ConsoleRenderer())
    else:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
