"""What every source is read into: numbers, weights, tokenizer, chat template."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edgeinferd.generation.llama import LlamaConfig


class ImportRefused(Exception):
    """The source cannot be imported; the message says what was found and what is supported."""


@dataclass(frozen=True)
class Int4Codes:
    """A matrix already in 4-bit groups of 32 (GGUF Q4_0 / Q4_1): ``code * scale + min``."""

    codes: torch.Tensor  # uint8 [out, in], 0..15
    scale: torch.Tensor  # float32 [out, in / 32]
    minimum: torch.Tensor  # float32 [out, in / 32]


@dataclass
class Weight:
    """One source tensor, read on demand (a checkpoint is far larger than what one step needs)."""

    read: Callable[[], torch.Tensor]
    #: When the source stores it as 4-bit groups of 32, the exact codes (kept as is by int4).
    read_int4: Callable[[], Int4Codes] | None = None
    #: The source's own type name, for the manifest (F32, Q4_1, BF16, ...).
    source_type: str = "F32"


@dataclass
class Checkpoint:
    config: LlamaConfig
    #: Engine names (see generation/llama.py): tok_embeddings, layers.N.attention.{q,k,v,o},
    #: layers.N.attention.{q,k,v}.bias, layers.N.feed_forward.{gate,up,down},
    #: layers.N.{attention,ffn}_norm, norm, output.
    weights: dict[str, Weight]
    #: A `tokenizers` JSON document.
    tokenizer_json: str
    chat_template: str | None
    bos_token_id: int | None
    #: Tokens that end a generation (EOS, and e.g. <|im_end|> / <|eot_id|>).
    stop_token_ids: tuple[int, ...]
    #: Whether a prompt starts with BOS (llama.cpp's add_bos_token).
    add_bos: bool
    #: What the source is, for the manifest.
    source_format: str
    notes: list[str] = field(default_factory=list)
