"""Writing a stage into a model repository, in the layout of docs/model-repository.md.

A version is written into a hidden temporary folder and renamed into place, so a daemon
watching the repository never sees a half-written version; a new run takes the next free
version number instead of overwriting one.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeinferd.compress import quantize

ARTIFACT = "model.pt"
FORMAT = "torchscript"
_DTYPES = {
    torch.bool: "bool",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint16: "uint16",
    torch.uint32: "uint32",
    torch.uint64: "uint64",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def to_torchscript(model: nn.Module, example: torch.Tensor) -> bytes:
    """Serialize ``model`` as TorchScript: scripted when possible (keeps control flow),
    traced with ``example`` otherwise. TorchScript is the one container eager int8 models
    fit in; its deprecation warnings are silenced for that reason."""
    model.eval()
    with quantize.quiet():
        try:
            scripted = torch.jit.script(model)
        except Exception:  # any scripting failure falls back to tracing
            with torch.no_grad():
                scripted = torch.jit.trace(model, example)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def tensor_spec(name: str, tensor: torch.Tensor, batched: bool) -> dict[str, Any]:
    """A config.toml ``[[inputs]]``/``[[outputs]]`` entry describing ``tensor``."""
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype {tensor.dtype} cannot be served")
    shape = list(tensor.shape[1:] if batched else tensor.shape)
    return {"name": name, "dtype": _DTYPES[tensor.dtype], "shape": shape}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def render_config(
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    max_batch_size: int,
    description: str,
) -> str:
    """The model's config.toml; no ``version`` key, so the daemon serves the newest."""
    lines = [
        "# Written by `edgeinferd compress`: inputs and outputs come from the data and a",
        "# trial forward pass of the artifact.",
        f"max_batch_size = {max_batch_size}",
    ]
    if description:
        lines.append(f"description = {_toml_value(description)}")
    for table, specs in (("inputs", inputs), ("outputs", outputs)):
        for spec in specs:
            lines += ["", f"[[{table}]]"]
            lines += [f"{key} = {_toml_value(spec[key])}" for key in ("name", "dtype", "shape")]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def write_config(
    model_folder: Path,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    max_batch_size: int,
    description: str,
) -> None:
    """Write config.toml, keeping an existing one whose signature already matches (it may
    carry hand-tuned [batching]/[instances] settings)."""
    path = model_folder / "config.toml"
    if path.is_file():
        try:
            existing = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError:
            existing = {}
        if (
            existing.get("inputs") == inputs
            and existing.get("outputs") == outputs
            and existing.get("max_batch_size") == max_batch_size
        ):
            return
        print(f"{path}: signature changed, rewriting", file=sys.stderr)
    _atomic_write(path, render_config(inputs, outputs, max_batch_size, description))


def next_version(model_folder: Path) -> int:
    """One more than the highest numbered version folder (1 for a new model)."""
    numbers = (
        [
            int(p.name)
            for p in model_folder.iterdir()
            if p.is_dir() and p.name.isdigit() and int(p.name) > 0
        ]
        if model_folder.is_dir()
        else []
    )
    return max(numbers, default=0) + 1


def sha256(data: bytes) -> str:
    """Hex SHA-256, the digest the daemon checks an artifact against."""
    return hashlib.sha256(data).hexdigest()


def write_version(
    repository: Path,
    model: str,
    artifact: bytes,
    manifest: dict[str, Any],
    *,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    max_batch_size: int,
    description: str = "",
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Add ``artifact`` as the next version of ``model``; returns the version folder."""
    folder = repository / model
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".incoming-"))
    full_manifest = {
        "artifact": ARTIFACT,
        "format": FORMAT,
        "sha256": sha256(artifact),
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **manifest,
    }
    (staging / ARTIFACT).write_bytes(artifact)
    (staging / "manifest.json").write_text(json.dumps(full_manifest, indent=2, default=str) + "\n")
    for name, data in (extra_files or {}).items():
        (staging / name).write_bytes(data)
    staging.chmod(0o755)
    while True:
        target = folder / str(next_version(folder))
        try:
            # Atomic; fails if another writer took this number first, then we try the next.
            staging.rename(target)
        except OSError:
            if target.exists():
                continue
            raise
        # After the version: a daemon only lists folders with a config.toml, so a new model
        # appears complete.
        write_config(folder, inputs, outputs, max_batch_size, description)
        return target
