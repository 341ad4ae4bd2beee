"""A small decoder-only transformer that follows the artifact contract, and how to save it.

The example model (examples/charlm) and the tests build on it; any model
whose ``forward`` has the same signature and meaning can be served instead
(docs/generation.md). Training calls the same ``forward`` with an empty
cache, so what is trained is exactly what is served.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeinferd.generation.tokenizer import Tokenizer


@dataclass(frozen=True)
class TransformerShape:
    vocab_size: int
    context: int = 256
    dim: int = 128
    layers: int = 4
    heads: int = 4

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(
        self, x: torch.Tensor, past: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, T, dim]; past [B, 2, H, S, D]; mask [B, 1, T, S + T] (True: attend)
        batch, count, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=-1)
        q = q.view(batch, count, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, count, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, count, self.heads, self.head_dim).transpose(1, 2)
        keys = torch.cat([past[:, 0], k], dim=2)
        values = torch.cat([past[:, 1], v], dim=2)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, count, dim))
        x = x + self.down(F.gelu(self.up(self.norm2(x))))
        return x, torch.stack([k, v], dim=1)


class DecoderLM(nn.Module):
    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.shape = shape
        self.token_embedding = nn.Embedding(shape.vocab_size, shape.dim)
        self.position_embedding = nn.Embedding(shape.context, shape.dim)
        self.blocks = nn.ModuleList([Block(shape.dim, shape.heads) for _ in range(shape.layers)])
        self.norm = nn.LayerNorm(shape.dim)
        self.head = nn.Linear(shape.dim, shape.vocab_size)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: torch.Tensor,
        cache_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, count = tokens.shape
        past = cache.shape[4]
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        causal = torch.ones(count, count, dtype=torch.bool, device=tokens.device).tril()
        mask = torch.cat(
            [
                cache_mask[:, None, None, :].expand(batch, 1, count, past),
                causal[None, None].expand(batch, 1, count, count),
            ],
            dim=-1,
        )
        new = []
        for index, block in enumerate(self.blocks):
            x, kv = block(x, cache[:, index], mask)
            new.append(kv)
        return self.head(self.norm(x)), torch.stack(new, dim=1)

    def empty_cache(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A zero-length cache, for training and scoring whole sequences."""
        s = self.shape
        # The embedding stays float even when the Linear layers are quantized.
        weight = self.token_embedding.weight
        cache = weight.new_zeros(batch, s.layers, 2, s.heads, 0, s.head_dim)
        return cache, torch.zeros(batch, 0, dtype=torch.bool, device=weight.device)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position of [B, T] (training, evaluation)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        logits, _ = self(tokens, positions, *self.empty_cache(tokens.shape[0]))
        result: torch.Tensor = logits
        return result


def quantize_int8(model: DecoderLM) -> nn.Module:
    """Dynamic int8 weights on every Linear layer (activations quantized per call)."""
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated upstream, but its eager dynamic
        # int8 Linear kernels are still the fastest int8 path on x86 CPUs and
        # the only one TorchScript can save; we rely on it knowingly.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantized: nn.Module = torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear}, dtype=torch.qint8
        )
    return quantized


def to_torchscript(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream; it remains the one format that
        # saves eager int8 modules (see docs/model-repository.md).
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted: torch.jit.ScriptModule = torch.jit.script(model.eval())
    return scripted


def config_toml(shape: TransformerShape, max_sequences: int = 8, threads: int = 1) -> str:
    """The config.toml declaring the generation interface for ``shape``."""
    s = shape
    cache = f"[-1, {s.layers}, 2, {s.heads}, {s.context}, {s.head_dim}]"
    new_cache = f"[-1, {s.layers}, 2, {s.heads}, -1, {s.head_dim}]"
    return f"""\
description = "decoder-only transformer: {s.layers} layers, dim {s.dim}, context {s.context}"
format = "torchscript"

[[inputs]]
name = "tokens"
dtype = "int64"
shape = [-1, -1]

[[inputs]]
name = "positions"
dtype = "int64"
shape = [-1, -1]

[[inputs]]
name = "cache"
dtype = "float32"
shape = {cache}

[[inputs]]
name = "cache_mask"
dtype = "bool"
shape = [-1, -1]

[[outputs]]
name = "logits"
dtype = "float32"
shape = [-1, -1, {s.vocab_size}]

[[outputs]]
name = "new_cache"
dtype = "float32"
shape = {new_cache}

[instances]
threads = {threads}

[generation]
tokenizer = "tokenizer.json"
max_sequences = {max_sequences}
"""


def write_model(
    repo: Path,
    name: str,
    module: torch.jit.ScriptModule,
    shape: TransformerShape,
    tokenizer: Tokenizer,
    *,
    version: str = "1",
    max_sequences: int = 8,
    threads: int = 1,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """Write a servable generative model: config.toml, tokenizer, artifact, manifest."""
    folder = repo / name / version
    folder.mkdir(parents=True, exist_ok=True)
    (repo / name / "config.toml").write_text(config_toml(shape, max_sequences, threads))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer.to_json()))
    artifact = folder / "model.pt"
    module.save(str(artifact))
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    facts = {
        "artifact": "model.pt",
        "format": "torchscript",
        "sha256": digest,
        "torch_version": torch.__version__,
        "shape": asdict(shape),
        **(manifest or {}),
    }
    (folder / "manifest.json").write_text(json.dumps(facts, indent=2))
    return folder
