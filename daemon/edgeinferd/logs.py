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


class _LevelFilteringLogger(structlog.make_filtering_bound_logger(logging.DEBUG)):  # type: ignore[misc]
    """structlog's filtering logger, whose level :func:`set_level` can change later.

    structlog's filtering loggers drop a call below their level in one
    ``return None``, but their level is fixed when the class is made, and
    each logger caches its instance on first use. Every cached instance is
    of this one class, so copying the level methods of another filtering
    class onto it changes the level everywhere at once, and the hot path
    still pays nothing more than before.
    """


#: Whether debug events are logged: the hot path reads this before building a
#: per-request event, so at the default level a call pays one attribute read.
debug_enabled = False


def set_level(level: str) -> None:
    """Change the level of every logger, including those already used (on reload)."""
    global debug_enabled
    debug_enabled = _LEVELS[level] <= logging.DEBUG
    source = structlog.make_filtering_bound_logger(_LEVELS[level])
    for name, value in vars(source).items():
        if not name.startswith("__"):
            setattr(_LevelFilteringLogger, name, value)


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog once for the process (the daemon's entry point calls this)."""
    stream = stream or sys.stderr
    set_level(level)
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
            wrapper_class=_LevelFilteringLogger,
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
        wrapper_class=_LevelFilteringLogger,
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
