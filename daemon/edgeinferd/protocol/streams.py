"""Pipelined bidirectional streams, shared by every protocol's streaming RPC.

A sensor sends messages faster than one round trip each: up to ``depth``
messages of one stream are worked on at once (so they can batch together),
and the answers are yielded strictly in request order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")

#: Messages of one stream being worked on at once; reading pauses beyond it.
STREAM_PIPELINE_DEPTH = 64


async def answer_in_order(
    requests: AsyncIterator[Request],
    answer: Callable[[Request], Awaitable[Answer]],
    depth: int = STREAM_PIPELINE_DEPTH,
) -> AsyncIterator[Answer]:
    """Yield ``answer(message)`` for each message, in order, with ``depth`` in flight.

    ``answer`` must not raise for a bad message (it answers with an error
    message instead); a transport error while reading ends the stream.
    Closing the iterator (the caller went away) cancels the reader and every
    answer still being worked on, so nothing is left running.
    """
    slots = asyncio.Semaphore(depth)
    # Unbounded: the semaphore bounds it, and the reader can always post its end marker.
    pending: asyncio.Queue[asyncio.Future[Answer] | None] = asyncio.Queue()

    async def read() -> None:
        try:
            async for message in requests:
                await slots.acquire()
                pending.put_nowait(asyncio.ensure_future(answer(message)))
        finally:
            pending.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (task := await pending.get()) is not None:
            try:
                yield await task
            finally:
                slots.release()
        await reader  # surfaces a transport error from reading
    finally:
        reader.cancel()
        while not pending.empty():
            leftover = pending.get_nowait()
            if leftover is not None:
                leftover.cancel()
