"""The stream pipeline's bounds, on the real ``answer_in_order``.

Transport-free on purpose: a caller that never reads its answers can only be
observed over gRPC through HTTP/2 flow-control windows, whose sizes are the
transport's business. Here ``finish`` blocks on a gate instead, standing for
that caller, and the test counts how many messages were started meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from edgeinferd.protocol.streams import STREAM_PIPELINE_BYTES, answer_in_order

MESSAGE = 2 << 20  # bytes


async def _messages(count: int, size: int) -> AsyncIterator[int]:
    for _ in range(count):
        yield size


async def _idle() -> None:
    """Let every ready task run until it blocks (asyncio runs ready callbacks in order,
    so a fixed number of loop turns is deterministic, not a guess at speed)."""
    for _ in range(1000):
        await asyncio.sleep(0)


def _run(count: int, size: int) -> tuple[int, list[int]]:
    """Messages started while the first answer is held; then every answer, in order."""

    async def main() -> tuple[int, list[int]]:
        gate = asyncio.Event()
        started: list[int] = []

        def start(message: int) -> int:
            started.append(message)
            return len(started)

        async def finish(index: int) -> int:
            if index == 1:
                await gate.wait()  # the caller is not reading answers
            return index

        answers: list[int] = []

        async def consume() -> None:
            async for answer in answer_in_order(
                _messages(count, size), start, finish, lambda _: None, size=lambda m: m
            ):
                answers.append(answer)

        task = asyncio.create_task(consume())
        await _idle()
        held = len(started)
        gate.set()
        await task
        return held, answers

    return asyncio.run(main())


def test_a_stream_holds_its_byte_budget_not_64_messages() -> None:
    """With 2 MiB messages, at most 16 MiB of them are started while an answer is held."""
    held, answers = _run(40, MESSAGE)
    assert held == STREAM_PIPELINE_BYTES // MESSAGE
    assert answers == list(range(1, 41))


def test_small_messages_are_bounded_by_the_depth() -> None:
    """Tiny messages still stop at the pipeline depth (64)."""
    held, answers = _run(200, 10)
    assert held == 64
    assert answers == list(range(1, 201))


def test_a_message_larger_than_the_budget_runs_alone() -> None:
    """A message over the budget is not refused: it runs once nothing else is in flight."""
    held, answers = _run(3, STREAM_PIPELINE_BYTES * 2)
    assert held == 1
    assert answers == [1, 2, 3]
