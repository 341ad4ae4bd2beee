"""The plain one-sequence generation loop: the reference the engine must match.

No batching, no scheduler, no threads: prefill, then one decode call per
token. Tests compare the daemon's tokens with it, and the benchmark uses it
as the in-process baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeinferd.generation.model import GenerativeModel
from edgeinferd.generation.sampling import make_generator, sample
from edgeinferd.generation.sequence import FinishReason, GenerationParams
from edgeinferd.generation.text import TextStream


@dataclass(frozen=True)
class Generated:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason


def generate(model: GenerativeModel, params: GenerationParams) -> Generated:
    generator, _ = make_generator(params.seed)
    text = TextStream(model.tokenizer, params.stop)
    batch = model.new_batch()
    logits, cache = model.prefill(list(params.prompt))
    batch.add(cache)
    tokens: list[int] = []
    shown = ""
    while True:
        token = sample(logits, params.sampling, generator)
        tokens.append(token)
        piece, stopped = text.push(token)
        shown += piece
        if stopped:
            return Generated(tokens, shown, FinishReason.STOP)
        if len(tokens) >= params.max_new_tokens:
            return Generated(tokens, shown + text.finish(), FinishReason.LENGTH)
        logits = model.decode(batch, [token])[0]
