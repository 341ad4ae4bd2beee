"""The generation interface of an artifact, checked against its config.toml.

A generative artifact is an ordinary TorchScript (or torch.export) module
whose ``forward`` is pure: it takes new tokens plus the key/value cache of
the tokens before them and returns logits and the new tokens' keys/values.
The daemon owns every cache, so one call can decode many sequences of
different lengths (docs/generation.md has the contract):

    forward(tokens     int64[B, T],
            positions  int64[B, T],
            cache      float[B, L, 2, H, S, D],
            cache_mask bool[B, S])
        -> (logits     float[B, T, V],
            new_cache  float[B, L, 2, H, T, D])

The config declares these four inputs and two outputs by name; their fixed
dimensions give the geometry (L layers, H heads, D per head, V tokens) and
``cache`` dimension 4 gives the context length (the most positions).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from edgeinferd.errors import ConfigError, ModelExecutionError
from edgeinferd.generation.cache import KVBatch
from edgeinferd.generation.tokenizer import Tokenizer, load_tokenizer
from edgeinferd.repository import ModelConfig, VersionFiles

INPUTS = ("tokens", "positions", "cache", "cache_mask")
OUTPUTS = ("logits", "new_cache")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}

_thread_state = threading.local()


@dataclass(frozen=True)
class Geometry:
    layers: int
    heads: int
    head_dim: int
    vocab_size: int
    context: int
    dtype: torch.dtype


def read_geometry(config: ModelConfig) -> Geometry:
    """Check the declared interface and read the cache geometry from it."""
    where = f"{config.name}/config.toml"
    names = tuple(spec.name for spec in config.inputs)
    if names != INPUTS:
        raise ConfigError(
            where, "inputs", f"a generative model takes {', '.join(INPUTS)} (in that order)"
        )
    if tuple(spec.name for spec in config.outputs) != OUTPUTS:
        raise ConfigError(
            where, "outputs", f"a generative model returns {', '.join(OUTPUTS)} (in that order)"
        )
    if config.max_batch_size:
        raise ConfigError(
            where, "max_batch_size", "must be 0 for a generative model (shapes name the batch)"
        )
    tokens, positions, cache, mask = config.inputs
    logits, new_cache = config.outputs
    expected = {
        "inputs[0]": (tokens, "int64", 2),
        "inputs[1]": (positions, "int64", 2),
        "inputs[2]": (cache, cache.dtype, 6),
        "inputs[3]": (mask, "bool", 2),
        "outputs[0]": (logits, cache.dtype, 3),
        "outputs[1]": (new_cache, cache.dtype, 6),
    }
    for field, (spec, dtype, rank) in expected.items():
        if spec.dtype != dtype or len(spec.shape) != rank:
            raise ConfigError(where, field, f"{spec.name!r} must be {dtype} with {rank} dimensions")
    if cache.dtype not in _DTYPES:
        raise ConfigError(where, "inputs[2].dtype", f"expected one of {', '.join(_DTYPES)}")
    layers, two, heads, context, head_dim = cache.shape[1:]
    if two != 2 or min(layers, heads, context, head_dim) < 1:
        raise ConfigError(
            where,
            "inputs[2].shape",
            "expected [-1, layers, 2, heads, context, head_dim] with every size given",
        )
    if new_cache.shape[1:4] != (layers, 2, heads) or new_cache.shape[5] != head_dim:
        raise ConfigError(where, "outputs[1].shape", "must match the cache's geometry")
    vocab_size = logits.shape[2]
    if vocab_size < 1:
        raise ConfigError(where, "outputs[0].shape", "the last dimension is the vocabulary size")
    return Geometry(layers, heads, head_dim, vocab_size, context, _DTYPES[cache.dtype])


class GenerativeModel:
    """A loaded generative artifact: prefill one prompt, decode many sequences."""

    def __init__(
        self, config: ModelConfig, module: Any, tokenizer: Tokenizer, geometry: Geometry
    ) -> None:
        self.config = config
        self.module = module
        self.tokenizer = tokenizer
        self.geometry = geometry

    @property
    def name(self) -> str:
        return self.config.name

    def new_batch(self) -> KVBatch:
        g = self.geometry
        return KVBatch(g.layers, g.heads, g.head_dim, g.context, g.dtype)

    def _call(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(_thread_state, "threads", None) != self.config.threads:
            torch.set_num_threads(self.config.threads)
            _thread_state.threads = self.config.threads
        try:
            with torch.inference_mode():
                logits, new_cache = self.module(tokens, positions, cache, mask)
        except Exception as error:
            message = str(error).strip().splitlines()[-1] if str(error).strip() else ""
            raise ModelExecutionError(
                f"model {self.name!r} failed in its forward pass: {type(error).__name__}"
                + (f": {message}" if message else "")
            ) from error
        batch, count = tokens.shape
        g = self.geometry
        if tuple(logits.shape) != (batch, count, g.vocab_size) or tuple(new_cache.shape) != (
            batch,
            g.layers,
            2,
            g.heads,
            count,
            g.head_dim,
        ):
            raise ModelExecutionError(
                f"model {self.name!r} returned logits {list(logits.shape)} and new_cache"
                f" {list(new_cache.shape)} for tokens {[batch, count]}; see docs/generation.md"
            )
        return logits, new_cache

    def prefill(self, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a whole prompt: the last position's logits [V] and its cache [L, 2, H, n, D]."""
        g = self.geometry
        count = len(prompt)
        tokens = torch.tensor([prompt], dtype=torch.int64)
        positions = torch.arange(count, dtype=torch.int64).unsqueeze(0)
        # One masked-out slot rather than an empty cache: sizes 0 trip up exported graphs.
        cache = torch.zeros(1, g.layers, 2, g.heads, 1, g.head_dim, dtype=g.dtype)
        mask = torch.zeros(1, 1, dtype=torch.bool)
        logits, new_cache = self._call(tokens, positions, cache, mask)
        return logits[0, -1], new_cache[0]

    def decode(self, batch: KVBatch, last_tokens: list[int]) -> torch.Tensor:
        """One token for every row of ``batch``; appends their keys/values; logits [B, V]."""
        tokens = torch.tensor(last_tokens, dtype=torch.int64).unsqueeze(1)
        positions = batch.lengths.unsqueeze(1)
        cache, mask = batch.view()
        logits, new_cache = self._call(tokens, positions, cache, mask)
        batch.append(new_cache[:, :, :, :, 0, :])
        return logits[:, 0, :]

    def warm_up(self) -> None:
        """Prefill two prompts and decode them together: checks the contract, fills caches."""
        vocab = min(self.geometry.vocab_size, self.tokenizer.vocab_size)
        batch = self.new_batch()
        last = []
        for prompt in ([0], [vocab - 1, 0, vocab - 1]):
            logits, cache = self.prefill(prompt)
            batch.add(cache)
            last.append(int(torch.argmax(logits).item()))
        for _ in range(3):
            logits = self.decode(batch, last)
            last = [int(i) for i in torch.argmax(logits, dim=-1).tolist()]
        batch.keep([1])
        self.decode(batch, last[1:])


def load_generative(config: ModelConfig, files: VersionFiles) -> GenerativeModel:
    """Load, check and warm up a generative version; ConfigError says why it can't serve."""
    from edgeinferd.runtime import load_module

    assert config.generation is not None
    geometry = read_geometry(config)
    tokenizer_path = files.folder / config.generation.tokenizer
    where = f"{config.name}/{files.version}/{config.generation.tokenizer}"
    if tokenizer_path.resolve().parent != files.folder.resolve():
        raise ConfigError(where, "", "the tokenizer must lie in the version folder")
    tokenizer = load_tokenizer(tokenizer_path, where)
    if tokenizer.vocab_size > geometry.vocab_size:
        raise ConfigError(
            where,
            "",
            f"{tokenizer.vocab_size} tokens, but the model's logits cover {geometry.vocab_size}",
        )
    model = GenerativeModel(config, load_module(files), tokenizer, geometry)
    try:
        model.warm_up()
    except ModelExecutionError as error:
        raise ConfigError(
            f"{config.name}/config.toml", "inputs", f"warm-up generation failed: {error}"
        ) from None
    return model
