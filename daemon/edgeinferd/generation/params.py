"""Checking a generation request against the model before it takes a slot.

Every refusal is the caller's mistake (InvalidInput) and says which
parameter is wrong, what came and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from edgeinferd.errors import InvalidInput
from edgeinferd.generation.model import GenerativeModel
from edgeinferd.generation.sampling import SamplingParams
from edgeinferd.generation.sequence import GenerationParams

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256


def validate(
    model: GenerativeModel,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
) -> GenerationParams:
    name = model.name
    vocab = min(model.geometry.vocab_size, model.tokenizer.vocab_size)
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidInput("prompt is empty; give text or token ids")
        ids = model.tokenizer.encode(prompt)
    else:
        ids = [int(i) for i in prompt]
        if not ids:
            raise InvalidInput("prompt is empty; give text or token ids")
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise InvalidInput(
                f"prompt token id {bad} is outside the vocabulary of model {name!r}"
                f" (0 to {vocab - 1})"
            )
    context = model.geometry.context
    room = context - len(ids)
    if room < 1:
        raise InvalidInput(
            f"the prompt is {len(ids)} tokens; model {name!r} has a context of {context},"
            " which leaves no room to generate"
        )
    if not 1 <= max_new_tokens <= room:
        raise InvalidInput(
            f"max_new_tokens is {max_new_tokens}; with a prompt of {len(ids)} tokens, model"
            f" {name!r} (context {context}) allows 1 to {room}"
        )
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidInput(f"temperature is {temperature}; expected 0 (greedy) or more")
    if top_k < 0:
        raise InvalidInput(f"top_k is {top_k}; expected 0 (off) or more")
    if top_p is None:
        top_p = 1.0
    if not (0.0 < top_p <= 1.0):
        raise InvalidInput(f"top_p is {top_p}; expected a value in (0, 1]")
    if seed is not None and not 0 <= seed < 2**64:
        raise InvalidInput(f"seed is {seed}; expected 0 to 2**64 - 1")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidInput(f"{len(stop)} stop sequences; at most {MAX_STOP_SEQUENCES}")
    for text in stop:
        if not text or len(text) > MAX_STOP_LENGTH:
            raise InvalidInput(
                f"stop sequence {text[:32]!r} is empty or too long (1 to {MAX_STOP_LENGTH} chars)"
            )
    return GenerationParams(
        prompt=tuple(ids),
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=float(temperature), top_k=top_k, top_p=float(top_p)),
        seed=seed,
        stop=tuple(stop),
    )
