"""Background tasks whose failures are logged, not dropped.

``task.add_done_callback(lambda t: t.exception())`` silences asyncio's
"exception was never retrieved" and throws the error away with it; a reload
that failed or a health update that raised must leave a trace in the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger("edgeinferd.tasks")

#: Tasks alive now: asyncio keeps only weak references to running tasks.
_running: set[asyncio.Task[Any]] = set()


def log_failure(task: asyncio.Task[Any]) -> None:
    """Done callback: log the task's exception with its traceback (cancellation is not one)."""
    _running.discard(task)
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("background task failed", task=task.get_name(), exc_info=error)


def spawn(coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """Run ``coroutine`` in the background; a failure is logged by ``log_failure``."""
    task = asyncio.ensure_future(coroutine)
    task.set_name(name)
    _running.add(task)
    task.add_done_callback(log_failure)
    return task
