"""A language model ready to serve: weights, tokenizer, chat template and its cache.

Loaded from a version folder written by ``edgeinferd import`` (see
importer/write.py for the files). Weights are memory-mapped from
safetensors; nothing in the folder is code. The methods here are what the
engine (engine.py) calls from its step thread: ``prefill`` a prompt into a
slot, ``decode`` one token for every occupied slot, ``move`` a sequence to
another slot.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors import safe_open

from edgeinferd.errors import ConfigError
from edgeinferd.generation.cache import KVCache
from edgeinferd.generation.chat import ChatTemplate
from edgeinferd.generation.llama import ARCHITECTURES, Llama, LlamaConfig
from edgeinferd.generation.tokenizer import Tokenizer, load_tokenizer
from edgeinferd.repository import ModelConfig

log = structlog.get_logger("edgeinferd.generation")

_thread_state = threading.local()


@dataclass(frozen=True)
class Serving:
    """How a loaded model serves: slots, their context, prefill chunk, threads."""

    max_sequences: int
    context: int
    prefill_chunk: int
    threads: int


class LanguageModel:
    def __init__(
        self,
        name: str,
        llama: Llama,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate | None,
        stop_token_ids: frozenset[int],
        serving: Serving,
        weights: str,
    ) -> None:
        self.name = name
        self.llama = llama
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.stop_token_ids = stop_token_ids
        self.serving = serving
        self.weights = weights
        self.vocab_size = llama.config.vocab_size
        self.context = serving.context
        self.cache = KVCache(
            llama.config.layers,
            serving.max_sequences,
            llama.config.kv_heads,
            serving.context,
            llama.config.head_dim,
        )

    def _threads(self) -> None:
        if getattr(_thread_state, "threads", None) != self.serving.threads:
            torch.set_num_threads(self.serving.threads)
            _thread_state.threads = self.serving.threads

    def prefill(self, slot: int, tokens: list[int], start: int) -> torch.Tensor:
        """Run ``tokens`` (positions ``start..``) into ``slot``; the last one's logits [V]."""
        self._threads()
        ids = torch.tensor([tokens], dtype=torch.int64)
        positions = torch.arange(start, start + len(tokens), dtype=torch.int64).unsqueeze(0)
        with torch.inference_mode():
            return self.llama.forward(ids, positions, self.cache, slot)[0]

    def decode(self, last_tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for slots ``0 .. len(last_tokens) - 1``; logits [B, V]."""
        self._threads()
        ids = torch.tensor(last_tokens, dtype=torch.int64).unsqueeze(1)
        where = torch.tensor(positions, dtype=torch.int64).unsqueeze(1)
        with torch.inference_mode():
            return self.llama.forward(ids, where, self.cache, 0)

    def move(self, source: int, target: int, length: int) -> None:
        self.cache.move(source, target, length)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, V] at every position of one sequence, in a private cache (for scoring)."""
        self._threads()
        c = self.llama.config
        cache = KVCache(c.layers, 1, c.kv_heads, len(token_ids), c.head_dim)
        ids = torch.tensor([token_ids], dtype=torch.int64)
        positions = torch.arange(len(token_ids), dtype=torch.int64).unsqueeze(0)
        with torch.inference_mode():
            return self.llama.forward(ids, positions, cache, 0, last_only=False)[0]

    def warm_up(self) -> None:
        """Prefill and decode a few tokens: checks the weights run, fills allocator caches."""
        first = self.prefill(0, [0, 1, 2], 0)
        self.decode([int(torch.argmax(first).item())], [3])


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            where, "", "missing (import the model with `edgeinferd import`)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(where, "", f"unreadable: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(where, "", "expected a JSON object")
    return data


def load_language_model(folder: Path, config: ModelConfig | None = None) -> LanguageModel:
    """Load a version folder; ``config`` (the model's config.toml) sets slots and context.

    Without ``config`` (tools, benchmarks): one slot of the model's own context.
    """
    name = config.name if config is not None else folder.parent.name
    where = f"{name}/{folder.name}"
    llm = _read_json(folder / "llm.json", f"{where}/llm.json")
    try:
        architecture = LlamaConfig.from_dict(llm["architecture"])
    except (KeyError, TypeError) as error:
        raise ConfigError(f"{where}/llm.json", "architecture", f"invalid: {error}") from None
    if architecture.architecture not in ARCHITECTURES:
        raise ConfigError(
            f"{where}/llm.json",
            "architecture.architecture",
            f"{architecture.architecture!r} is not one of {', '.join(ARCHITECTURES)}",
        )
    generation = config.generation if config is not None else None
    context = generation.context if generation is not None else architecture.max_context
    if context > architecture.max_context:
        raise ConfigError(
            f"{name}/config.toml",
            "generation.context",
            f"{context} is more than the {architecture.max_context} positions the model was"
            " trained for",
        )
    serving = Serving(
        max_sequences=generation.max_sequences if generation is not None else 1,
        context=context,
        prefill_chunk=generation.prefill_chunk if generation is not None else 512,
        threads=generation.threads if generation is not None else torch.get_num_threads(),
    )
    bos = llm.get("bos_token_id")
    tokenizer = load_tokenizer(
        folder / "tokenizer.json", f"{where}/tokenizer.json", bos, bool(llm.get("add_bos"))
    )
    template_path = folder / "chat_template.jinja"
    template = None
    if template_path.is_file():
        stops = llm.get("stop_token_ids") or []
        template = ChatTemplate(
            template_path.read_text(encoding="utf-8"),
            bos_token=tokenizer.token_text(bos),
            eos_token=tokenizer.token_text(stops[0] if stops else None),
            where=f"{where}/chat_template.jinja",
        )
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as stored:
            tensors = {key: stored.get_tensor(key) for key in stored.keys()}  # noqa: SIM118
        llama = Llama(architecture, tensors, context)
    except (KeyError, RuntimeError, OSError, ValueError) as error:
        raise ConfigError(f"{where}/model.safetensors", "", f"unusable weights: {error}") from None
    del tensors
    model = LanguageModel(
        name,
        llama,
        tokenizer,
        template,
        frozenset(int(i) for i in llm.get("stop_token_ids") or []),
        serving,
        str(llm.get("weights", "none")),
    )
    log.info(
        "language model loaded",
        model=name,
        architecture=architecture.architecture,
        weights=model.weights,
        weight_mib=round(llama.weight_bytes() / 2**20, 1),
        kv_cache_mib=round(model.cache.nbytes / 2**20, 1),
        max_sequences=serving.max_sequences,
        context=serving.context,
    )
    return model
