"""Background tasks' failures reach the log (``edgeinferd.tasks``).

Unit tests, no daemon: the daemon's own background tasks (reload, watchdog,
health updates, shutdown) do not fail on demand, so a coroutine that raises
stands in for them, spawned the way ``cli.py`` and ``server.py`` spawn theirs.
"""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from edgeinferd.tasks import spawn


async def _fails() -> None:
    raise RuntimeError("boom")


async def _cancelled() -> None:
    await asyncio.Event().wait()


def test_a_failed_background_task_is_logged_with_its_exception() -> None:
    async def main() -> None:
        task = spawn(_fails(), "reload")
        await asyncio.wait([task])
        await asyncio.sleep(0)  # done callbacks run on the next turn of the loop

    with capture_logs() as logs:
        asyncio.run(main())
    (entry,) = [e for e in logs if e["event"] == "background task failed"]
    assert entry["task"] == "reload"
    assert isinstance(entry["exc_info"], RuntimeError) and str(entry["exc_info"]) == "boom"


def test_a_cancelled_background_task_is_not_a_failure() -> None:
    async def main() -> None:
        task = spawn(_cancelled(), "watchdog")
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait([task])
        await asyncio.sleep(0)

    with capture_logs() as logs:
        asyncio.run(main())
    assert [e for e in logs if e["event"] == "background task failed"] == []
