"""Dynamic batching: concurrent calls to one model become one forward pass.

Each loaded model version has a ``Batcher``: a bounded queue of pending calls
and ``instances`` consumer tasks. A consumer takes the oldest call plus every
queued call whose non-batch shapes match (up to ``max_batch_size`` rows),
concatenates them, runs the forward pass in a worker thread and hands each
caller its rows of the outputs. With ``max_queue_delay_us = 0`` it never waits
for more calls: under load batches form by themselves, and a lone caller pays
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np

from edgeinferd.errors import (
    Cancelled,
    DeadlineExceeded,
    EdgeInferError,
    ModelExecutionError,
    Overloaded,
)
from edgeinferd.repository import ModelConfig

RunBatch = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False, slots=True)
class _Call:
    inputs: Sequence[np.ndarray]
    rows: int
    #: Calls stack together only when these (non-batch shapes) are equal.
    key: tuple[tuple[int, ...], ...]
    future: asyncio.Future[list[np.ndarray]]
    deadline: float | None
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    finished: float = 0.0


class Worker:
    """A thread that runs forward passes handed to it from the event loop.

    Cheaper per hand-off than ``loop.run_in_executor`` (no concurrent.futures
    Future to wrap and chain): one queue put, one ``call_soon_threadsafe``.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"forward:{name}", daemon=True)
        self._thread.start()

    async def run(self, function: Callable[[T], R], argument: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._jobs.put((loop, future, function, argument))
        return await future

    def stop(self) -> None:
        self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, function, argument = job
            try:
                result = function(argument)
            except BaseException as error:  # handed to the awaiting task, not lost
                loop.call_soon_threadsafe(_settle, future, None, error)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Completed(NamedTuple):
    outputs: list[np.ndarray]
    #: Seconds from queueing to the start of the forward pass, and of the pass itself.
    queue_s: float
    compute_s: float


@dataclass
class BatchStats:
    """Counters the metrics layer reads; plain ints, no locking needed on the loop."""

    batches: int = 0
    rows: int = 0
    expired: int = 0
    rejected: int = 0
    #: Forward passes by their number of rows.
    sizes: Counter[int] = field(default_factory=Counter)


class Batcher:
    def __init__(self, config: ModelConfig, run: RunBatch) -> None:
        self.config = config
        self._run = run
        self._queue: deque[_Call] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._running = 0
        self.stats = BatchStats()
        # One thread per instance: each runs one forward pass at a time.
        self._workers = [Worker(f"{config.name}:{i}") for i in range(config.instances)]
        self._consumers = [
            asyncio.create_task(self._consume(worker), name=f"batcher:{config.name}:{i}")
            for i, worker in enumerate(self._workers)
        ]

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._queue) + self._running

    async def submit(
        self, inputs: Sequence[np.ndarray], deadline: float | None = None
    ) -> Completed:
        """Queue one validated call and wait for its outputs.

        ``deadline`` is a ``time.monotonic()`` instant; a call still queued
        then is dropped without running the model.
        """
        if self._closing:
            raise Cancelled(f"model {self.config.name!r} version is being replaced or unloaded")
        if len(self._queue) >= self.config.batching.max_queue_size:
            self.stats.rejected += 1
            raise Overloaded(
                f"model {self.config.name!r} has {len(self._queue)} calls queued"
                f" (max_queue_size {self.config.batching.max_queue_size}); retry later"
            )
        batched = self.config.batched
        call = _Call(
            inputs=inputs,
            rows=inputs[0].shape[0] if batched else 1,
            key=tuple(a.shape[1:] for a in inputs) if batched else (),
            future=asyncio.get_running_loop().create_future(),
            deadline=deadline,
        )
        self._queue.append(call)
        self._wakeup.set()
        try:
            outputs = await call.future
        except asyncio.CancelledError:
            # The caller went away: free its queue slot now, not when it is reached.
            with contextlib.suppress(ValueError):
                self._queue.remove(call)
            raise
        return Completed(outputs, call.started - call.enqueued, call.finished - call.started)

    async def close(self) -> None:
        """Stop taking calls, finish those queued and running, then stop consumers."""
        self._closing = True
        self._wakeup.set()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        for worker in self._workers:
            worker.stop()

    async def _consume(self, worker: Worker) -> None:
        delay = self.config.batching.max_queue_delay_us / 1e6
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            if delay and self.config.batched and not self._closing:
                await self._wait_for_more(delay)
            calls = self._take_batch()
            if not calls:
                continue
            self._running += 1
            try:
                await self._run_batch(calls, worker)
            finally:
                self._running -= 1

    async def _wait_for_more(self, delay: float) -> None:
        """Wait up to ``delay`` after the oldest call for the batch to fill."""
        preferred = self.config.batching.preferred_batch_sizes
        target = self.config.max_batch_size
        until = self._queue[0].enqueued + delay
        while True:
            rows = sum(c.rows for c in self._queue)
            remaining = until - time.perf_counter()
            if rows >= target or rows in preferred or remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Call]:
        """Remove the oldest live call and the compatible calls behind it."""
        now = time.monotonic()
        first = None
        while self._queue and first is None:
            call = self._queue.popleft()
            if self._is_live(call, now):
                first = call
        if first is None:
            return []
        batch = [first]
        if not self.config.batched:
            return batch
        rows = first.rows
        limit = self.config.max_batch_size
        skipped: list[_Call] = []
        while self._queue and rows < limit:
            call = self._queue.popleft()
            if not self._is_live(call, now):
                continue
            if call.key == first.key and rows + call.rows <= limit:
                batch.append(call)
                rows += call.rows
            else:
                skipped.append(call)
        self._queue.extendleft(reversed(skipped))
        return batch

    def _is_live(self, call: _Call, now: float) -> bool:
        if call.future.done():
            return False
        if call.deadline is not None and now >= call.deadline:
            self.stats.expired += 1
            call.future.set_exception(
                DeadlineExceeded(f"deadline passed while queued for model {self.config.name!r}")
            )
            return False
        return True

    async def _run_batch(self, calls: list[_Call], worker: Worker) -> None:
        started = time.perf_counter()
        try:
            outputs = await worker.run(self._run_calls, calls)
        except EdgeInferError as error:
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(error)
            return
        except Exception as error:  # a bug in splitting, not in the model
            failure = ModelExecutionError(
                f"model {self.config.name!r} failed: {type(error).__name__}"
            )
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(failure)
            return
        rows = sum(c.rows for c in calls)
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.sizes[rows] += 1
        finished = time.perf_counter()
        for call, result in zip(calls, outputs, strict=True):
            call.started, call.finished = started, finished
            if not call.future.done():
                call.future.set_result(result)

    def _run_calls(self, calls: list[_Call]) -> list[list[np.ndarray]]:
        """Worker thread: stack, run once, split back by rows."""
        if len(calls) == 1:
            return [self._run(calls[0].inputs)]
        stacked = [np.concatenate(parts) for parts in zip(*(c.inputs for c in calls), strict=True)]
        outputs = self._run(stacked)
        total = sum(c.rows for c in calls)
        for index, output in enumerate(outputs):
            if output.ndim == 0 or output.shape[0] != total:
                raise ModelExecutionError(
                    f"model {self.config.name!r} output {self.config.outputs[index].name!r}"
                    f" has {output.shape[0] if output.ndim else 0} rows for a batch of {total}"
                )
        results = []
        start = 0
        for call in calls:
            end = start + call.rows
            results.append([output[start:end] for output in outputs])
            start = end
        return results
