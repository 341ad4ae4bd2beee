"""Dynamic batching: concurrent calls to one model become one forward pass.

Each loaded model version has a ``Batcher``: a bounded queue of pending calls
and ``instances`` worker threads. The event loop only appends a call to the
queue and wakes a worker; the worker takes the oldest call plus every queued
call whose non-batch shapes match (up to ``max_batch_size`` rows),
concatenates them, runs the forward pass and hands the whole batch's outputs
back to the loop in one callback. Forming batches in the worker, not in an
event-loop task, keeps the loop's share of each call to an append and a future:
the loop is what limits a small model's throughput. With
``max_queue_delay_us = 0`` a worker never waits for more calls: under load
batches form by themselves, and a lone caller pays nothing.

A pass shorter than the hand-off itself runs on the event loop instead
("inline"): when nothing is queued or running, the loop has no other work
waiting, and the model's measured pass time for the call's size is under
``[instances] inline_max_us``. Handing a 50 µs pass to a thread and back costs
more than the pass; under concurrent load, when the loop is the bottleneck,
calls still go to the workers, where they batch and run beside the loop.
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
from typing import NamedTuple

import numpy as np
import structlog

from edgeinferd.errors import (
    Cancelled,
    DeadlineExceeded,
    EdgeInferError,
    ModelExecutionError,
    Overloaded,
)
from edgeinferd.repository import ModelConfig

log = structlog.get_logger("edgeinferd.batching")

#: An inline pass this many times longer than ``inline_max_us`` turns inlining off.
_OVERRUN = 4

RunBatch = Callable[[Sequence[np.ndarray]], list[np.ndarray]]

#: A token that tells a worker to finish what is queued and stop.
_STOP = None


class Completed(NamedTuple):
    outputs: list[np.ndarray]
    #: Seconds from queueing to the start of the forward pass, and of the pass itself.
    queue_s: float
    compute_s: float


@dataclass(eq=False, slots=True)
class QueuedCall:
    """One call in a batcher's queue; ``future`` resolves to its ``Completed``."""

    inputs: Sequence[np.ndarray]
    rows: int
    #: Calls stack together only when these (non-batch shapes) are equal.
    key: tuple[tuple[int, ...], ...]
    future: asyncio.Future[Completed]
    deadline: float | None
    #: Input elements, for the pass-cost estimate.
    elements: int = 0
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """Counters the metrics layer reads; plain ints, no locking needed on the loop."""

    batches: int = 0
    rows: int = 0
    expired: int = 0
    rejected: int = 0
    #: Forward passes by their number of rows.
    sizes: Counter[int] = field(default_factory=Counter)


class PassCost:
    """The expected CPU seconds of one forward pass, from its input elements.

    A line through two warm-up passes (one row and a full batch), scaled by
    the passes measured since, so that a model whose passes turn out slower
    than its warm-up (other shapes, other values) stops running inline.
    Times are the running thread's CPU time, so that a pass preempted by
    other work on the machine does not count as a slow pass; the scale moves
    at most a few percent per pass, so one odd pass barely moves it.
    """

    #: Each pass moves the scale by at most this factor (up or down).
    _STEP = 1.07

    def __init__(self, small: tuple[int, float], large: tuple[int, float]) -> None:
        (n1, t1), (n2, t2) = small, large
        self.per_element = max(0.0, (t2 - t1) / (n2 - n1)) if n2 > n1 else 0.0
        self.fixed = max(1e-9, t1 - self.per_element * n1)
        #: Measured over expected: scales every estimate.
        self._scale = 1.0

    def expected(self, elements: int) -> float:
        return (self.fixed + self.per_element * elements) * self._scale

    def observe(self, elements: int, cpu_seconds: float) -> None:
        measured = cpu_seconds / (self.fixed + self.per_element * elements)
        step = min(max(measured / self._scale, 1 / self._STEP), self._STEP)
        self._scale *= step


def pass_clock(threads: int) -> Callable[[], float]:
    """The clock a pass is timed with: the thread's CPU time when the pass runs on the
    calling thread alone, wall time when torch's intra-op threads share it."""
    return time.thread_time if threads == 1 else time.perf_counter


class Batcher:
    """The queue of one model version and the worker threads that drain it.

    Thread boundaries: the event loop appends to ``_queue`` and owns every
    future; workers take from ``_queue`` under ``_lock`` and report back only
    through ``loop.call_soon_threadsafe``, once per forward pass. An inline
    pass runs on the loop inside ``enqueue`` and resolves its future there.
    """

    def __init__(self, config: ModelConfig, run: RunBatch, cost: PassCost | None = None) -> None:
        self.config = config
        self._run = run
        #: Set when the model may run inline: its measured pass cost.
        self._cost = cost if config.inline_max_us > 0 else None
        self._inline_max_s = config.inline_max_us / 1e6
        self._clock = pass_clock(config.threads)
        self._waits_every_time = (
            config.batched
            and config.batching.delay_policy == "fixed"
            and config.batching.max_queue_delay_us > 0
        )
        self._loop = asyncio.get_running_loop()
        self._queue: deque[QueuedCall] = deque()
        self._lock = threading.Lock()
        #: "Look at the queue": one per call, except while a worker waits for its
        #: batch to fill (then only once it is full); one _STOP per worker at
        #: close. An idle worker blocks here.
        self._tokens: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closing = False
        #: Calls taken by a worker whose outputs are not handed back yet (under _lock).
        self._running = 0
        #: Workers waiting up to max_queue_delay_us for a fuller batch (under _lock).
        self._filling = 0
        #: Set (under _lock) when the batch those workers wait for is full, or at close.
        #: A timed wait on a lock, not on ``_tokens``: CPython 3.11's
        #: ``SimpleQueue.get(timeout=...)`` can retry with a deadline already passed,
        #: which it hands the lock as a negative timeout, meaning "wait for ever" (seen:
        #: a worker blocked with a -8 µs timeout and its calls never answered). A
        #: lock's own timed acquire treats a passed deadline as a timeout.
        self._filled = threading.Event()
        #: The last forward pass served more than one call (the adaptive delay policy).
        self._company = False
        self.stats = BatchStats()
        #: Forward passes run on the event loop (a subset of ``stats.batches``).
        self.inline_passes = 0
        self._stopped: list[asyncio.Future[None]] = []
        # One thread per instance: each runs one forward pass at a time.
        for i in range(config.instances):
            stopped = self._loop.create_future()
            self._stopped.append(stopped)
            threading.Thread(
                target=self._serve,
                args=(stopped,),
                name=f"forward:{config.name}:{i}",
                daemon=True,
            ).start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Calls queued or in a forward pass whose outputs have not been handed back."""
        return len(self._queue) + self._running

    def enqueue(self, inputs: Sequence[np.ndarray], deadline: float | None = None) -> QueuedCall:
        """Queue one validated call without waiting: its ``future`` gives the outputs.

        Streams start many calls this way and collect them in order, with no
        task per call. ``deadline`` is a ``time.monotonic()`` instant; a call
        still queued then is dropped without running the model. A caller that
        stops waiting calls ``withdraw``.
        """
        if self._closing:
            raise Cancelled(f"model {self.config.name!r} version is being replaced or unloaded")
        if len(self._queue) >= self.config.batching.max_queue_size:
            self.stats.rejected += 1
            raise Overloaded(
                f"model {self.config.name!r} has {len(self._queue)} calls queued"
                f" (max_queue_size {self.config.batching.max_queue_size}); retry later"
            )
        inputs_elements = _elements(inputs)
        if self._cost is not None and self._may_run_inline(inputs_elements, deadline):
            return self._run_inline(inputs, inputs_elements, deadline)
        batched = self.config.batched
        call = QueuedCall(
            inputs=inputs,
            rows=inputs[0].shape[0] if batched else 1,
            key=_stack_key(inputs) if batched else (),
            future=self._loop.create_future(),
            deadline=deadline,
            elements=inputs_elements,
        )
        with self._lock:
            self._queue.append(call)
            # A worker waiting for its batch to fill is woken only once it has.
            wake = not self._filling or self._batch_full()
            if wake and self._filling:
                self._filled.set()
        if wake:
            self._tokens.put(True)
        return call

    def _may_run_inline(self, elements: int, deadline: float | None) -> bool:
        """Inline only when no worker has work and the loop has nothing else ready.

        Under concurrent load other calls are queued or running, or the last
        pass had company, so this one joins them (and their batch); a lone
        caller's call runs at once. A fixed queue delay means every batch
        waits for company, so it never runs inline.
        """
        if self._queue or self._running or self._company or self._waits_every_time:
            return False
        if _loop_has_ready_work(self._loop):
            return False
        if deadline is not None and time.monotonic() >= deadline:
            return False  # the queue's path answers DEADLINE_EXCEEDED
        assert self._cost is not None
        return self._cost.expected(elements) <= self._inline_max_s

    def _run_inline(
        self, inputs: Sequence[np.ndarray], elements: int, deadline: float | None
    ) -> QueuedCall:
        """Run one call's pass here, on the loop; its future is resolved on return."""
        rows = inputs[0].shape[0] if self.config.batched else 1
        call = QueuedCall(inputs, rows, (), self._loop.create_future(), deadline, elements)
        with self._lock:
            self._running += 1
        started, cpu_started = time.perf_counter(), self._clock()
        results = self._results([call])
        finished, cpu = time.perf_counter(), self._clock() - cpu_started
        self.inline_passes += 1
        if cpu > _OVERRUN * self._inline_max_s:
            # Its pass time depends on more than its inputs' sizes: never again on the loop.
            self._cost = None
            log.warning(
                "a forward pass on the event loop ran over; this model's passes now run"
                " in its worker threads",
                model=self.config.name,
                pass_us=round(cpu * 1e6),
                inline_max_us=self.config.inline_max_us,
            )
        self._deliver([call], results, started, finished, cpu)
        return call

    def withdraw(self, call: QueuedCall) -> None:
        """The caller went away: cancel the call and free its queue slot now."""
        call.future.cancel()
        with self._lock, contextlib.suppress(ValueError):
            self._queue.remove(call)

    async def close(self) -> None:
        """Stop taking calls, finish those queued and running, then stop the workers."""
        if not self._closing:
            with self._lock:
                self._closing = True
                self._filled.set()  # a worker waiting for a fuller batch stops waiting
            for _ in self._stopped:
                self._tokens.put(_STOP)
        await asyncio.gather(*self._stopped)

    # -- worker threads --------------------------------------------------------

    def _serve(self, stopped: asyncio.Future[None]) -> None:
        try:
            while self._tokens.get() is not _STOP:
                self._drain()
            self._drain()  # closing: nothing queued is dropped
        finally:
            self._post(_resolve, stopped)

    def _drain(self) -> None:
        """Run batches until the queue is empty (tokens only say "look")."""
        batching = self.config.batching
        delay = batching.max_queue_delay_us / 1e6 if self.config.batched else 0.0
        while self._queue:
            if delay and not self._closing and (batching.delay_policy == "fixed" or self._company):
                self._wait_for_more(delay)
            calls = self._take_batch()
            self._company = len(calls) > 1
            self._run_batch(calls)

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        """Run ``callback`` on the event loop; dropped if the loop is already gone."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _wait_for_more(self, delay: float) -> None:
        """Wait up to ``delay`` after the oldest call for the batch to fill."""
        while True:
            with self._lock:
                if not self._queue or self._batch_full() or self._closing:
                    return
                remaining = self._queue[0].enqueued + delay - time.perf_counter()
                if remaining <= 0:
                    return
                self._filling += 1
                self._filled.clear()
            try:
                self._filled.wait(remaining)
            finally:
                with self._lock:
                    self._filling -= 1

    def _batch_full(self) -> bool:
        """Enough rows queued to stop waiting (call with ``_lock`` held)."""
        rows = sum(c.rows for c in self._queue)
        preferred = self.config.batching.preferred_batch_sizes
        return rows >= self.config.max_batch_size or rows in preferred

    def _take_batch(self) -> list[QueuedCall]:
        """Remove the oldest live call and the compatible calls behind it."""
        now = time.monotonic()
        expired: list[QueuedCall] = []
        batch: list[QueuedCall] = []
        with self._lock:
            while self._queue and not batch:
                call = self._queue.popleft()
                if self._is_live(call, now, expired):
                    batch.append(call)
            if batch and self.config.batched:
                first = batch[0]
                rows = first.rows
                limit = self.config.max_batch_size
                skipped: list[QueuedCall] = []
                while self._queue and rows < limit:
                    call = self._queue.popleft()
                    if not self._is_live(call, now, expired):
                        continue
                    if call.key == first.key and rows + call.rows <= limit:
                        batch.append(call)
                        rows += call.rows
                    else:
                        skipped.append(call)
                self._queue.extendleft(reversed(skipped))
            self._running += len(batch)
        if expired:
            self._post(self._expire, expired)
        return batch

    @staticmethod
    def _is_live(call: QueuedCall, now: float, expired: list[QueuedCall]) -> bool:
        if call.future.done():  # cancelled by its caller meanwhile
            return False
        if call.deadline is not None and now >= call.deadline:
            expired.append(call)
            return False
        return True

    def _run_batch(self, calls: list[QueuedCall]) -> None:
        if not calls:
            return
        started, cpu_started = time.perf_counter(), self._clock()
        results = self._results(calls)
        finished, cpu = time.perf_counter(), self._clock() - cpu_started
        self._post(self._deliver, calls, results, started, finished, cpu)

    def _results(self, calls: list[QueuedCall]) -> list[list[np.ndarray]] | EdgeInferError:
        """Run the calls' pass; its error, typed, instead of raising."""
        try:
            return self._run_calls(calls)
        except EdgeInferError as error:
            return error
        except Exception as error:  # a bug in splitting, not in the model
            failure = ModelExecutionError(
                f"model {self.config.name!r} failed: {type(error).__name__}"
            )
            failure.__cause__ = error  # the data plane logs it with its traceback
            return failure

    def _run_calls(self, calls: list[QueuedCall]) -> list[list[np.ndarray]]:
        """Stack, run once, split back by rows."""
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

    # -- back on the event loop ------------------------------------------------

    def _deliver(
        self,
        calls: list[QueuedCall],
        results: list[list[np.ndarray]] | EdgeInferError,
        started: float,
        finished: float,
        cpu: float,
    ) -> None:
        with self._lock:
            self._running -= len(calls)
        if isinstance(results, EdgeInferError):
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(results)
            return
        rows = sum(c.rows for c in calls)
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.sizes[rows] += 1
        compute_s = finished - started
        if self._cost is not None:
            self._cost.observe(sum(c.elements for c in calls), cpu)
        for call, result in zip(calls, results, strict=True):
            if not call.future.done():
                call.future.set_result(Completed(result, started - call.enqueued, compute_s))

    def _expire(self, calls: list[QueuedCall]) -> None:
        for call in calls:
            if not call.future.done():
                self.stats.expired += 1
                call.future.set_exception(
                    DeadlineExceeded(f"deadline passed while queued for model {self.config.name!r}")
                )


def _elements(inputs: Sequence[np.ndarray]) -> int:
    if len(inputs) == 1:
        return int(inputs[0].size)
    return sum(int(a.size) for a in inputs)


def _stack_key(inputs: Sequence[np.ndarray]) -> tuple[tuple[int, ...], ...]:
    """Calls whose inputs have these shapes after the batch dimension stack together."""
    if len(inputs) == 1:
        return (inputs[0].shape[1:],)
    return tuple(a.shape[1:] for a in inputs)


def _loop_has_ready_work(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` has anything else to do now: callbacks waiting to run, or
    file descriptors ready to read (gRPC's completion queue wakes the loop through
    one, so requests that arrived meanwhile show there).

    asyncio's selector loops keep these in ``_ready`` and ``_selector`` (CPython
    since 3.4); asking the selector with a zero timeout consumes nothing, since
    epoll reports a ready descriptor until it is read. A loop without them is taken
    as busy, so calls go to the workers.
    """
    ready = getattr(loop, "_ready", None)
    selector = getattr(loop, "_selector", None)
    if ready is None or selector is None:
        return True
    return len(ready) > 0 or bool(selector.select(0))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
