"""One generation request as it moves through the engine, and what it reports."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

import torch

from edgeinferd.generation.sampling import SamplingParams, make_generator
from edgeinferd.generation.text import TextStream
from edgeinferd.generation.tokenizer import Tokenizer


class FinishReason(enum.Enum):
    #: max_new_tokens were generated.
    LENGTH = "LENGTH"
    #: The model ended its answer (an end-of-sequence token such as EOS or <|im_end|>),
    #: or a stop sequence appeared (neither is part of the text).
    STOP = "STOP"
    #: The sequence filled its slot's context: no position is left to continue.
    CONTEXT = "CONTEXT"
    #: The daemon stopped it: the model was unloaded or the daemon is shutting down.
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """A validated request (see edgeinferd.generation.params)."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    #: Token ids that end the generation (the model's EOS and end-of-turn tokens).
    stop_token_ids: frozenset[int] = frozenset()
    #: The slot's context: prompt plus generated tokens never pass it.
    context: int = 2**31
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True, slots=True)
class GenerationSummary:
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    #: From the request's arrival to its first token.
    time_to_first_token_s: float
    #: Generated tokens over the seconds from arrival to the last token.
    tokens_per_second: float
    #: Model calls this sequence took part in (prefill included).
    steps: int
    seed: int


GenerationEvent = GenerationChunk | GenerationSummary


class Sequence:
    """Engine-side state. Sampling and text fields belong to the step thread;
    ``cancelled`` and the queue belong to the event loop."""

    def __init__(
        self,
        request_id: str,
        params: GenerationParams,
        tokenizer: Tokenizer,
        deadline: float | None,
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.deadline = deadline
        self.generator: torch.Generator
        self.generator, self.seed = make_generator(params.seed)
        self.text = TextStream(tokenizer, params.stop)
        self.generated: list[int] = []
        self.finish: FinishReason | None = None
        self.cancelled = False
        self.steps = 0
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        #: Filled by the step thread, moved to ``queue`` by the loop after the step.
        self.outbox: list[GenerationEvent] = []
        self.queue: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        self.ended = False
        #: The cache slot it occupies (engine.py moves sequences between slots).
        self.slot = -1
        #: Prompt tokens already in the cache; the prompt is prefilled in chunks.
        self.prefilled = 0

    @property
    def live(self) -> bool:
        return self.finish is None and not self.cancelled

    @property
    def length(self) -> int:
        """Tokens in the cache once the next step has fed the last generated one."""
        return len(self.params.prompt) + len(self.generated) - 1

    def accept(self, token: int) -> None:
        """Record a sampled token and decide whether the sequence is done (step thread)."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.generated.append(token)
        if token in self.params.stop_token_ids:
            self.finish = FinishReason.STOP
            piece = self.text.finish()
        else:
            piece, stopped = self.text.push(token)
            if stopped:
                self.finish = FinishReason.STOP
            elif len(self.generated) >= self.params.max_new_tokens:
                self.finish = FinishReason.LENGTH
                piece += self.text.finish()
            elif len(self.params.prompt) + len(self.generated) >= self.params.context:
                self.finish = FinishReason.CONTEXT
                piece += self.text.finish()
        self.outbox.append(GenerationChunk((token,), piece))
        if self.finish is not None:
            self.outbox.append(self.summary(self.finish))

    def summary(self, reason: FinishReason) -> GenerationSummary:
        end = self.last_token_at or time.perf_counter()
        first = self.first_token_at
        elapsed = end - self.arrived
        count = len(self.generated)
        return GenerationSummary(
            finish_reason=reason,
            prompt_tokens=len(self.params.prompt),
            generated_tokens=count,
            time_to_first_token_s=(first - self.arrived) if first is not None else 0.0,
            tokens_per_second=count / elapsed if count and elapsed > 0 else 0.0,
            steps=self.steps,
            seed=self.seed,
        )
