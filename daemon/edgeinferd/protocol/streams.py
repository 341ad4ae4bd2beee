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
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

from edgeinferd.budgets import ByteBudget
from edgeinferd.dataplane import DataPlane, InferenceRequest, InferenceResponse, PendingInference

Request = TypeVar("Request")
Started = TypeVar("Started")
Answer = TypeVar("Answer")

#: Messages of one stream being worked on at once; reading pauses beyond it.
STREAM_PIPELINE_DEPTH = 64
#: Bytes of request messages of one stream being worked on at once; reading pauses
#: beyond it too, so a stream whose answers are never read holds this much, not
#: 64 messages of whatever size. A single larger message (up to the transport's
#: message limit) still runs, alone.
STREAM_PIPELINE_BYTES = 16 << 20


class _End:
    """The reader's last word: no more messages."""


_END = _End()


async def answer_in_order(
    requests: AsyncIterator[Request],
    start: Callable[[Request], Started],
    finish: Callable[[Started], Awaitable[Answer]],
    abandon: Callable[[Started], None],
    depth: int = STREAM_PIPELINE_DEPTH,
    size: Callable[[Request], int] | None = None,
    max_bytes: int = STREAM_PIPELINE_BYTES,
    shared: ByteBudget | None = None,
) -> AsyncGenerator[Answer, None]:
    """Yield ``await finish(start(message))`` for each message, in order, ``depth`` ahead.

    ``start`` runs as each message arrives; it must not block or raise (a bad
    message becomes something ``finish`` answers with an error). ``finish``
    must not raise for a bad message either. A transport error while reading
    ends the stream after the messages before it are answered. Closing the
    iterator (the caller went away) stops the reader and hands every message
    started but not finished to ``abandon``, so nothing is left running.
    With ``size``, messages also wait until their bytes fit ``max_bytes`` (or
    nothing else is in flight). With ``shared`` too (the budget the stream
    shares with others, ``edgeinferd.budgets``), the next message is read only
    while that budget has room or this stream holds nothing in it, and its
    bytes count there until answered.
    """
    slots = asyncio.Semaphore(depth)
    room = asyncio.Condition()
    held = 0
    #: Bytes this stream counts in ``shared``: given back as answered, the rest at the end.
    shared_held = 0
    # Unbounded: the semaphore bounds it, and the reader can always post its end marker.
    pending: asyncio.Queue[tuple[Started, int] | _End] = asyncio.Queue()

    def fits(nbytes: int) -> bool:
        return held == 0 or held + nbytes <= max_bytes

    def holds_nothing_shared() -> bool:
        return shared_held == 0

    #: This stream's key in ``shared``: its own releases wake only its own reader.
    owner = object()

    async def read() -> None:
        nonlocal held, shared_held
        try:
            messages = aiter(requests)
            while True:
                if shared is not None:
                    await shared.wait_for_room(owner, holds_nothing_shared)
                try:
                    message = await anext(messages)
                except StopAsyncIteration:
                    break
                nbytes = size(message) if size is not None else 0
                if shared is not None:
                    shared.take(nbytes)
                    shared_held += nbytes
                await slots.acquire()
                if nbytes:
                    async with room:
                        await room.wait_for(functools.partial(fits, nbytes))
                        held += nbytes
                pending.put_nowait((start(message), nbytes))
        finally:
            pending.put_nowait(_END)

    async def release(nbytes: int) -> None:
        nonlocal held, shared_held
        slots.release()
        if shared is not None:
            shared_held -= nbytes
            shared.release(nbytes, owner)
        if nbytes:
            async with room:
                held -= nbytes
                room.notify_all()

    reader = asyncio.create_task(read())
    current: tuple[Started, int] | _End = _END
    try:
        while not isinstance(current := await pending.get(), _End):
            started, nbytes = current
            answer = await finish(started)
            current = _END
            await release(nbytes)
            yield answer
        await reader  # surfaces a transport error from reading
    finally:
        reader.cancel()
        if shared is not None:
            shared.release(shared_held, owner)
            shared_held = 0
        if not isinstance(current, _End):
            abandon(current[0])
        while not pending.empty():
            leftover = pending.get_nowait()
            if not isinstance(leftover, _End):
                abandon(leftover[0])


async def answer_inferences(
    requests: AsyncIterator[Request],
    dataplane: DataPlane,
    connection: str,
    decode: Callable[[Request], InferenceRequest],
    answer: Callable[[Request, InferenceResponse], Answer],
    fail: Callable[[Request, Exception], Answer],
    size: Callable[[Request], int],
) -> AsyncGenerator[Answer, None]:
    """An inference stream of any protocol: each message decoded and queued on the data
    plane as it arrives, answered in order (``answer``), or with its error (``fail``) while
    the stream stays open; the stream's bytes count in ``connection``'s shared budget.

    The protocol adapters give only their conversions; starting, collecting and
    abandoning calls is the same for every protocol, so it is written once, here. An
    adapter closes this generator when its own is closed (``contextlib.aclosing``), so
    that a departed caller's calls are abandoned within that close, not later in a task
    that asyncio's finalizer hook schedules for an unclosed generator.
    """

    def start(message: Request) -> tuple[Request, PendingInference | Exception]:
        try:
            return message, dataplane.start(decode(message))
        except Exception as error:  # answered in turn by finish, as the message's error
            return message, error

    async def finish(item: tuple[Request, PendingInference | Exception]) -> Answer:
        message, started = item
        try:
            if isinstance(started, Exception):
                raise started
            return answer(message, await dataplane.complete(started))
        except Exception as error:
            return fail(message, error)

    def abandon(item: tuple[Request, PendingInference | Exception]) -> None:
        if isinstance(item[1], PendingInference):
            dataplane.abandon(item[1])

    with dataplane.stream_budgets.stream(connection) as shared:
        replies = answer_in_order(requests, start, finish, abandon, size=size, shared=shared)
        async with contextlib.aclosing(replies):
            async for reply in replies:
                yield reply
