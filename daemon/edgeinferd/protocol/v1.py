"""The edgeinfer.v1 gRPC service: protobuf in, data-plane call, protobuf out."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np

from edgeinfer.tensors import (
    DTYPES_BY_NAME,
    NUMPY_DTYPES,
    TensorError,
    dtype_code,
    from_bytes,
    from_proto,
    to_proto,
)
from edgeinfer.v1 import inference_pb2 as pb
from edgeinfer.v1 import inference_pb2_grpc, tensor_pb2
from edgeinferd.budgets import connection_of
from edgeinferd.dataplane import (
    Caller,
    DataPlane,
    GenerationRequest,
    InferenceRequest,
    InferenceResponse,
    monotonic_deadline,
)
from edgeinferd.errors import InvalidInput
from edgeinferd.generation.chat import Message
from edgeinferd.generation.params import Sampling
from edgeinferd.generation.sequence import GenerationChunk, GenerationEvent
from edgeinferd.metrics import resident_memory_bytes
from edgeinferd.models import ModelEntry
from edgeinferd.peers import TOKEN_METADATA, PeerTokens
from edgeinferd.protocol.status import status_for
from edgeinferd.protocol.streams import answer_inferences
from edgeinferd.shm import SharedMemoryRegistry

#: Tensors beyond the model's inputs that are still decoded one by one, so that the
#: message can name the unknown or repeated one; more are refused by count alone.
EXTRA_INPUTS = 8

_STATES = {"READY": pb.READY, "LOADING": pb.LOADING, "FAILED": pb.FAILED, "UNLOADED": pb.UNLOADED}


def decode_request(
    message: pb.PredictRequest,
    time_remaining: float | None,
    shm: SharedMemoryRegistry,
    caller: Caller | None = None,
    expected_inputs: int | None = None,
) -> InferenceRequest:
    inputs = {}
    if expected_inputs is not None and len(message.inputs) > expected_inputs + EXTRA_INPUTS:
        # Refused before any tensor is decoded: 200,000 tiny tensors cost the event loop
        # a second to decode only to be refused afterwards. A few extra ones still get
        # the precise message (which tensor is unknown or twice) from the loop below.
        raise InvalidInput(
            f"the request has {len(message.inputs)} input tensors; model {message.model[:64]!r}"
            f" takes {expected_inputs}"
        )
    for tensor in message.inputs:
        if not tensor.name:
            raise InvalidInput("an input tensor has an empty name")
        if tensor.name in inputs:
            raise InvalidInput(f"input {tensor.name!r} appears twice")
        if tensor.HasField("shared_memory"):
            ref = tensor.shared_memory
            uid = caller.uid if caller is not None else None
            what = f"input {tensor.name!r}"
            data = shm.read(uid, ref.region, ref.offset, ref.byte_size, what)
            try:
                inputs[tensor.name] = from_bytes(tensor.dtype, tuple(tensor.shape), data)
            except TensorError as error:
                raise TensorError(f"tensor {tensor.name!r} {error}") from None
        else:
            inputs[tensor.name] = from_proto(tensor)
    return InferenceRequest(
        model=message.model,
        version=message.version,
        id=message.id,
        inputs=inputs,
        outputs=[o.name for o in message.outputs] if message.outputs else (),
        deadline=monotonic_deadline(time_remaining),
    )


def write_to_shared_memory(
    shm: SharedMemoryRegistry,
    uid: int | None,
    name: str,
    array: np.ndarray,
    target: tensor_pb2.SharedMemoryRef,
    tensor: tensor_pb2.Tensor,
) -> None:
    """Put an output's bytes into the caller's region; the response says where."""
    code = dtype_code(array.dtype)
    array = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[code])
    if array.nbytes > target.byte_size:
        raise InvalidInput(
            f"output {name!r} needs {array.nbytes} bytes;"
            f" its shared-memory slice has {target.byte_size}"
        )
    data = array.reshape(-1).view(np.uint8).data
    shm.write(uid, target.region, target.offset, data, f"output {name!r}")
    tensor.name = name
    tensor.dtype = code  # type: ignore[assignment]
    tensor.shape.extend(array.shape)
    tensor.shared_memory.region = target.region
    tensor.shared_memory.offset = target.offset
    tensor.shared_memory.byte_size = array.nbytes


def decode_generate(message: pb.GenerateRequest, time_remaining: float | None) -> GenerationRequest:
    kind = message.WhichOneof("prompt")
    prompt: str | Sequence[int] | list[Message]
    if kind == "tokens":
        # Handed on as protobuf's own container: its size is checked before it is copied.
        prompt = message.tokens.ids
    elif kind == "messages":
        prompt = [Message(m.role, m.content) for m in message.messages.messages]
    else:
        prompt = message.text
    return GenerationRequest(
        model=message.model,
        prompt=prompt,
        max_new_tokens=message.max_new_tokens,
        version=message.version,
        id=message.id,
        sampling=Sampling(
            temperature=message.temperature,
            top_k=message.top_k,
            top_p=message.top_p if message.HasField("top_p") else None,
            min_p=message.min_p,
            repetition_penalty=(
                message.repetition_penalty if message.HasField("repetition_penalty") else 1.0
            ),
            seed=message.seed if message.HasField("seed") else None,
        ),
        stop=list(message.stop),
        deadline=monotonic_deadline(time_remaining),
    )


def encode_generation_event(request_id: str, event: GenerationEvent) -> pb.GenerateResponse:
    if isinstance(event, GenerationChunk):
        chunk = pb.GenerateChunk(token_ids=event.token_ids, text=event.text)
        return pb.GenerateResponse(id=request_id, chunk=chunk)
    summary = pb.GenerateSummary(
        finish_reason=event.finish_reason.value,
        prompt_tokens=event.prompt_tokens,
        generated_tokens=event.generated_tokens,
        time_to_first_token_s=event.time_to_first_token_s,
        tokens_per_second=event.tokens_per_second,
    )
    return pb.GenerateResponse(id=request_id, summary=summary)


def model_info(entry: ModelEntry, dataplane: DataPlane) -> pb.ModelInfo:
    info = pb.ModelInfo(name=entry.name, state=_STATES[entry.state.value], reason=entry.reason)
    config = entry.serving.config if entry.serving else entry.config
    if config is not None:
        batch = (-1,) if config.batched else ()
        for specs, field in ((config.inputs, info.inputs), (config.outputs, info.outputs)):
            for spec in specs:
                field.add(
                    name=spec.name, dtype=DTYPES_BY_NAME[spec.dtype], shape=batch + spec.shape
                )
        info.max_batch_size = config.max_batch_size
        info.generative = config.generation is not None
    serving = entry.serving
    if serving is not None:
        info.serving_version = serving.version
    try:
        on_disk = dataplane.models.repository.versions(entry.name)
    except Exception:
        on_disk = []
    for version in on_disk:
        item = info.versions.add(version=version, state=pb.UNLOADED)
        if serving is not None and version == serving.version:
            item.state = pb.READY
            item.format = serving.files.format
            item.size_bytes = serving.size_bytes
            if serving.files.manifest:
                item.manifest.update(_json_safe(serving.files.manifest))
    return info


def _json_safe(value: Any) -> Any:
    """Struct holds JSON values only; numbers become floats there anyway."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def stats_message(dataplane: DataPlane) -> pb.Stats:
    """The GetStats answer: the same numbers the metrics endpoint exports."""
    metrics = dataplane.metrics
    stats = pb.Stats(
        in_flight=metrics.in_flight,
        resident_memory_bytes=resident_memory_bytes(),
        uptime_seconds=time.monotonic() - metrics.started,
    )
    entries = {entry.name: entry for entry in dataplane.list_models()}
    for (model, version), counters in sorted(metrics.snapshot()):
        entry = entries.get(model)
        item = stats.models.add(model=model, version=version)
        if entry is not None:
            item.state = _STATES[entry.state.value]
        item.requests_by_status.update(counters.requests)
        item.queue_seconds_sum = counters.latency["queue"].total
        item.compute_seconds_sum = counters.latency["compute"].total
        item.total_seconds_sum = counters.latency["total"].total
        serving = entry.serving if entry else None
        batcher = getattr(serving, "batcher", None) if serving else None
        if serving is not None and batcher is not None and serving.version == version:
            item.batches = batcher.stats.batches
            item.batched_rows = batcher.stats.rows
            item.inline_passes = batcher.inline_passes
            item.queued = batcher.queued
            item.in_flight = batcher.in_flight
    return stats


def caller_of(context: grpc.aio.ServicerContext[Any, Any], peers: PeerTokens) -> Caller:
    """Who is calling: the transport, and for Unix-socket callers with a token, the uid."""
    via_unix = context.peer().startswith("unix:")
    uid = None
    if via_unix:
        for key, value in context.invocation_metadata() or ():
            if key == TOKEN_METADATA and isinstance(value, str):
                uid = peers.uid(value)
                break
    return Caller(via_unix_socket=via_unix, uid=uid)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """edgeinfer.v1 handlers. Errors are mapped by the one boundary
    (``edgeinferd.protocol.boundary``); a handler only raises."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        return caller_of(context, self.dataplane.peers)

    def _input_count(self, message: pb.PredictRequest) -> int:
        """How many inputs the serving model takes; an unknown model is refused (and
        counted) here, before its tensors are decoded."""
        try:
            loaded = self.dataplane.serving(message.model, message.version)
        except Exception as error:
            self.dataplane.count_refusal(message.model, message.version, error)
            raise
        return len(loaded.config.inputs)

    def _encode(
        self, message: pb.PredictRequest, result: InferenceResponse, caller: Caller
    ) -> pb.PredictResponse:
        response = pb.PredictResponse(model=result.model, version=result.version, id=result.id)
        targets = (
            {o.name: o.shared_memory for o in message.outputs if o.HasField("shared_memory")}
            if message.outputs
            else {}
        )
        for name, array in result.outputs.items():
            tensor = response.outputs.add()
            target = targets.get(name)
            if target is None:
                to_proto(name, array, tensor)
            else:
                write_to_shared_memory(
                    self.dataplane.shared_memory, caller.uid, name, array, target, tensor
                )
        return response

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PredictResponse:
        caller = self._caller(context)
        decoded = decode_request(
            request,
            context.time_remaining(),
            self.dataplane.shared_memory,
            caller,
            self._input_count(request),
        )
        return self._encode(request, await self.dataplane.infer(decoded), caller)

    async def PredictStream(
        self,
        request_iterator: AsyncIterator[pb.PredictRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        """Answer in request order while up to STREAM_PIPELINE_DEPTH messages run at once."""
        caller = self._caller(context)

        def decode(message: pb.PredictRequest) -> InferenceRequest:
            return decode_request(
                message,
                context.time_remaining(),
                self.dataplane.shared_memory,
                caller,
                self._input_count(message),
            )

        def answer(
            message: pb.PredictRequest, result: InferenceResponse
        ) -> pb.PredictStreamResponse:
            response = self._encode(message, result, caller)
            return pb.PredictStreamResponse(id=message.id, response=response)

        def fail(message: pb.PredictRequest, error: Exception) -> pb.PredictStreamResponse:
            code, text = status_for(error, message.id)
            return pb.PredictStreamResponse(
                id=message.id, error=pb.Error(code=code.value[0], message=text)
            )

        replies = answer_inferences(
            request_iterator,
            self.dataplane,
            connection_of(context.peer()),
            decode,
            answer,
            fail,
            size=message_bytes,
        )
        async with contextlib.aclosing(replies):
            async for reply in replies:
                yield reply

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        # Errors reach the caller through the server's ErrorBoundary, like every handler's.
        events = self.dataplane.generate(decode_generate(request, context.time_remaining()))
        # Closed explicitly when the call ends (cancel, deadline): that frees the slot.
        async with contextlib.aclosing(events):
            async for event in events:
                yield encode_generation_event(request.id, event)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        entries = self.dataplane.list_models()
        return pb.ListModelsResponse(models=[model_info(e, self.dataplane) for e in entries])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfo:
        return model_info(self.dataplane.get_model(request.name), self.dataplane)

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfo:
        entry = await self.dataplane.load_model(request.name, self._caller(context))
        return model_info(entry, self.dataplane)

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfo:
        entry = await self.dataplane.unload_model(request.name, self._caller(context))
        return model_info(entry, self.dataplane)

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Stats:
        return stats_message(self.dataplane)

    async def RegisterSharedMemory(
        self, request: pb.RegisterSharedMemoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterSharedMemoryResponse:
        self.dataplane.shared_memory.register(
            self._caller(context).uid, request.name, request.key, request.offset, request.byte_size
        )
        return pb.RegisterSharedMemoryResponse()

    async def UnregisterSharedMemory(
        self, request: pb.UnregisterSharedMemoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UnregisterSharedMemoryResponse:
        self.dataplane.shared_memory.unregister(self._caller(context).uid, request.name)
        return pb.UnregisterSharedMemoryResponse()

    async def ListSharedMemory(
        self, request: pb.ListSharedMemoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSharedMemoryResponse:
        regions = self.dataplane.shared_memory.regions(self._caller(context).uid)
        return pb.ListSharedMemoryResponse(
            regions=[
                pb.SharedMemoryRegion(
                    name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                )
                for r in regions
            ]
        )


def message_bytes(message: pb.PredictRequest) -> int:
    """What a stream message holds in memory while it is in flight (for the byte bound)."""
    return message.ByteSize()


__all__ = [
    "InferenceServicer",
    "decode_generate",
    "decode_request",
    "encode_generation_event",
    "model_info",
]
