"""Reading a Hugging Face model folder into a Checkpoint.

The folder is what ``save_pretrained`` writes: ``config.json``, the weights as
``*.safetensors`` (one file, or shards with ``model.safetensors.index.json``),
``tokenizer.json``, and ``tokenizer_config.json`` / ``generation_config.json``
for the chat template and the special tokens. Pickled ``*.bin`` weights are
refused: loading them would run code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from edgeinferd.generation.llama import ARCHITECTURES, LlamaConfig
from edgeinferd.importer.checkpoint import Checkpoint, ImportRefused, Weight

_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "attention.q",
    "self_attn.k_proj.weight": "attention.k",
    "self_attn.v_proj.weight": "attention.v",
    "self_attn.q_proj.bias": "attention.q.bias",
    "self_attn.k_proj.bias": "attention.k.bias",
    "self_attn.v_proj.bias": "attention.v.bias",
    "self_attn.o_proj.weight": "attention.o",
    "mlp.gate_proj.weight": "feed_forward.gate",
    "mlp.up_proj.weight": "feed_forward.up",
    "mlp.down_proj.weight": "feed_forward.down",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings",
    "model.norm.weight": "norm",
    "lm_head.weight": "output",
}


def _json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ImportRefused(f"{path.parent}: {path.name} is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ImportRefused(f"{path}: unreadable ({error})") from None
    if not isinstance(data, dict):
        raise ImportRefused(f"{path}: expected a JSON object")
    return data


def read_hf_folder(folder: Path) -> Checkpoint:
    hf = _json(folder / "config.json")
    architecture = str(hf.get("model_type", "?"))
    if architecture not in ARCHITECTURES:
        raise ImportRefused(
            f"{folder}/config.json: model_type {architecture!r} is not supported;"
            f" expected one of {', '.join(ARCHITECTURES)} (the Llama family)"
        )
    if hf.get("rope_scaling"):
        raise ImportRefused(f"{folder}/config.json: rope_scaling is not supported")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    attention_bias = architecture == "qwen2" or bool(hf.get("attention_bias", False))
    config = LlamaConfig(
        architecture=architecture,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        layers=int(hf["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rope_theta=float(
            hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        ),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_context=int(hf.get("max_position_embeddings", 2048)),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
    )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        raise ImportRefused(
            f"{folder}: no *.safetensors weights"
            + (f" ({', '.join(pickled)} are pickles, which are never loaded)" if pickled else "")
        )
    weights: dict[str, Weight] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as stored:
            for key in stored.keys():  # noqa: SIM118 (safe_open has no __iter__)
                target = _engine_name(key)
                if target is not None:
                    weights[target] = _weight(path, key, str(stored.get_slice(key).get_dtype()))
    if config.tied_embeddings:
        weights.pop("output", None)
    elif "output" not in weights:
        raise ImportRefused(f"{folder}: lm_head.weight is missing and embeddings are not tied")

    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ImportRefused(f"{folder}: tokenizer.json is missing")
    tokenizer_json = tokenizer_path.read_text(encoding="utf-8")
    tokenizer_config = _json(folder / "tokenizer_config.json", required=False)
    generation_config = _json(folder / "generation_config.json", required=False)
    vocab = _vocab(tokenizer_json)
    template = tokenizer_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    bos = _token_id(tokenizer_config.get("bos_token"), vocab, hf.get("bos_token_id"))
    stops: set[int] = set()
    for source in (generation_config.get("eos_token_id"), hf.get("eos_token_id")):
        if isinstance(source, int):
            stops.add(source)
        elif isinstance(source, list):
            stops.update(int(i) for i in source)
    eos = _token_id(tokenizer_config.get("eos_token"), vocab, None)
    if eos is not None:
        stops.add(eos)
    return Checkpoint(
        config=config,
        weights=weights,
        tokenizer_json=tokenizer_json,
        chat_template=str(template) if isinstance(template, str) else None,
        bos_token_id=bos,
        stop_token_ids=tuple(sorted(stops)),
        add_bos=bool(tokenizer_config.get("add_bos_token", False)),
        source_format="huggingface",
    )


def _engine_name(key: str) -> str | None:
    if key in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[key]
    if key.startswith("model.layers."):
        _, _, index, rest = key.split(".", 3)
        if rest in _LAYER_NAMES:
            return f"layers.{index}.{_LAYER_NAMES[rest]}"
    return None


def _weight(path: Path, key: str, dtype: str) -> Weight:
    def read() -> torch.Tensor:
        with safe_open(str(path), framework="pt") as stored:
            tensor: torch.Tensor = stored.get_tensor(key)
        return tensor.to(torch.float32)

    return Weight(read=read, source_type=dtype)


def _vocab(tokenizer_json: str) -> dict[str, int]:
    data = json.loads(tokenizer_json)
    raw = data.get("model", {}).get("vocab") or {}
    vocab: dict[str, int] = (
        dict(raw) if isinstance(raw, dict) else {str(e[0]): i for i, e in enumerate(raw)}
    )
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = int(added["id"])
    return vocab


def _token_id(token: Any, vocab: dict[str, int], default: Any) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and token in vocab:
        return vocab[token]
    return int(default) if isinstance(default, int) else None
