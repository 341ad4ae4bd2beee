"""Checking a generation request against the model before it takes a slot.

Every refusal is the caller's mistake (InvalidInput) and says which
parameter is wrong, what came and what is allowed. Sizes are checked before
any work that grows with them: a prompt's token count against the context
before its ids are copied, a text's length before it is tokenized. The
tokenizing itself (``encode_prompt``) is for a worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from edgeinferd.errors import InvalidInput
from edgeinferd.generation.chat import ROLES, Message
from edgeinferd.generation.model import LanguageModel
from edgeinferd.generation.sampling import SamplingParams
from edgeinferd.generation.sequence import GenerationParams

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_MESSAGES = 256
#: No token of these vocabularies is longer than this many characters (runs of
#: spaces are the longest): text longer than context * this cannot fit.
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True, slots=True)
class Sampling:
    """The sampling fields of a request, as the caller sent them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None


def check_prompt_size(
    model: LanguageModel, prompt: str | Sequence[int] | Sequence[Message]
) -> None:
    """Refuse a prompt that cannot fit the context, before anything is copied or tokenized."""
    context = model.context
    if isinstance(prompt, str):
        texts = [prompt]
    elif prompt and isinstance(prompt[0], Message):
        if len(prompt) > MAX_MESSAGES:
            raise InvalidInput(f"{len(prompt)} messages; at most {MAX_MESSAGES}")
        texts = [m.content for m in prompt if isinstance(m, Message)]
    else:
        if len(prompt) >= context:
            raise InvalidInput(
                f"the prompt is {len(prompt)} tokens; model {model.name!r} has a context of"
                f" {context}, which leaves no room to generate"
            )
        return
    characters = sum(len(t) for t in texts)
    if characters > context * MAX_CHARS_PER_TOKEN:
        raise InvalidInput(
            f"the prompt is {characters} characters; model {model.name!r} has a context of"
            f" {context} tokens, so at most {context * MAX_CHARS_PER_TOKEN} characters can fit"
        )


def encode_prompt(
    model: LanguageModel, prompt: str | Sequence[int] | Sequence[Message]
) -> list[int]:
    """Token ids of a text, token list or conversation (runs the tokenizer: a worker's job)."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidInput("prompt is empty; give text, token ids or messages")
        return model.tokenizer.encode(prompt)
    if prompt and isinstance(prompt[0], Message):
        messages = [m for m in prompt if isinstance(m, Message)]
        for index, message in enumerate(messages):
            if message.role not in ROLES:
                raise InvalidInput(
                    f"messages[{index}].role is {message.role[:32]!r}; expected one of"
                    f" {', '.join(ROLES)}"
                )
        if model.chat_template is None:
            raise InvalidInput(f"model {model.name!r} has no chat template; send a prompt instead")
        return model.tokenizer.encode(model.chat_template.render(messages))
    ids = [int(i) for i in prompt if not isinstance(i, Message)]
    if not ids:
        raise InvalidInput("prompt is empty; give text, token ids or messages")
    bad = next((i for i in ids if not 0 <= i < model.vocab_size), None)
    if bad is not None:
        raise InvalidInput(
            f"prompt token id {bad} is outside the vocabulary of model {model.name!r}"
            f" (0 to {model.vocab_size - 1})"
        )
    return ids


def validate(
    model: LanguageModel,
    ids: list[int],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop: Sequence[str] = (),
) -> GenerationParams:
    name = model.name
    context = model.context
    room = context - len(ids)
    if room < 1:
        raise InvalidInput(
            f"the prompt is {len(ids)} tokens; model {name!r} has a context of {context},"
            " which leaves no room to generate"
        )
    if not 1 <= max_new_tokens <= context:
        raise InvalidInput(
            f"max_new_tokens is {max_new_tokens}; model {name!r} allows 1 to {context} (its"
            " context); a generation that reaches the context ends with finish reason CONTEXT"
        )
    s = sampling
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidInput(f"temperature is {s.temperature}; expected 0 (greedy) or more")
    if s.top_k < 0:
        raise InvalidInput(f"top_k is {s.top_k}; expected 0 (off) or more")
    top_p = 1.0 if s.top_p is None else s.top_p
    if not (0.0 < top_p <= 1.0):
        raise InvalidInput(f"top_p is {top_p}; expected a value in (0, 1]")
    if not (0.0 <= s.min_p < 1.0):
        raise InvalidInput(f"min_p is {s.min_p}; expected a value in [0, 1)")
    if not math.isfinite(s.repetition_penalty) or s.repetition_penalty <= 0:
        raise InvalidInput(
            f"repetition_penalty is {s.repetition_penalty}; expected a value above 0 (1 is off)"
        )
    if s.seed is not None and not 0 <= s.seed < 2**64:
        raise InvalidInput(f"seed is {s.seed}; expected 0 to 2**64 - 1")
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
        stop_token_ids=model.stop_token_ids,
        context=context,
        sampling=SamplingParams(
            temperature=float(s.temperature),
            top_k=s.top_k,
            top_p=float(top_p),
            min_p=float(s.min_p),
            repetition_penalty=float(s.repetition_penalty),
        ),
        seed=s.seed,
        stop=tuple(stop),
    )
