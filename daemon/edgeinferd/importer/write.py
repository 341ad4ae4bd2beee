"""Writing a Checkpoint as a new version folder of a model repository.

A version folder holds only data: ``model.safetensors`` (weights in the chosen
form, see generation/quantize.py), ``llm.json`` (the architecture's numbers and
the special tokens), ``tokenizer.json``, ``chat_template.jinja`` (when the
source has one) and ``manifest.json`` (the artifact's sha256, the source
file's sha256, and what the import did). The model's ``config.toml`` is
written only when the model is new, so an operator's settings survive a
re-import.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from edgeinferd.generation.quantize import (
    DEFAULT_FORM,
    EMBEDDING_FORMS,
    FORMS,
    int4_tensors,
    quantize,
)
from edgeinferd.importer.checkpoint import Checkpoint, ImportRefused, Weight
from edgeinferd.repository import check_model_name, sha256_of

#: Engine matrix -> the source weights it is made of (fused row-wise, in order).
_FUSED = {
    "attention.wqkv": ("attention.q", "attention.k", "attention.v"),
    "attention.wo": ("attention.o",),
    "feed_forward.w13": ("feed_forward.gate", "feed_forward.up"),
    "feed_forward.w2": ("feed_forward.down",),
}


def read_source(source: Path) -> Checkpoint:
    """A GGUF file or a Hugging Face folder, by what is on disk."""
    if source.is_dir():
        from edgeinferd.importer.hf_folder import read_hf_folder

        return read_hf_folder(source)
    if source.is_file():
        from edgeinferd.importer.gguf_file import read_gguf

        return read_gguf(source)
    raise ImportRefused(
        f"{source}: no such file or folder (expected a .gguf file or a model folder)"
    )


def _matrix(parts: list[Weight], form: str) -> dict[str, torch.Tensor]:
    if form == "int4" and all(p.read_int4 is not None for p in parts):
        blocks = [p.read_int4() for p in parts if p.read_int4 is not None]
        return int4_tensors(
            torch.cat([b.codes for b in blocks]),
            torch.cat([b.scale for b in blocks]),
            torch.cat([b.minimum for b in blocks]),
        )
    return quantize(torch.cat([p.read() for p in parts]), form)


def engine_tensors(checkpoint: Checkpoint, form: str) -> dict[str, torch.Tensor]:
    """Every tensor the engine loads, under its names, with matrices in ``form``."""
    weights = checkpoint.weights
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        out.update({f"{prefix}.{key}": value for key, value in tensors.items()})

    def need(name: str) -> Weight:
        if name not in weights:
            raise ImportRefused(f"the checkpoint has no {name} weight")
        return weights[name]

    table_form = EMBEDDING_FORMS[form]
    put("tok_embeddings", _matrix([need("tok_embeddings")], table_form))
    if not checkpoint.config.tied_embeddings:
        put("output", _matrix([need("output")], table_form))
    out["norm.weight"] = need("norm").read().to(torch.float32)
    for i in range(checkpoint.config.layers):
        p = f"layers.{i}"
        for norm in ("attention_norm", "ffn_norm"):
            out[f"{p}.{norm}.weight"] = need(f"{p}.{norm}").read().to(torch.float32)
        for fused, parts in _FUSED.items():
            put(f"{p}.{fused}", _matrix([need(f"{p}.{part}") for part in parts], form))
        if checkpoint.config.attention_bias:
            biases = [need(f"{p}.attention.{x}.bias").read() for x in "qkv"]
            out[f"{p}.attention.wqkv.bias"] = torch.cat(biases).to(torch.float32)
    return out


def import_checkpoint(
    source: Path,
    repository: Path,
    name: str,
    form: str = DEFAULT_FORM,
    *,
    max_sequences: int = 4,
    context: int = 2048,
) -> Path:
    """Import ``source`` as the next version of model ``name``; returns the version folder."""
    check_model_name(name)
    if form not in FORMS:
        raise ImportRefused(f"--quantize {form!r}: expected one of {', '.join(FORMS)}")
    started = time.perf_counter()
    checkpoint = read_source(source)
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    version = str(max(versions, default=0) + 1)
    staging = model_dir / f".{version}.importing"
    staging.mkdir()
    tensors = engine_tensors(checkpoint, form)
    save_file(tensors, str(staging / "model.safetensors"))
    # Readable by the daemon's own user, like every other file of the repository.
    (staging / "model.safetensors").chmod(0o644)
    (staging / "tokenizer.json").write_text(checkpoint.tokenizer_json, encoding="utf-8")
    if checkpoint.chat_template is not None:
        (staging / "chat_template.jinja").write_text(checkpoint.chat_template, encoding="utf-8")
    llm: dict[str, Any] = {
        "architecture": checkpoint.config.to_dict(),
        "weights": form,
        "bos_token_id": checkpoint.bos_token_id,
        "add_bos": checkpoint.add_bos,
        "stop_token_ids": list(checkpoint.stop_token_ids),
    }
    (staging / "llm.json").write_text(json.dumps(llm, indent=2) + "\n", encoding="utf-8")
    source_types = sorted({w.source_type for w in checkpoint.weights.values()})
    manifest = {
        "sha256": sha256_of(staging / "model.safetensors"),
        "source": {
            "file": source.name,
            "format": checkpoint.source_format,
            "sha256": sha256_of(source) if source.is_file() else _folder_digest(source),
            "tensor_types": source_types,
        },
        "import": {
            "weights": form,
            "bytes": (staging / "model.safetensors").stat().st_size,
            "seconds": round(time.perf_counter() - started, 1),
            "notes": checkpoint.notes,
        },
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    config_path = model_dir / "config.toml"
    if not config_path.exists():
        config_path.write_text(
            f'description = "{checkpoint.config.architecture} imported from {source.name}'
            f' ({form})"\n\n[generation]\nmax_sequences = {max_sequences}\ncontext = {context}\n',
            encoding="utf-8",
        )
    staging.rename(model_dir / version)
    return model_dir / version


def _folder_digest(folder: Path) -> str:
    """sha256 over the folder's files (name, then content digest), sorted by name."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + sha256_of(path).encode() + b"\n")
    return digest.hexdigest()
