"""A Llama-family decoder in plain PyTorch: Llama, Mistral, Qwen2 and SmolLM.

The daemon owns this code; a version folder holds only weights and numbers
(``LlamaConfig``), so nothing in a model file ever runs. The layout follows
gpt-fast: fused q/k/v and gate/up projections, RoPE as Hugging Face computes it
(rotate-half), grouped-query attention through ``scaled_dot_product_attention``,
and a key/value cache the caller preallocates (``edgeinferd.generation.cache``)
that every call writes in place.

A call takes tokens [B, T] with their positions [B, T] for B sequences held in
cache slots ``first_slot .. first_slot + B - 1``; position *p* of a sequence is
written to cache position *p*, and each token attends to the cache positions up
to its own. So the same function prefills a chunk of one prompt (B = 1, T =
chunk) and decodes one token for many sequences of different lengths (T = 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch.nn import functional

from edgeinferd.generation.cache import KVCache
from edgeinferd.generation.quantize import Matrix, load_matrix, stored_form

ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LlamaConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    #: The context the model was trained for (a slot's context may be smaller).
    max_context: int
    tied_embeddings: bool
    #: Qwen2 adds biases to the q, k and v projections.
    attention_bias: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LlamaConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight.to(torch.float32)
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(config: LlamaConfig, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [context, head_dim], Hugging Face's rotate-half layout."""
    half = torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim
    inverse = 1.0 / (config.rope_theta**half)
    angles = torch.outer(torch.arange(context, dtype=torch.float64), inverse)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Layer:
    def __init__(self, config: LlamaConfig, tensors: Mapping[str, torch.Tensor], i: int) -> None:
        p = f"layers.{i}"
        self.attention_norm = RMSNorm(tensors[f"{p}.attention_norm.weight"], config.rms_norm_eps)
        self.ffn_norm = RMSNorm(tensors[f"{p}.ffn_norm.weight"], config.rms_norm_eps)
        self.wqkv = load_matrix(tensors, f"{p}.attention.wqkv")
        bias = tensors.get(f"{p}.attention.wqkv.bias")
        self.qkv_bias = bias.to(torch.float32) if bias is not None else None
        self.wo = load_matrix(tensors, f"{p}.attention.wo")
        self.w13 = load_matrix(tensors, f"{p}.feed_forward.w13")
        self.w2 = load_matrix(tensors, f"{p}.feed_forward.w2")
        self.index = i


class Llama:
    """The decoder. Not an nn.Module: it has no training, hooks or state of its own."""

    def __init__(self, config: LlamaConfig, tensors: Mapping[str, torch.Tensor], context: int):
        self.config = config
        self.layers = [Layer(config, tensors, i) for i in range(config.layers)]
        self.norm = RMSNorm(tensors["norm.weight"], config.rms_norm_eps)
        self.embeddings: Matrix = load_matrix(tensors, "tok_embeddings")
        # A tied model may still store its output layer apart, in another form.
        self.output: Matrix = (
            load_matrix(tensors, "output")
            if stored_form(tensors, "output") is not None
            else self.embeddings
        )
        self.cos, self.sin = rope_tables(config, context)
        self.q_size = config.heads * config.head_dim
        self.kv_size = config.kv_heads * config.head_dim

    def weight_bytes(self) -> int:
        matrices = [self.embeddings] + ([] if self.output is self.embeddings else [self.output])
        for layer in self.layers:
            matrices += [layer.wqkv, layer.wo, layer.w13, layer.w2]
        return sum(m.nbytes() for m in matrices)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        first_slot: int,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Logits [B, V] for each row's last token (``last_only``) or [B, T, V] for all."""
        c = self.config
        batch, count = tokens.shape
        x = self.embeddings.rows(tokens)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        # Keys up to the furthest position any row reaches; a row sees up to its own.
        span = int(positions.max().item()) + 1
        mask = (torch.arange(span).view(1, 1, span) <= positions.unsqueeze(-1)).unsqueeze(1)
        slots = slice(first_slot, first_slot + batch)
        for layer in self.layers:
            h = layer.attention_norm(x)
            qkv = layer.wqkv.matmul(h)
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = rotate(q.view(batch, count, c.heads, c.head_dim).transpose(1, 2), cos, sin)
            k = rotate(k.view(batch, count, c.kv_heads, c.head_dim).transpose(1, 2), cos, sin)
            v = v.view(batch, count, c.kv_heads, c.head_dim).transpose(1, 2)
            keys, values = cache.write(layer.index, first_slot, positions, k, v)
            attended = functional.scaled_dot_product_attention(
                q,
                keys[slots, :, :span],
                values[slots, :, :span],
                attn_mask=mask,
                enable_gqa=c.heads != c.kv_heads,
            )
            x = x + layer.wo.matmul(attended.transpose(1, 2).reshape(batch, count, self.q_size))
            gate, up = layer.w13.matmul(layer.ffn_norm(x)).chunk(2, dim=-1)
            x = x + layer.w2.matmul(functional.silu(gate) * up)
        if last_only:
            x = x[:, -1]
        return self.output.matmul(self.norm(x))
