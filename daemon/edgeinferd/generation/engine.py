"""Continuous batching: every live sequence of a model advances one token per step.

A step is one trip to a worker thread. In it, every sequence already decoding
takes its next token in one batched call over the cache slots they occupy
(0 .. n - 1), and the sequence being prefilled runs one chunk of its prompt
(``prefill_chunk`` tokens) into the next slot; when its prompt is done it takes
its first token and decodes with the others from the next step on. So a long
prompt delays the others' tokens by one chunk per step, never by the whole
prompt. Between steps, on the event loop, finished, cancelled and expired
sequences leave and new ones join, so a caller never waits for another
caller's generation to end, and N callers cost one decoding loop, not N.
This is llama.cpp's server loop (slots, one batch per step), in small.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from concurrent.futures import Executor

import structlog
import torch

from edgeinferd.errors import (
    Cancelled,
    DeadlineExceeded,
    EdgeInferError,
    ModelExecutionError,
    Overloaded,
)
from edgeinferd.generation.model import LanguageModel
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
    def __init__(self, model: LanguageModel, executor: Executor) -> None:
        self.model = model
        self.max_sequences = model.serving.max_sequences
        self._executor = executor
        #: Decoding sequences; ``_rows[i]`` occupies cache slot i (the step thread's).
        self._rows: list[Sequence] = []
        #: The sequence whose prompt is being prefilled, in slot ``len(_rows)``.
        self._prefilling: Sequence | None = None
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
        prefilling = [self._prefilling] if self._prefilling is not None else []
        for sequence in [*self._pending, *prefilling, *self._rows]:
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
            if self._prefilling is not None and not self._prefilling.live:
                self._prefilling = None
            if self._prefilling is None and self._pending:
                self._prefilling = self._pending.pop(0)
            if self._prefilling is None and not any(s.live for s in self._rows):
                if self._closing:
                    return
                self._rows = []
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            rows, prefilling = self._rows, self._prefilling
            taking_part = [*rows, *([prefilling] if prefilling is not None else [])]
            try:
                self._rows, done = await loop.run_in_executor(
                    self._executor, self._step, rows, prefilling
                )
            except Exception as error:
                self._fail(taking_part, error)
                continue
            if done:
                self._prefilling = None
            for sequence in taking_part:
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
        self._rows = []
        self._prefilling = None

    def _step(
        self, rows: list[Sequence], prefilling: Sequence | None
    ) -> tuple[list[Sequence], bool]:
        """Worker thread: close the gaps left by dead rows, decode the live ones, prefill
        one chunk. Returns the decoding rows for the next step, and whether the prefill
        is over (its prompt done, or the sequence gone)."""
        self.steps += 1
        model = self.model
        decoding: list[Sequence] = []
        for sequence in rows:
            if not sequence.live:
                continue
            slot = len(decoding)
            if sequence.slot != slot:
                model.move(sequence.slot, slot, sequence.length)
                sequence.slot = slot
            decoding.append(sequence)
        if decoding:
            logits = model.decode([s.generated[-1] for s in decoding], [s.length for s in decoding])
            for sequence, row in zip(decoding, logits, strict=True):
                sequence.steps += 1
                sequence.accept(self._sample(sequence, row))
        next_rows = [s for s in decoding if s.live]
        if prefilling is None or not prefilling.live:
            return next_rows, True
        # The prefilling sequence sits right after the decoding ones.
        slot = len(decoding)
        if prefilling.slot != slot:
            if prefilling.slot >= 0:
                model.move(prefilling.slot, slot, prefilling.prefilled)
            prefilling.slot = slot
        prompt = prefilling.params.prompt
        start = prefilling.prefilled
        chunk = list(prompt[start : start + model.serving.prefill_chunk])
        last = model.prefill(slot, chunk, start)
        prefilling.prefilled += len(chunk)
        if prefilling.prefilled < len(prompt):
            return next_rows, False
        prefilling.steps += 1
        prefilling.accept(self._sample(prefilling, last))
        if prefilling.live:
            # Its slot must follow the rows that stay; a row that ended this step left a gap.
            target = len(next_rows)
            if target != slot:
                model.move(slot, target, prefilling.length)
                prefilling.slot = target
            next_rows.append(prefilling)
        return next_rows, True

    @staticmethod
    def _sample(sequence: Sequence, logits: torch.Tensor) -> int:
        params = sequence.params.sampling
        history: list[int] = []
        if params.repetition_penalty != 1.0:
            history = [*sequence.params.prompt, *sequence.generated]
        return sample(logits, params, sequence.generator, history)
