"""Pipelined bidirectional streams, shared by every protocol's streaming RPC.

A sensor sends messages faster than one round trip each: up to ``depth``
messages of one stream are worked on at once (so they can batch together),
and the answers are yielded strictly in request order.

Because answers leave in order, nothing needs a task per message: each
message is *started* as it arrives (decoded, validated, queued on its
model's batcher) and *finished* by the one writer, in turn. The event loop's
share of a stream message is what limits a small model's message rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Started = TypeVar("Started")
Answer = TypeVar("Answer")

#: Messages of one stream being worked on at once; reading pauses beyond it.
STREAM_PIPELINE_DEPTH = 64


class _End:
    """The reader's last word: no more messages."""


_END = _End()


async def answer_in_order(
    requests: AsyncIterator[Request],
    start: Callable[[Request], Started],
    finish: Callable[[Started], Awaitable[Answer]],
    abandon: Callable[[Started], None],
    depth: int = STREAM_PIPELINE_DEPTH,
) -> AsyncIterator[Answer]:
    """Yield ``await finish(start(message))`` for each message, in order, ``depth`` ahead.

    ``start`` runs as each message arrives; it must not block or raise (a bad
    message becomes something ``finish`` answers with an error). ``finish``
    must not raise for a bad message either. A transport error while reading
    ends the stream after the messages before it are answered. Closing the
    iterator (the caller went away) stops the reader and hands every message
    started but not finished to ``abandon``, so nothing is left running.
    """
    slots = asyncio.Semaphore(depth)
    # Unbounded: the semaphore bounds it, and the reader can always post its end marker.
    pending: asyncio.Queue[Started | _End] = asyncio.Queue()

    async def read() -> None:
        try:
            async for message in requests:
                await slots.acquire()
                pending.put_nowait(start(message))
        finally:
            pending.put_nowait(_END)

    reader = asyncio.create_task(read())
    current: Started | _End = _END
    try:
        while not isinstance(current := await pending.get(), _End):
            answer = await finish(current)
            current = _END
            slots.release()
            yield answer
        await reader  # surfaces a transport error from reading
    finally:
        reader.cancel()
        if not isinstance(current, _End):
            abandon(current)
        while not pending.empty():
            leftover = pending.get_nowait()
            if not isinstance(leftover, _End):
                abandon(leftover)
