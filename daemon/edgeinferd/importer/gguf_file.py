"""Reading a GGUF file (llama.cpp's format) into a Checkpoint.

Metadata keys and tensor names are llama.cpp's (``llama.block_count``,
``blk.N.attn_q.weight``, ...). Two things differ from Hugging Face's layout and
are undone here, as transformers' GGUF loader does: llama.cpp's converter
permutes the rows of the q and k projections for its interleaved RoPE, and
stores every matrix as [out, in] rows of quantized blocks.

Tensor types read: F32, F16, BF16, Q8_0, Q4_0, Q4_1 (the gguf package's
dequantizers). Q4_0 and Q4_1 matrices are also exposed as exact 4-bit codes, so
the int4 form keeps them bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeinferd.generation.llama import ARCHITECTURES, LlamaConfig
from edgeinferd.importer.checkpoint import Checkpoint, ImportRefused, Int4Codes, Weight
from edgeinferd.importer.tokenizer_json import build_bpe_tokenizer

READABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

_LAYER_NAMES = {
    "attn_norm.weight": "attention_norm",
    "ffn_norm.weight": "ffn_norm",
    "attn_q.weight": "attention.q",
    "attn_k.weight": "attention.k",
    "attn_v.weight": "attention.v",
    "attn_q.bias": "attention.q.bias",
    "attn_k.bias": "attention.k.bias",
    "attn_v.bias": "attention.v.bias",
    "attn_output.weight": "attention.o",
    "ffn_gate.weight": "feed_forward.gate",
    "ffn_up.weight": "feed_forward.up",
    "ffn_down.weight": "feed_forward.down",
}
_GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm"}


def read_gguf(path: Path) -> Checkpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise ImportRefused(f"{path}: not a readable GGUF file ({error})") from None
    meta = {name: _value(field) for name, field in reader.fields.items()}
    architecture = str(meta.get("general.architecture", "?"))
    if architecture not in ARCHITECTURES:
        raise ImportRefused(
            f"{path}: architecture {architecture!r} is not supported;"
            f" expected one of {', '.join(ARCHITECTURES)} (the Llama family)"
        )
    a = architecture

    def number(key: str, default: Any = None) -> Any:
        value = meta.get(f"{a}.{key}", default)
        if value is None:
            raise ImportRefused(f"{path}: metadata {a}.{key} is missing")
        return value

    heads = int(number("attention.head_count"))
    hidden = int(number("embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    config = LlamaConfig(
        architecture=architecture,
        vocab_size=int(tensors["token_embd.weight"].data.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(number("feed_forward_length")),
        layers=int(number("block_count")),
        heads=heads,
        kv_heads=int(number("attention.head_count_kv", heads)),
        head_dim=int(number("rope.dimension_count", hidden // heads)),
        rope_theta=float(number("rope.freq_base", 10000.0)),
        rms_norm_eps=float(number("attention.layer_norm_rms_epsilon")),
        max_context=int(number("context_length")),
        tied_embeddings=tied,
        attention_bias="blk.0.attn_q.bias" in tensors,
    )
    if meta.get(f"{a}.rope.scaling.type") not in (None, "none"):
        raise ImportRefused(
            f"{path}: RoPE scaling {meta[f'{a}.rope.scaling.type']!r} is not supported"
        )

    weights: dict[str, Weight] = {}
    for name, tensor in tensors.items():
        type_name = tensor.tensor_type.name
        if type_name not in READABLE_TYPES:
            raise ImportRefused(
                f"{path}: tensor {name} is {type_name}; supported types are"
                f" {', '.join(READABLE_TYPES)}"
            )
        target = _engine_name(name)
        if target is None:
            continue
        rows = _q_k_permutation(name, config)
        weights[target] = _weight(tensor, rows)
    if "output.weight" in tensors:
        weights["output"] = _weight(tensors["output.weight"], None)

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ImportRefused(
            f"{path}: tokenizer model {model!r} is not supported; expected 'gpt2'"
            " (byte-level BPE). SentencePiece ('llama') GGUF tokenizers are not read yet:"
            " import the model's Hugging Face folder instead"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokenizer = build_bpe_tokenizer(
        tokens=tokens,
        merges=list(meta.get("tokenizer.ggml.merges", [])),
        token_types=list(meta.get("tokenizer.ggml.token_type", [])),
        pre=str(meta.get("tokenizer.ggml.pre", "default")),
        where=str(path),
    )
    eos = meta.get("tokenizer.ggml.eos_token_id")
    stops = {int(eos)} if eos is not None else set()
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        stops.add(int(eot))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    template = meta.get("tokenizer.chat_template")
    return Checkpoint(
        config=config,
        weights=weights,
        tokenizer_json=tokenizer,
        chat_template=str(template) if template is not None else None,
        bos_token_id=int(bos) if bos is not None else None,
        stop_token_ids=tuple(sorted(stops)),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        source_format="gguf",
    )


def _value(field: Any) -> Any:
    try:
        return field.contents()
    except (ValueError, IndexError, TypeError):
        return None


def _engine_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, index, rest = name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"layers.{index}.{_LAYER_NAMES[rest]}"
    return None


def _q_k_permutation(name: str, config: LlamaConfig) -> np.ndarray | None:
    """Undo llama.cpp's row permutation of q and k (rotate-half <- interleaved RoPE)."""
    if ".attn_q." in name:
        heads = config.heads
    elif ".attn_k." in name:
        heads = config.kv_heads
    else:
        return None
    rows = heads * config.head_dim
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)


def _weight(tensor: Any, rows: np.ndarray | None) -> Weight:
    import gguf

    kind = tensor.tensor_type
    type_name = kind.name

    def read() -> torch.Tensor:
        values = np.asarray(gguf.quants.dequantize(tensor.data, kind), dtype=np.float32)
        if rows is not None:
            values = values[rows]
        return torch.from_numpy(np.ascontiguousarray(values))

    read_int4 = None
    if type_name in ("Q4_0", "Q4_1"):

        def read_int4() -> Int4Codes:
            return _int4_blocks(np.asarray(tensor.data), type_name, rows)

    return Weight(read=read, read_int4=read_int4, source_type=type_name)


def _int4_blocks(data: np.ndarray, type_name: str, rows: np.ndarray | None) -> Int4Codes:
    """Q4_0 (d, 16 bytes) and Q4_1 (d, m, 16 bytes) blocks of 32 as codes, scales and mins."""
    size = 18 if type_name == "Q4_0" else 20
    blocks = data.reshape(data.shape[0], -1, size)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q4_0":
        minimum = -8.0 * scale
        quants = blocks[..., 2:18]
    else:
        minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        quants = blocks[..., 4:20]
    codes = np.concatenate([quants & 0x0F, quants >> 4], axis=-1).reshape(data.shape[0], -1)
    if rows is not None:
        codes, scale, minimum = codes[rows], scale[rows], minimum[rows]
    return Int4Codes(
        codes=torch.from_numpy(np.ascontiguousarray(codes)),
        scale=torch.from_numpy(np.ascontiguousarray(scale)),
        minimum=torch.from_numpy(np.ascontiguousarray(minimum)),
    )
