"""Which models are loaded, in what state, and swapping versions safely.

The manager owns one ``ModelEntry`` per model name. Loading happens off the
event loop; a new version is swapped in only once it is warmed up, and the
old one is closed (its queued and running calls finish first) afterwards, so
a reload under load fails no call.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import structlog

from edgeinferd.batching import Batcher, PassCost
from edgeinferd.errors import (
    ConfigError,
    EdgeInferError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
)
from edgeinferd.generation.engine import GenerationEngine
from edgeinferd.generation.model import LanguageModel, load_language_model
from edgeinferd.repository import ModelConfig, Repository, VersionFiles, check_model_name
from edgeinferd.runtime import Runner, load_runner
from edgeinferd.tasks import log_failure

log = structlog.get_logger("edgeinferd.models")


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"


@dataclass(eq=False)
class LoadedVersion:
    """One version in memory, with its batcher. Immutable once serving."""

    config: ModelConfig
    files: VersionFiles
    fingerprint: tuple[Any, ...]
    size_bytes: int
    #: Models that predict: the forward pass and the queue that batches calls for it.
    runner: Runner | None = None
    batcher: Batcher | None = None
    loaded_at: float = field(default_factory=time.time)
    #: Language models only: decodes their sequences.
    engine: GenerationEngine | None = None

    @property
    def version(self) -> str:
        return self.files.version

    def predictor(self) -> tuple[Runner, Batcher]:
        """The runner and batcher of a model that predicts; a language model has none."""
        if self.runner is None or self.batcher is None:
            raise InvalidInput(f"model {self.config.name!r} is generative; call Generate")
        return self.runner, self.batcher

    def generator(self) -> GenerationEngine:
        """The generation engine of a language model."""
        if self.engine is None:
            raise InvalidInput(f"model {self.config.name!r} is not generative; call Predict")
        return self.engine

    async def close(self, drain: bool = True) -> None:
        """Finish queued calls; running generations finish (``drain``) or are cancelled."""
        if self.batcher is not None:
            await self.batcher.close()
        if self.engine is not None:
            await self.engine.close(drain)


@dataclass(eq=False)
class ModelEntry:
    name: str
    state: ModelState = ModelState.LOADING
    reason: str = ""
    serving: LoadedVersion | None = None
    #: The config last read from disk (even if loading it then failed).
    config: ModelConfig | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


ChangeListener = Callable[[ModelEntry], None]


class ModelManager:
    def __init__(
        self,
        repository: Repository,
        executor: Executor,
        on_change: ChangeListener | None = None,
    ) -> None:
        self.repository = repository
        self._executor = executor
        self._entries: dict[str, ModelEntry] = {}
        self._on_change = on_change or (lambda entry: None)
        self._retiring: set[asyncio.Task[None]] = set()

    # -- queries -------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        """Every model known: loaded, failed, unloaded, and those on disk not yet seen."""
        for name in self.repository.model_names():
            self._entries.setdefault(name, ModelEntry(name, ModelState.UNLOADED))
        return [self._entries[name] for name in sorted(self._entries)]

    def known(self, name: str) -> bool:
        """Whether ``name`` is a model this manager has an entry for (never creates one)."""
        return name in self._entries

    def entry(self, name: str) -> ModelEntry:
        check_model_name(name)
        entry = self._entries.get(name)
        if entry is None:
            if name not in self.repository.model_names():
                raise ModelNotFound(f"model {name!r} is not in the repository")
            entry = self._entries[name] = ModelEntry(name, ModelState.UNLOADED)
        return entry

    def serving(self, name: str, version: str = "") -> LoadedVersion:
        """The loaded version that a call should go to."""
        entry = self._entries.get(name)
        if entry is None:
            check_model_name(name)
            raise ModelNotFound(f"model {name!r} is not in the repository")
        loaded = entry.serving
        if loaded is None:
            why = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReady(f"model {name!r} is {entry.state.value}{why}")
        if version and version != loaded.version:
            raise ModelNotFound(
                f"version {version!r} of model {name!r} is not loaded; it serves version"
                f" {loaded.version!r}"
            )
        return loaded

    # -- changes -------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model in the repository; failures are recorded, not raised."""
        await asyncio.gather(
            *(self.load(name, strict=False) for name in self.repository.model_names())
        )

    async def load(self, name: str, strict: bool = True) -> ModelEntry:
        """Load (or reload, if changed on disk) a model's serving version.

        If loading fails and an older version is serving, that version keeps
        serving and the failure is recorded as the reason. With ``strict``,
        the failure is also raised.
        """
        entry = self.entry(name)
        async with entry.lock:
            try:
                config, files, fingerprint = await self._inspect(name)
            except EdgeInferError as error:
                self._failed(entry, error)
                if strict:
                    raise
                return entry
            if entry.serving is not None and entry.serving.fingerprint == fingerprint:
                return entry
            entry.config = config
            if entry.serving is None:
                entry.state = ModelState.LOADING
                self._on_change(entry)
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                if config.generation is not None:
                    language_model = await loop.run_in_executor(
                        None, _load_language_model, config, files
                    )
                    parts: dict[str, Any] = {
                        "engine": GenerationEngine(language_model, self._executor)
                    }
                else:
                    runner = await loop.run_in_executor(None, load_runner, config, files)
                    cost = PassCost(*runner.pass_times) if runner.pass_times else None
                    parts = {"runner": runner, "batcher": Batcher(config, runner.run, cost)}
            except EdgeInferError as error:
                self._failed(entry, error)
                if strict:
                    raise
                return entry
            loaded = LoadedVersion(
                config=config,
                files=files,
                fingerprint=fingerprint,
                size_bytes=files.artifact.stat().st_size,
                **parts,
            )
            previous = entry.serving
            entry.serving, entry.state, entry.reason = loaded, ModelState.READY, ""
            log.info(
                "model loaded",
                model=name,
                version=loaded.version,
                format=files.format,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                replaced=previous.version if previous else None,
            )
            self._on_change(entry)
            if previous is not None:
                self._retire(previous)
            return entry

    async def unload(self, name: str) -> ModelEntry:
        """Stop serving a model; calls already queued or running still finish."""
        entry = self.entry(name)
        async with entry.lock:
            previous = entry.serving
            entry.serving, entry.state, entry.reason = None, ModelState.UNLOADED, ""
            self._on_change(entry)
            if previous is not None:
                started = time.perf_counter()
                await previous.close(drain=False)
                log.info(
                    "model unloaded",
                    model=name,
                    version=previous.version,
                    duration_ms=round((time.perf_counter() - started) * 1000, 1),
                )
        return entry

    async def reload(self) -> None:
        """Re-read the repository: load new and changed models, unload removed ones."""
        on_disk = set(self.repository.model_names())
        loaded = {name for name, e in self._entries.items() if e.state is not ModelState.UNLOADED}
        removed = loaded - on_disk
        await asyncio.gather(
            *(self.load(name, strict=False) for name in sorted(on_disk)),
            *(self.unload(name) for name in sorted(removed)),
        )
        for name in removed:
            self._entries.pop(name, None)

    async def close(self) -> None:
        """Finish every queued call and stop all batchers."""
        closing = [e.serving.close(drain=False) for e in self._entries.values() if e.serving]
        await asyncio.gather(*closing, *self._retiring)

    # -- internals -----------------------------------------------------------

    async def _inspect(self, name: str) -> tuple[ModelConfig, VersionFiles, tuple[Any, ...]]:
        """Read config and locate the artifact; cheap, but touches the disk."""

        def read() -> tuple[ModelConfig, VersionFiles, tuple[Any, ...]]:
            config = self.repository.read_config(name)
            files = self.repository.version_files(config)
            stat = files.artifact.stat()
            config_stat = (self.repository.model_dir(name) / "config.toml").stat()
            manifest = files.folder / "manifest.json"
            manifest_mtime = manifest.stat().st_mtime_ns if manifest.exists() else 0
            fingerprint = (
                files.version,
                stat.st_size,
                stat.st_mtime_ns,
                stat.st_ino,
                config_stat.st_mtime_ns,
                config_stat.st_size,
                manifest_mtime,
            )
            return config, files, fingerprint

        try:
            return await asyncio.get_running_loop().run_in_executor(None, read)
        except OSError as error:
            raise ConfigError(name, "", f"cannot read: {error}") from None

    def _failed(self, entry: ModelEntry, error: EdgeInferError) -> None:
        entry.reason = str(error)
        if entry.serving is None:
            entry.state = ModelState.FAILED
            log.error("model failed to load", model=entry.name, reason=entry.reason)
        else:
            log.error(
                "model failed to reload; the previous version keeps serving",
                model=entry.name,
                version=entry.serving.version,
                reason=entry.reason,
            )
        self._on_change(entry)

    def _retire(self, previous: LoadedVersion) -> None:
        """Close an old version once its in-flight calls finish, without blocking the swap."""
        task = asyncio.create_task(previous.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        task.add_done_callback(log_failure)


def _load_language_model(config: ModelConfig, files: VersionFiles) -> LanguageModel:
    """Load and warm up a language model; ConfigError says why it cannot serve."""
    model = load_language_model(files.folder, config)
    model.warm_up()
    return model
