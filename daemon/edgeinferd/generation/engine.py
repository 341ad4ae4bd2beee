"""Continuous batching: every live sequence of a model advances one token per step.

A step is one trip to a worker thread. In it, the sequences that arrived
since the last step are prefilled (one call each) and take their first
token, and every sequence already running decodes its next token in a
single batched call over the padded caches (edgeinferd.generation.cache).
Between steps, on the event loop, finished, cancelled and expired
sequences leave and new ones join, so a caller never waits for another
caller's generation to end, and N callers cost one decoding loop, not N.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from concurrent.futures import Executor

import structlog

from edgeinferd.errors import (
    Cancelled,
    DeadlineExceeded,
    EdgeInferError,
    ModelExecutionError,
    Overloaded,
)
from edgeinferd.generation.model import GenerativeModel
from edgeinferd.generation.sampling import sample
from edgeinferd.generation.sequence import (
    FinishReason,
    GenerationEvent,
    GenerationParams,
    GenerationSummary,
    Sequence,
)

log = structlog.get_logger("edgeinferd.generation")


class GenerationEngine:
    def __init__(self, model: GenerativeModel, max_sequences: int, executor: Executor) -> None:
        self.model = model
        self.max_sequences = max_sequences
        self._executor = executor
        self._batch = model.new_batch()
        #: Sequences with a row in ``_batch``, in row order (the step thread's).
        self._rows: list[Sequence] = []
        self._pending: list[Sequence] = []
        #: Every sequence holding a slot: pending, decoding, or finishing this step.
        self._slots: set[Sequence] = set()
        self._wakeup = asyncio.Event()
        self._closing = False
        #: Model steps taken so far (each is one trip to a worker thread).
        self.steps = 0
        self._task = asyncio.create_task(self._run(), name=f"generation:{model.name}")

    @property
    def active(self) -> int:
        """Sequences holding a slot now."""
        return len(self._slots)

    def submit(
        self, params: GenerationParams, request_id: str = "", deadline: float | None = None
    ) -> Sequence:
        """Reserve a slot for a validated request; it joins at the next step."""
        if self._closing:
            raise Cancelled(f"model {self.model.name!r} version is being replaced or unloaded")
        if len(self._slots) >= self.max_sequences:
            raise Overloaded(
                f"model {self.model.name!r} is generating {len(self._slots)} sequences"
                f" (max_sequences {self.max_sequences}); retry later"
            )
        sequence = Sequence(request_id, params, self.model.tokenizer, deadline)
        self._slots.add(sequence)
        self._pending.append(sequence)
        self._wakeup.set()
        return sequence

    async def stream(self, sequence: Sequence) -> AsyncGenerator[GenerationEvent, None]:
        """Chunks as they are made, then the summary. Leaving early cancels the sequence."""
        try:
            while True:
                item = await sequence.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationSummary):
                    return
        finally:
            self.cancel(sequence)

    def cancel(self, sequence: Sequence) -> None:
        """Free the slot now; the row leaves the batch before the next step."""
        if sequence.ended:
            return
        sequence.cancelled = True
        self._end(sequence, None)

    async def close(self, drain: bool = True) -> None:
        """Stop taking requests. ``drain``: let running sequences finish; otherwise they
        end at the next step with finish reason CANCELLED."""
        self._closing = True
        if not drain:
            for sequence in list(self._slots):
                sequence.queue.put_nowait(sequence.summary(FinishReason.CANCELLED))
                sequence.cancelled = True
                self._end(sequence, FinishReason.CANCELLED)
        self._wakeup.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    # -- the loop ------------------------------------------------------------

    def _end(self, sequence: Sequence, reason: FinishReason | None) -> None:
        if sequence.ended:
            return
        sequence.ended = True
        self._slots.discard(sequence)
        summary = sequence.summary(reason or FinishReason.CANCELLED)
        log.debug(
            "generation ended",
            model=self.model.name,
            request_id=sequence.request_id,
            finish_reason=reason.value if reason else "CLIENT_CANCELLED",
            prompt_tokens=summary.prompt_tokens,
            generated_tokens=summary.generated_tokens,
            steps=summary.steps,
            seed=summary.seed,
        )

    def _expire(self, now: float) -> None:
        for sequence in [*self._pending, *self._rows]:
            if sequence.live and sequence.deadline is not None and now >= sequence.deadline:
                sequence.queue.put_nowait(
                    DeadlineExceeded(
                        f"deadline passed after {len(sequence.generated)} generated tokens"
                    )
                )
                sequence.cancelled = True
                self._end(sequence, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._expire(time.monotonic())
            self._pending = [s for s in self._pending if s.live]
            if not self._pending and not any(s.live for s in self._rows):
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            joining, self._pending = self._pending, []
            rows = self._rows
            try:
                self._rows = await loop.run_in_executor(self._executor, self._step, rows, joining)
            except Exception as error:
                self._fail([*rows, *joining], error)
                continue
            for sequence in [*rows, *joining]:
                if sequence.outbox and not sequence.ended:
                    for event in sequence.outbox:
                        sequence.queue.put_nowait(event)
                sequence.outbox.clear()
                if sequence.finish is not None:
                    self._end(sequence, sequence.finish)

    def _fail(self, sequences: list[Sequence], error: Exception) -> None:
        """A step raised: every sequence in it fails, and the batch starts afresh."""
        failure = (
            error
            if isinstance(error, EdgeInferError)
            else ModelExecutionError(f"model {self.model.name!r} failed: {type(error).__name__}")
        )
        log.error("generation step failed", model=self.model.name, error=str(error))
        for sequence in sequences:
            if not sequence.ended:
                sequence.queue.put_nowait(failure)
                self._end(sequence, None)
        self._batch = self.model.new_batch()
        self._rows = []

    def _step(self, rows: list[Sequence], joining: list[Sequence]) -> list[Sequence]:
        """Worker thread: drop dead rows, decode the live ones, prefill the newcomers."""
        self.steps += 1
        keep = [i for i, s in enumerate(rows) if s.live]
        self._batch.keep(keep)
        decoding = [rows[i] for i in keep]
        if decoding:
            logits = self.model.decode(self._batch, [s.generated[-1] for s in decoding])
            for sequence, row in zip(decoding, logits, strict=True):
                sequence.steps += 1
                sequence.accept(sample(row, sequence.params.sampling, sequence.generator))
        for sequence in joining:
            if not sequence.live:
                continue
            last, cache = self.model.prefill(list(sequence.params.prompt))
            sequence.steps += 1
            sequence.accept(sample(last, sequence.params.sampling, sequence.generator))
            self._batch.add(cache)
            decoding.append(sequence)
        return decoding
