"""The transport-free data plane: what every protocol adapter calls.

A request arrives here already decoded into numpy arrays; the data plane
checks them against the model's declared inputs, queues them on the model's
batcher and returns named outputs. The gRPC servicers only convert protobuf
and delegate here, so validation, batching and execution exist once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog

from edgeinfer.tensors import shape_repr
from edgeinferd import logs
from edgeinferd.batching import QueuedCall
from edgeinferd.budgets import ConnectionBudgets
from edgeinferd.errors import Cancelled, InvalidInput, ModelExecutionError, PermissionDenied
from edgeinferd.generation import params as generation_params
from edgeinferd.generation.chat import Message
from edgeinferd.generation.params import Sampling
from edgeinferd.generation.sequence import GenerationEvent
from edgeinferd.metrics import UNKNOWN_MODEL, Metrics
from edgeinferd.models import LoadedVersion, ModelEntry, ModelManager
from edgeinferd.peers import PeerTokens
from edgeinferd.repository import ModelConfig, check_model_name
from edgeinferd.shm import SharedMemoryRegistry

log = structlog.get_logger("edgeinferd.dataplane")


@dataclass(slots=True)
class InferenceRequest:
    model: str
    inputs: Mapping[str, np.ndarray]
    version: str = ""
    id: str = ""
    #: Names of the outputs wanted; empty means all.
    outputs: Sequence[str] = ()
    #: A time.monotonic() instant after which the call is not worth running.
    deadline: float | None = None


@dataclass(slots=True)
class InferenceResponse:
    model: str
    version: str
    id: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    queue_s: float = 0.0
    compute_s: float = 0.0


@dataclass(slots=True)
class GenerationRequest:
    model: str
    #: Text, token ids of the model's vocabulary, or a conversation for its chat template.
    prompt: str | Sequence[int] | Sequence[Message]
    max_new_tokens: int
    version: str = ""
    id: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    stop: Sequence[str] = ()
    deadline: float | None = None


@dataclass(eq=False, slots=True)
class PendingInference:
    """A validated call in its model's queue: what ``complete`` needs to answer it."""

    request: InferenceRequest
    loaded: LoadedVersion
    #: Indices of the outputs the caller asked for; None for all of them.
    wanted: list[int] | None
    queued: QueuedCall
    started: float
    #: Finished or abandoned: counted once.
    ended: bool = False


@dataclass(frozen=True, slots=True)
class Caller:
    """What the data plane may know about who is calling."""

    via_unix_socket: bool = True
    #: The kernel-attested uid of a Unix-socket caller that presented its peer token
    #: (``edgeinferd.peers``); None for TCP callers and callers without a token.
    uid: int | None = None


class DataPlane:
    def __init__(self, models: ModelManager, management: str = "all") -> None:
        self.models = models
        self.management = management
        #: Regions callers registered for tensors in shared memory (every protocol uses these).
        self.shared_memory = SharedMemoryRegistry()
        #: Tokens that stand for the uids of Unix-socket callers (they own regions).
        self.peers = PeerTokens()
        #: Request bytes each connection's streams hold (shared by its streams).
        self.stream_budgets = ConnectionBudgets()
        self.metrics = Metrics(self.stream_budgets)
        #: Set when a graceful stop begins: live, but no longer ready for new work.
        self.draining = False

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Validate, queue, run and answer one call; every outcome is counted."""
        return await self.complete(self.start(request))

    async def complete(self, pending: PendingInference) -> InferenceResponse:
        """Wait for a started call and answer it; if the waiter is cancelled, abandon it."""
        try:
            await pending.queued.future
        except asyncio.CancelledError:
            self.abandon(pending)
            raise
        except Exception:
            pass  # _finish() counts it and raises it
        return self._finish(pending)

    def start(self, request: InferenceRequest) -> PendingInference:
        """Validate and queue one call without waiting for it.

        Streams start each message as it arrives and ``complete`` them in
        order, so many are in the batcher at once with no task per message.
        Every started call must end in ``complete`` or ``abandon``. Raises
        (after counting) for a call that cannot be queued.
        """
        started = time.perf_counter()
        loaded: LoadedVersion | None = None
        try:
            loaded = self.models.serving(request.model, request.version)
            _, batcher = loaded.predictor()
            arrays = validate_inputs(loaded.config, request.inputs)
            wanted = select_outputs(loaded.config, request.outputs)
            queued = batcher.enqueue(arrays, request.deadline)
        except Exception as error:
            model, version = self._counted_as(request, loaded)
            self.metrics.record(model, version, error, time.perf_counter() - started)
            raise
        self.metrics.in_flight += 1
        return PendingInference(request, loaded, wanted, queued, started)

    def count_refusal(self, model: str, version: str, error: BaseException) -> None:
        """Count a call an adapter refused before ``start`` (under a bounded key)."""
        key = InferenceRequest(model=model, inputs={}, version=version)
        self.metrics.record(*self._counted_as(key, None), error, 0.0)

    def _counted_as(
        self, request: InferenceRequest, loaded: LoadedVersion | None
    ) -> tuple[str, str]:
        """The metrics key of a call that failed before it was queued.

        Never the strings the caller sent: a model and version that serve, a
        known model with no version (a wrong or missing one), or one bucket
        for every unknown or invalid name. So callers cannot grow the stats.
        """
        if loaded is not None:
            return loaded.config.name, loaded.version
        if self.models.known(request.model):
            return request.model, ""
        return UNKNOWN_MODEL, ""

    def _finish(self, pending: PendingInference) -> InferenceResponse:
        """The answer to a started call whose future is done; raises its error."""
        future = pending.queued.future
        if future.cancelled():
            self.abandon(pending)
            raise Cancelled("the call was cancelled")
        request, loaded = pending.request, pending.loaded
        self.metrics.in_flight -= 1
        pending.ended = True
        elapsed = time.perf_counter() - pending.started
        error = future.exception()
        if error is not None:
            self.metrics.record(request.model, loaded.version, error, elapsed)
            if isinstance(error, ModelExecutionError):
                # The traceback of the model's own exception (the cause), with the request id.
                log.error(
                    "forward pass failed",
                    model=request.model,
                    version=loaded.version,
                    request_id=request.id[:128],
                    duration_ms=round(elapsed * 1000, 3),
                    error=str(error),
                    exc_info=error.__cause__ or error,
                )
            raise error
        completed = future.result()
        self.metrics.record_success(
            request.model, loaded.version, elapsed, completed.queue_s, completed.compute_s
        )
        if logs.debug_enabled:  # the hot path pays one attribute read, not a call
            log.debug(
                "request",
                model=request.model,
                version=loaded.version,
                request_id=request.id,
                duration_ms=round(elapsed * 1000, 3),
            )
        names, outputs, wanted = loaded.config.output_names, completed.outputs, pending.wanted
        return InferenceResponse(
            model=request.model,
            version=loaded.version,
            id=request.id,
            outputs=(
                dict(zip(names, outputs, strict=True))
                if wanted is None
                else {names[i]: outputs[i] for i in wanted}
            ),
            queue_s=completed.queue_s,
            compute_s=completed.compute_s,
        )

    def abandon(self, pending: PendingInference) -> None:
        """The caller went away: withdraw the call and count it as cancelled (once)."""
        if pending.ended:
            return
        pending.ended = True
        pending.loaded.predictor()[1].withdraw(pending.queued)
        self.metrics.in_flight -= 1
        self.metrics.record(
            pending.request.model,
            pending.loaded.version,
            Cancelled("the caller cancelled the call"),
            time.perf_counter() - pending.started,
        )

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Validate, take a slot (or fail with Overloaded at once), then stream the tokens.

        Closing this iterator early cancels the generation and frees its slot.
        """
        loaded = self.models.serving(request.model, request.version)
        engine = loaded.generator()
        model = engine.model
        generation_params.check_prompt_size(model, request.prompt)
        # Tokenizing (and rendering a chat template) grows with the prompt: not on the loop.
        ids = await asyncio.get_running_loop().run_in_executor(
            None, generation_params.encode_prompt, model, request.prompt
        )
        params = generation_params.validate(
            model,
            ids,
            max_new_tokens=request.max_new_tokens,
            sampling=request.sampling,
            stop=request.stop,
        )
        sequence = engine.submit(params, request.id, request.deadline)
        try:
            async for event in engine.stream(sequence):
                yield event
        finally:
            # Not left to garbage collection: the slot must be free the moment we stop.
            engine.cancel(sequence)

    # -- model management ----------------------------------------------------

    def list_models(self) -> list[ModelEntry]:
        return self.models.entries()

    def get_model(self, name: str) -> ModelEntry:
        return self.models.entry(name)

    async def load_model(self, name: str, caller: Caller) -> ModelEntry:
        self._check_management(caller, "load")
        return await self.models.load(check_model_name(name))

    async def unload_model(self, name: str, caller: Caller) -> ModelEntry:
        self._check_management(caller, "unload")
        return await self.models.unload(check_model_name(name))

    def serving(self, name: str, version: str = "") -> LoadedVersion:
        return self.models.serving(name, version)

    def _check_management(self, caller: Caller, action: str) -> None:
        if self.management == "none":
            raise PermissionDenied(
                f"{action} is disabled on this daemon (management.allow = 'none')"
            )
        if self.management == "unix" and not caller.via_unix_socket:
            raise PermissionDenied(
                f"{action} is only allowed over the Unix socket (management.allow = 'unix')"
            )


def validate_inputs(config: ModelConfig, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Check names, dtypes and shapes against the config; arrays in config order.

    Every message names the tensor, what came and what was expected. The
    comparisons use the config's ``input_checks``, worked out once per version.
    """
    names = config.input_names
    for name in inputs:
        if name not in names:
            raise InvalidInput(
                f"model {config.name!r} has no input {name!r}; it takes {', '.join(names)}"
            )
    arrays = []
    batched = config.batched
    batch_rows: int | None = None
    for check in config.input_checks:
        array = inputs.get(check.name)
        if array is None:
            raise InvalidInput(
                f"model {config.name!r} input {check.name!r} is missing;"
                f" expected {check.dtype}{shape_repr(check.expected)}"
            )
        if array.dtype != check.dtype:
            raise InvalidInput(
                f"input {check.name!r} has dtype {array.dtype};"
                f" model {config.name!r} expects {check.dtype}"
            )
        shape = array.shape
        if not _shape_fits(shape, check.expected, check.fixed, batched):
            raise InvalidInput(
                f"input {check.name!r} has shape {shape_repr(shape)}; model {config.name!r}"
                f" expects {shape_repr(check.expected)}"
                + (" (the first dimension is the batch)" if batched else "")
            )
        if batched:
            rows = shape[0]
            if not 1 <= rows <= config.max_batch_size:
                raise InvalidInput(
                    f"input {check.name!r} has a batch of {rows}; model {config.name!r} takes"
                    f" 1 to {config.max_batch_size} rows per call"
                )
            if batch_rows is not None and rows != batch_rows:
                raise InvalidInput(
                    f"input {check.name!r} has a batch of {rows};"
                    f" the other inputs have {batch_rows}"
                )
            batch_rows = rows
        arrays.append(array)
    return arrays


def _shape_fits(
    shape: tuple[int, ...],
    expected: tuple[int, ...],
    fixed: tuple[int, ...] | None,
    batched: bool,
) -> bool:
    """Whether ``shape`` matches ``expected`` (-1 matches any size)."""
    if len(shape) != len(expected):
        return False
    if fixed is not None:  # no free dimension: one tuple comparison
        return (shape[1:] if batched else shape) == fixed
    return all(e == -1 or e == s for e, s in zip(expected, shape, strict=True))


def select_outputs(config: ModelConfig, wanted: Sequence[str]) -> list[int] | None:
    """Indices of the requested outputs; None when none are named (all, in config order)."""
    if not wanted:
        return None
    names = config.output_names
    indices = []
    for name in wanted:
        if name not in names:
            raise InvalidInput(
                f"model {config.name!r} has no output {name!r}; it returns {', '.join(names)}"
            )
        indices.append(names.index(name))
    return indices


def monotonic_deadline(time_remaining: float | None) -> float | None:
    """Turn a gRPC-style 'seconds left' into a monotonic instant."""
    return None if time_remaining is None else time.monotonic() + time_remaining
