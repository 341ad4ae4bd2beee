"""Choosing the next token: greedy, or sampling shaped by temperature, top-k, top-p, min-p
and a repetition penalty.

Every sequence owns a ``torch.Generator`` seeded from its request, and each
sampled token draws exactly one uniform number from it. The choice therefore
depends only on the sequence's own logits, history and seed, never on which
other sequences shared the decoding step, so a seeded request gives the same
tokens alone or in a crowd.

The order of the filters is transformers' (and llama.cpp's default chain):
repetition penalty on the raw logits, then temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    #: 0: greedy (argmax), and the generator is never drawn from.
    temperature: float = 0.0
    #: 0: no top-k filtering.
    top_k: int = 0
    #: 1.0: no nucleus filtering.
    top_p: float = 1.0
    #: 0.0: off. Otherwise drop tokens whose probability is below min_p times the top one's.
    min_p: float = 0.0
    #: 1.0: off. Above 1, tokens already in the sequence (prompt included) are made less
    #: likely: a positive logit is divided by it, a negative one multiplied (CTRL's rule,
    #: as transformers applies it).
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A private random stream; without a seed, one is drawn (and returned, for logs)."""
    if seed is None:
        seed = secrets.randbits(63)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator, seed


def penalize(logits: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0 or not history:
        return logits
    seen = torch.tensor(sorted(set(history)), dtype=torch.int64)
    scores = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    history: Sequence[int] = (),
) -> int:
    """One token id from a row of logits (shape [vocab])."""
    logits = penalize(logits, history, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits).item())
    # float64 keeps the cumulative sums below stable across platforms.
    scores = logits.detach().to(torch.float64) / params.temperature
    vocab = scores.shape[0]
    if 0 < params.top_k < vocab:
        threshold = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    order = torch.argsort(probs, descending=True, stable=True)
    ordered = probs[order]
    if params.top_p < 1.0:
        before = torch.cumsum(ordered, dim=-1) - ordered
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        ordered = ordered.masked_fill(before >= params.top_p, 0.0)
    if params.min_p > 0.0:
        ordered = ordered.masked_fill(ordered < params.min_p * ordered[0], 0.0)
    cdf = torch.cumsum(ordered, dim=-1)
    draw = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    index = int(torch.searchsorted(cdf, draw.reshape(1), right=True).item())
    index = min(index, vocab - 1)
    # Rounding could land on a zeroed tail entry; step back to the last kept one.
    while index > 0 and ordered[index] == 0.0:
        index -= 1
    return int(order[index].item())
