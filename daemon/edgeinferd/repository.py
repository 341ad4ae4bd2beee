"""The model repository on disk: which models exist, how each is configured.

Reads ``<repository>/<model>/config.toml`` and the version folders beside it
(see docs/model-repository.md). Knows nothing of torch: loading the artifact
is ``edgeinferd.artifacts``' job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgeinfer.tensors import DTYPES_BY_NAME, shape_repr
from edgeinferd.errors import ConfigError, InvalidInput, ModelNotFound
from edgeinferd.toml_fields import Table, load_toml

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
ARTIFACT_FILES = {
    "torchscript": "model.pt",
    "exported_program": "model.pt2",
    # A language model: weights only (with llm.json, tokenizer.json beside it);
    # the daemon's own engine runs them. Written by `edgeinferd import`.
    "llm": "model.safetensors",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    #: Without the batch dimension when the model batches; -1 = any size.
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.dtype}{shape_repr(self.shape)}"


#: When a batch waits (up to max_queue_delay_us) for more calls: "fixed" every
#: time (Triton's rule); "adaptive" only while the previous forward pass served
#: more than one call, so a lone caller stops paying for the wait after one call.
DELAY_POLICIES = ("fixed", "adaptive")

#: The defaults were measured (benchmarks/README.md): under concurrent load an
#: adaptive 1 ms wait forms larger batches than none at all (more calls/s, less
#: CPU per call), and a lone caller's latency is the same as with no wait.
DEFAULT_QUEUE_DELAY_US = 1000
DEFAULT_DELAY_POLICY = "adaptive"

#: Measured side by side on the development machine (benchmarks/README.md, the
#: crossover table): a lone caller's passes of the benchmark MLP served more
#: calls/s on the loop than through a thread at batch 1 (a pass of about 100 µs
#: there) and at batch 32 (500-900 µs). 2 ms keeps such a pass inline on a
#: machine half as fast, and is all a call arriving meanwhile can wait.
DEFAULT_INLINE_MAX_US = 2000


@dataclass(frozen=True)
class BatchingConfig:
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    delay_policy: str = DEFAULT_DELAY_POLICY
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024


@dataclass(frozen=True)
class GenerationConfig:
    """A language model's ``[generation]`` table: what its slots reserve and how it runs."""

    #: Sequences generated at once; each has a slot of ``context`` positions in the cache.
    max_sequences: int = 4
    #: Positions (prompt plus generated tokens) one sequence may reach.
    context: int = 2048
    #: Prompt tokens run in one call; longer prompts are prefilled chunk by chunk,
    #: between decode steps of the other sequences.
    prefill_chunk: int = 256
    #: Threads of the forward passes (torch's intra-op pool).
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    format: str | None = None
    version: str | None = None
    description: str = ""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    instances: int = 1
    threads: int = 1
    #: Passes expected to take at most this long run on the event loop when it
    #: is otherwise idle (0: always in a worker thread); see batching.py.
    inline_max_us: int = DEFAULT_INLINE_MAX_US
    generation: GenerationConfig | None = None

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    # Worked out once per loaded version, not on every call (the hot path reads them).

    @cached_property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)

    @cached_property
    def input_checks(self) -> tuple[InputCheck, ...]:
        """What each input of every call is checked against, in config order."""
        batch = (-1,) if self.batched else ()
        return tuple(
            InputCheck(
                name=spec.name,
                dtype=np.dtype(spec.dtype),
                expected=batch + spec.shape,
                fixed=None if -1 in spec.shape else spec.shape,
            )
            for spec in self.inputs
        )


class InputCheck(NamedTuple):
    """One declared input, in the form the per-call check compares against."""

    name: str
    dtype: np.dtype[Any]
    #: The whole shape, with -1 for the batch dimension and for free dimensions.
    expected: tuple[int, ...]
    #: The shape after the batch dimension when none of it is free (one tuple compare).
    fixed: tuple[int, ...] | None


@dataclass(frozen=True)
class VersionFiles:
    """One version folder: its artifact and (maybe) its manifest."""

    version: str
    folder: Path
    format: str
    artifact: Path
    manifest: dict[str, Any] | None


def check_model_name(name: str) -> str:
    """Refuse names that could leave the repository or are not printable."""
    if not MODEL_NAME.fullmatch(name):
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise InvalidInput(
            f"model name {shown!r} is invalid: expected 1-128 characters from"
            " A-Z a-z 0-9 _ . -, starting with a letter or digit"
        )
    return name


class Repository:
    """A folder of models. Every path it hands out lies inside ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def model_names(self) -> list[str]:
        """Names of the model folders present (those with a config.toml)."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if MODEL_NAME.fullmatch(entry.name) and (entry / "config.toml").is_file()
        )

    def model_dir(self, name: str) -> Path:
        check_model_name(name)
        folder = (self.root / name).resolve()
        if folder.parent != self.root or not (folder / "config.toml").is_file():
            raise ModelNotFound(f"model {name!r} is not in the repository")
        return folder

    def read_config(self, name: str) -> ModelConfig:
        folder = self.model_dir(name)
        path = folder / "config.toml"
        return parse_model_config(name, load_toml(path), f"{name}/config.toml")

    def versions(self, name: str) -> list[str]:
        """Version folder names, in ascending numeric order."""
        folder = self.model_dir(name)
        return sorted(
            (entry.name for entry in folder.iterdir() if entry.is_dir() and entry.name.isdigit()),
            key=int,
        )

    def version_files(self, config: ModelConfig, version: str | None = None) -> VersionFiles:
        """Locate the artifact to serve; raises ConfigError saying what is missing."""
        versions = self.versions(config.name)
        chosen = version or config.version or (versions[-1] if versions else None)
        where = f"{config.name}/config.toml"
        if chosen is None:
            raise ConfigError(where, "", "no version folder (expected e.g. 1/model.pt)")
        if chosen not in versions:
            raise ConfigError(
                where, "version", f"version {chosen!r} has no folder; found {versions}"
            )
        folder = self.model_dir(config.name) / chosen
        if config.format is not None:
            fmt = config.format
            artifact = folder / ARTIFACT_FILES[fmt]
        else:
            present = [(f, folder / n) for f, n in ARTIFACT_FILES.items() if (folder / n).is_file()]
            if len(present) != 1:
                names = " or ".join(ARTIFACT_FILES.values())
                problem = "no artifact" if not present else "two artifacts; set format"
                raise ConfigError(f"{config.name}/{chosen}", "", f"{problem} (expected {names})")
            fmt, artifact = present[0]
        if not artifact.is_file():
            raise ConfigError(f"{config.name}/{chosen}", "", f"artifact {artifact.name} not found")
        if artifact.resolve().parent != folder.resolve():
            raise ConfigError(
                f"{config.name}/{chosen}", "", "artifact links outside the repository"
            )
        manifest = read_manifest(folder, config.name, chosen)
        return VersionFiles(chosen, folder, fmt, artifact, manifest)


def read_manifest(folder: Path, name: str, version: str) -> dict[str, Any] | None:
    path = folder / "manifest.json"
    if not path.exists():
        return None
    where = f"{name}/{version}/manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(where, "", f"unreadable: {error}") from None
    if not isinstance(manifest, dict):
        raise ConfigError(where, "", "expected a JSON object")
    return manifest


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_artifact(files: VersionFiles) -> None:
    """Check the artifact's SHA-256 against its manifest, when there is one."""
    if files.manifest is None:
        return
    where = f"{files.folder.parent.name}/{files.version}/manifest.json"
    expected = files.manifest.get("sha256")
    if not isinstance(expected, str):
        raise ConfigError(where, "sha256", "missing; expected the artifact's hex digest")
    digest = sha256_of(files.artifact)
    if digest != expected.lower():
        raise ConfigError(
            where,
            "sha256",
            f"artifact {files.artifact.name} does not match its manifest"
            f" (sha256 {digest[:16]}..., manifest says {expected[:16]}...):"
            " it was modified or corrupted",
        )


def parse_model_config(name: str, data: dict[str, Any], file: str) -> ModelConfig:
    """Validate one model's config.toml; errors name the file and field."""
    root = Table(data, file)
    declared = root.string("name", name)
    if declared != name:
        raise root.error("name", f"{declared!r} differs from the folder name {name!r}")
    fmt = root.choice("format", list(ARTIFACT_FILES), None)
    version = root.string("version", None)
    if version is not None and not version.isdigit():
        raise root.error("version", f"expected a version folder name like '1', got {version!r}")
    max_batch_size = root.integer("max_batch_size", 0, minimum=0, maximum=65536)
    description = root.string("description", "")
    generation_table = root.table("generation")
    generative = bool(generation_table.data)
    inputs = tuple(_tensor_spec(t) for t in root.tables("inputs"))
    outputs = tuple(_tensor_spec(t) for t in root.tables("outputs"))
    if generative:
        if fmt not in (None, "llm"):
            raise root.error(
                "format", "a model with a [generation] table is a language model: 'llm'"
            )
        fmt = "llm"
        if inputs or outputs:
            raise root.error(
                "inputs", "a language model has no [[inputs]] or [[outputs]]; it takes Generate"
            )
    elif fmt == "llm":
        raise root.error("generation", "missing; a language model needs a [generation] table")
    if not inputs and not generative:
        raise root.error("inputs", "missing; expected at least one [[inputs]] table")
    if not outputs and not generative:
        raise root.error("outputs", "missing; expected at least one [[outputs]] table")
    for key, specs in (("inputs", inputs), ("outputs", outputs)):
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise root.error(key, f"duplicate name {duplicates[0]!r}")

    batching_table = root.table("batching")
    batching = BatchingConfig(
        max_queue_delay_us=batching_table.integer(
            "max_queue_delay_us", DEFAULT_QUEUE_DELAY_US, minimum=0, maximum=10**7
        ),
        delay_policy=batching_table.choice("delay_policy", DELAY_POLICIES, DEFAULT_DELAY_POLICY),
        preferred_batch_sizes=tuple(
            batching_table.list_of("preferred_batch_sizes", _positive_int(file, max_batch_size), [])
        ),
        max_queue_size=batching_table.integer("max_queue_size", 1024, minimum=1, maximum=10**6),
    )
    batching_table.finish()

    instances_table = root.table("instances")
    instances = instances_table.integer("count", 1, minimum=1, maximum=64)
    threads = instances_table.integer("threads", 1, minimum=1, maximum=256)
    inline_max_us = instances_table.integer(
        "inline_max_us", DEFAULT_INLINE_MAX_US, minimum=0, maximum=10**6
    )
    instances_table.finish()

    generation = None
    if generative:
        generation = GenerationConfig(
            max_sequences=generation_table.integer("max_sequences", 4, minimum=1, maximum=256),
            context=generation_table.integer("context", 2048, minimum=16, maximum=1 << 20),
            prefill_chunk=generation_table.integer("prefill_chunk", 256, minimum=1, maximum=8192),
            threads=generation_table.integer(
                "threads", os.cpu_count() or 1, minimum=1, maximum=256
            ),
        )
        generation_table.finish()
    root.finish()
    return ModelConfig(
        name=name,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        format=fmt,
        version=version,
        description=description,
        batching=batching,
        instances=instances,
        threads=threads,
        inline_max_us=inline_max_us,
        generation=generation,
    )


def _tensor_spec(table: Table) -> TensorSpec:
    name = table.string("name")
    if not name:
        raise table.error("name", "must not be empty")
    dtype = table.choice("dtype", list(DTYPES_BY_NAME))
    shape = table.list_of("shape", _dim(table.file))
    table.finish()
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape))


def _dim(file: str) -> Any:
    def check(value: Any, field_name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ConfigError(file, field_name, f"expected a size >= 0 or -1 (any), got {value!r}")
        return value

    return check


def _positive_int(file: str, maximum: int) -> Any:
    def check(value: Any, field_name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
            raise ConfigError(
                file, field_name, f"expected a batch size from 1 to {maximum}, got {value!r}"
            )
        return value

    return check
