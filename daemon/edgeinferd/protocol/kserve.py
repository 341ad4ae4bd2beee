"""The Open Inference Protocol (KServe V2) gRPC service, with Triton's extensions.

Unchanged Triton and KServe clients (tritonclient, perf_analyzer-style tools)
reach the same data plane as edgeinfer.v1: this module only converts between
``inference.*`` messages and data-plane calls, so validation, batching and
execution stay in one place, and errors take their status codes from the one
table in ``edgeinferd.protocol.status``.

What this adapter does check is what only V2 has: datatype names, the pairing
of ``raw_input_contents`` with ``inputs``, and typed ``contents`` fields.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Never, TypeAlias

import grpc
import numpy as np

import edgeinferd
from edgeinfer.kserve.v2 import grpc_service_pb2 as pb
from edgeinfer.kserve.v2 import grpc_service_pb2_grpc, model_config_pb2
from edgeinfer.tensors import (
    DTYPE_NAMES,
    DTYPES_BY_NAME,
    NUMPY_DTYPES,
    TensorError,
    dtype_code,
    element_count,
    from_bytes,
    shape_repr,
)
from edgeinferd.batching import BatchStats
from edgeinferd.budgets import connection_of
from edgeinferd.dataplane import (
    DataPlane,
    InferenceRequest,
    InferenceResponse,
    monotonic_deadline,
)
from edgeinferd.errors import EdgeInferError, InvalidInput
from edgeinferd.metrics import Metrics
from edgeinferd.models import LoadedVersion, ModelEntry, ModelState
from edgeinferd.protocol.status import status_for
from edgeinferd.protocol.streams import answer_inferences
from edgeinferd.protocol.v1 import EXTRA_INPUTS, caller_of
from edgeinferd.repository import ModelConfig

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

#: What ServerMetadata advertises: the Triton extensions this service answers.
EXTENSIONS = ("model_repository", "model_configuration", "statistics")

#: V2 datatype -> the data plane's dtype name. The one datatype table: the
#: reverse direction, Triton's config enum and numpy types all derive from it.
V2_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
V2_NAMES: dict[str, str] = {dtype: v2 for v2, dtype in V2_DTYPES.items()}

#: The data plane's dtype name -> Triton's model-config enum (TYPE_ + the V2 name).
CONFIG_TYPES: dict[str, model_config_pb2.DataType] = {
    dtype: getattr(model_config_pb2, "TYPE_" + v2) for v2, dtype in V2_DTYPES.items()
}

#: V2 datatypes that exist but that no edgeinferd model can take, and why.
UNSERVED_DTYPES: dict[str, str] = {
    "BYTES": "edgeinferd models take numeric tensors only, not strings",
    "BF16": "bfloat16 has no numpy type to decode into; send FP32 or FP16",
}

#: The typed ``InferTensorContents`` field of each datatype, and the numpy type
#: protobuf hands its values back as. FP16 has none: it travels raw only.
CONTENTS_FIELDS: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "bool"),
    "UINT8": ("uint_contents", "uint32"),
    "UINT16": ("uint_contents", "uint32"),
    "UINT32": ("uint_contents", "uint32"),
    "UINT64": ("uint64_contents", "uint64"),
    "INT8": ("int_contents", "int32"),
    "INT16": ("int_contents", "int32"),
    "INT32": ("int_contents", "int32"),
    "INT64": ("int64_contents", "int64"),
    "FP32": ("fp32_contents", "float32"),
    "FP64": ("fp64_contents", "float64"),
}

#: Triton's platform names: TorchScript run by libtorch is what Triton calls
#: ``pytorch_libtorch``; torch.export programs have no Triton name.
PLATFORMS = {"torchscript": "pytorch_libtorch", "exported_program": "pytorch_exported_program"}

#: Parameters that would change what a call means; ignoring them would answer
#: a different question than the one asked, so they are refused.
SHARED_MEMORY_PARAMETER = "shared_memory_region"
CLASSIFICATION_PARAMETER = "classification"
#: Set on the ``infer_response`` of a failed stream answer: the gRPC code name.
STREAM_STATUS_PARAMETER = "edgeinfer_status"
#: Repository-load parameters that would load something other than what is on disk.
LOAD_OVERRIDE_PARAMETERS = ("config",)


# -- requests ----------------------------------------------------------------


def decode_request(
    message: pb.ModelInferRequest, config: ModelConfig, time_remaining: float | None
) -> InferenceRequest:
    """Turn a ModelInferRequest into the data plane's request.

    ``config`` is the serving version's, used only to name what the model
    expects in messages about datatypes V2 has and edgeinferd does not serve.
    """
    outputs = message.outputs
    for output in outputs:
        if output.parameters:
            _refuse_parameters(output.parameters, f"output {output.name!r}", classification=True)
    return InferenceRequest(
        model=message.model_name,
        version=message.model_version,
        id=message.id,
        inputs=decode_inputs(message, config),
        outputs=[o.name for o in outputs] if outputs else (),
        deadline=(
            _deadline(message.parameters, time_remaining)
            if message.parameters
            else monotonic_deadline(time_remaining)
        ),
    )


def decode_inputs(message: pb.ModelInferRequest, config: ModelConfig) -> dict[str, np.ndarray]:
    """Decode every input from raw buffers or typed contents, without copying raw ones."""
    if len(message.inputs) > len(config.inputs) + EXTRA_INPUTS:
        # Refused before any tensor is decoded (see edgeinferd.protocol.v1.decode_request).
        raise InvalidInput(
            f"the request has {len(message.inputs)} input tensors; model {config.name!r}"
            f" takes {len(config.inputs)}"
        )
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(
            f"the request has {len(raw)} raw_input_contents for {len(message.inputs)} inputs;"
            " send one buffer per input, in the order of inputs"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        if not name:
            raise InvalidInput("an input tensor has an empty name")
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears twice")
        if tensor.parameters:
            _refuse_parameters(tensor.parameters, f"input {name!r}")
        dtype = V2_DTYPES.get(tensor.datatype) or _dtype_of(tensor.datatype, name, config)
        shape = tuple(tensor.shape)
        try:
            if raw:
                if tensor.HasField("contents"):
                    raise InvalidInput(
                        f"input {name!r} sets contents while the request uses"
                        " raw_input_contents; send all inputs one way or the other"
                    )
                inputs[name] = from_bytes(DTYPES_BY_NAME[dtype], shape, raw[index])
            else:
                inputs[name] = _from_contents(tensor, dtype, shape)
        except TensorError as error:
            raise TensorError(f"input {name!r} {error}") from None
    return inputs


def _dtype_of(datatype: str, name: str, config: ModelConfig) -> str:
    """The data plane's dtype name for a V2 datatype; refuses the ones not served."""
    dtype = V2_DTYPES.get(datatype)
    if dtype is not None:
        return dtype
    model = config.name
    expected = next((V2_NAMES[s.dtype] for s in config.inputs if s.name == name), None)
    wants = f"; model {model!r} expects {expected} for it" if expected else ""
    why = UNSERVED_DTYPES.get(datatype)
    if why is not None:
        raise InvalidInput(f"input {name!r} has datatype {datatype}, which {why}{wants}")
    raise InvalidInput(
        f"input {name!r} has unknown datatype {datatype!r}; expected one of"
        f" {', '.join(V2_DTYPES)}{wants}"
    )


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, dtype: str, shape: tuple[int, ...]
) -> np.ndarray:
    """Decode typed contents, refusing a wrong count or values that do not fit."""
    v2 = V2_NAMES[dtype]
    count = element_count(shape)
    field_and_type = CONTENTS_FIELDS.get(v2)
    if field_and_type is None:
        raise TensorError(
            f"has datatype {v2}, which has no typed contents field; send it in raw_input_contents"
        )
    field, carrier = field_and_type
    values = getattr(tensor.contents, field)
    if len(values) != count:
        hint = "" if tensor.HasField("contents") else " (and no raw_input_contents were sent)"
        raise TensorError(
            f"has {len(values)} values in contents.{field}; shape {shape_repr(shape)}"
            f" needs {count}{hint}"
        )
    sent = np.array(values, dtype=carrier)
    array = sent.astype(NUMPY_DTYPES[DTYPES_BY_NAME[dtype]], copy=False)
    if array.dtype != sent.dtype and not np.array_equal(array, sent):
        raise TensorError(f"has values in contents.{field} that do not fit {v2}")
    return array.reshape(shape)


def _refuse_parameters(
    parameters: Mapping[str, pb.InferParameter], what: str, classification: bool = False
) -> None:
    """Refuse the parameters that would silently change the answer; others are ignored."""
    if SHARED_MEMORY_PARAMETER in parameters:
        region = parameters[SHARED_MEMORY_PARAMETER].string_param
        raise InvalidInput(
            f"{what} refers to shared-memory region {region!r}; edgeinferd has no"
            " shared-memory regions: send the data in the request"
        )
    if classification and CLASSIFICATION_PARAMETER in parameters:
        raise InvalidInput(
            f"{what} asks for classification, which edgeinferd does not do;"
            " request the output itself and take the top classes from it"
        )


def _deadline(
    parameters: Mapping[str, pb.InferParameter], time_remaining: float | None
) -> float | None:
    """The earlier of the gRPC deadline and Triton's ``timeout`` parameter (microseconds)."""
    deadline = monotonic_deadline(time_remaining)
    timeout = parameters.get("timeout")
    if timeout is not None and timeout.WhichOneof("parameter_choice") in (
        "int64_param",
        "uint64_param",
    ):
        micros = timeout.int64_param or timeout.uint64_param
        if micros > 0:
            own = time.monotonic() + micros / 1e6
            deadline = own if deadline is None else min(deadline, own)
    return deadline


# -- responses ---------------------------------------------------------------


def encode_response(result: InferenceResponse) -> pb.ModelInferResponse:
    """Outputs as raw little-endian buffers, in the order they were asked for."""
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=result.version, id=result.id
    )
    for name, array in result.outputs.items():
        datatype = _V2_BY_NUMPY.get(array.dtype)
        if datatype is None:  # not little-endian native, or not a wire type (raises)
            code = dtype_code(array.dtype)
            datatype = V2_NAMES[DTYPE_NAMES[code]]
            array = array.astype(NUMPY_DTYPES[code], copy=False)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


#: numpy dtype -> V2 datatype, for the wire's own (little-endian) numpy types.
_V2_BY_NUMPY: dict[np.dtype[Any], str] = {
    NUMPY_DTYPES[code]: V2_NAMES[name] for code, name in DTYPE_NAMES.items() if name in V2_NAMES
}


def model_metadata(loaded: LoadedVersion) -> pb.ModelMetadataResponse:
    """V2 metadata; shapes carry the batch dimension (as -1) when the model batches."""
    config = loaded.config
    batch = (-1,) if config.batched else ()
    response = pb.ModelMetadataResponse(
        name=config.name,
        versions=[loaded.version],
        platform=PLATFORMS.get(loaded.files.format, loaded.files.format),
    )
    for specs, tensors in ((config.inputs, response.inputs), (config.outputs, response.outputs)):
        for spec in specs:
            tensors.add(name=spec.name, datatype=V2_NAMES[spec.dtype], shape=batch + spec.shape)
    return response


def model_config(loaded: LoadedVersion) -> model_config_pb2.ModelConfig:
    """Triton's config view: dims without the batch dimension, as Triton writes them."""
    config = loaded.config
    result = model_config_pb2.ModelConfig(
        name=config.name,
        platform=PLATFORMS.get(loaded.files.format, loaded.files.format),
        backend="pytorch",
        max_batch_size=config.max_batch_size,
        default_model_filename=loaded.files.artifact.name,
    )
    for spec in config.inputs:
        result.input.add(name=spec.name, data_type=CONFIG_TYPES[spec.dtype], dims=spec.shape)
    for spec in config.outputs:
        result.output.add(name=spec.name, data_type=CONFIG_TYPES[spec.dtype], dims=spec.shape)
    if config.batched:
        result.dynamic_batching.preferred_batch_size.extend(config.batching.preferred_batch_sizes)
        result.dynamic_batching.max_queue_delay_microseconds = config.batching.max_queue_delay_us
        result.dynamic_batching.preserve_ordering = True
    result.instance_group.add(
        name=config.name, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=config.instances
    )
    return result


def model_statistics(loaded: LoadedVersion, metrics: Metrics) -> pb.ModelStatistics:
    """Triton's statistics from the data plane's call metrics and the batcher's counts.

    Calls are counted per request (success, fail, queue, compute), rows and
    forward passes per batcher. Triton splits compute into input, infer and
    output; here the whole forward pass is ``compute_infer`` and the other two
    carry the same count with no time, since tools require equal counts.
    """
    name, version = loaded.config.name, loaded.version
    stats = loaded.batcher.stats if loaded.batcher is not None else BatchStats()
    result = pb.ModelStatistics(
        name=name,
        version=version,
        inference_count=stats.rows,
        execution_count=stats.batches,
        inference_stats=pb.InferStatistics(),
    )
    counters = metrics.models.get((name, version))
    unversioned = metrics.models.get((name, ""))  # calls that failed before a version was chosen
    inference = result.inference_stats
    if counters is not None:
        inference.success.count = counters.requests["OK"]
        inference.success.ns = _ns(counters.latency["total"].total)
        queue, compute = counters.latency["queue"], counters.latency["compute"]
        inference.queue.count, inference.queue.ns = sum(queue.counts), _ns(queue.total)
        computed = sum(compute.counts)
        inference.compute_infer.count, inference.compute_infer.ns = computed, _ns(compute.total)
        inference.compute_input.count = inference.compute_output.count = computed
    inference.fail.count = sum(
        count
        for found in (counters, unversioned)
        if found is not None
        for status, count in found.requests.items()
        if status != "OK"
    )
    for size, count in sorted(stats.sizes.items()):
        batch = result.batch_stats.add(batch_size=size)
        batch.compute_input.count = batch.compute_infer.count = count
        batch.compute_output.count = count
    return result


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def index_entry(entry: ModelEntry) -> pb.RepositoryIndexResponse.ModelIndex:
    """One model in Triton's terms: READY, LOADING, or UNAVAILABLE with the reason."""
    serving = entry.serving
    if entry.state is ModelState.READY or entry.state is ModelState.LOADING:
        state, reason = entry.state.value, entry.reason
    elif entry.state is ModelState.UNLOADED:
        state, reason = "UNAVAILABLE", entry.reason or "unloaded"
    else:
        state, reason = "UNAVAILABLE", entry.reason
    return pb.RepositoryIndexResponse.ModelIndex(
        name=entry.name, version=serving.version if serving else "", state=state, reason=reason
    )


# -- the servicer --------------------------------------------------------------


def stream_error(message: pb.ModelInferRequest, error: Exception) -> pb.ModelStreamInferResponse:
    """A failed stream message's answer: its error message, and its id in ``infer_response``.

    V2 streams carry only a message; the code rides along as a parameter (clients that
    do not know it ignore it)."""
    code, text = status_for(error, message.id)
    answer = pb.ModelStreamInferResponse(
        error_message=text,
        infer_response=pb.ModelInferResponse(
            model_name=message.model_name, model_version=message.model_version, id=message.id
        ),
    )
    answer.infer_response.parameters[STREAM_STATUS_PARAMETER].string_param = code.name
    return answer


class GRPCInferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def _respond(
        self, message: pb.ModelInferRequest, time_remaining: float | None
    ) -> pb.ModelInferResponse:
        return encode_response(await self.dataplane.infer(self._request(message, time_remaining)))

    def _request(
        self, message: pb.ModelInferRequest, time_remaining: float | None
    ) -> InferenceRequest:
        """The data plane's request for ``message``, decoded against the serving version."""
        loaded = self.dataplane.serving(message.model_name, message.model_version)
        return decode_request(message, loaded.config, time_remaining)

    # -- health and metadata -----------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        # Calls are accepted only after the repository was loaded; once a
        # graceful stop begins the server is live but no longer ready.
        return pb.ServerReadyResponse(ready=not self.dataplane.draining)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        try:
            self.dataplane.serving(request.name, request.version)
        except EdgeInferError:  # unknown, not serving, wrong version, invalid name
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="edgeinferd", version=edgeinferd.__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        return model_metadata(self.dataplane.serving(request.name, request.version))

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        loaded = self.dataplane.serving(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(loaded))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            loaded = [self.dataplane.serving(request.name, request.version)]
        else:
            entries = self.dataplane.list_models()
            loaded = [e.serving for e in entries if e.serving is not None]
        return pb.ModelStatisticsResponse(
            model_stats=[model_statistics(v, self.dataplane.metrics) for v in loaded]
        )

    # -- inference -------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        return await self._respond(request, context.time_remaining())

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answer in request order while up to STREAM_PIPELINE_DEPTH requests run at once.

        Each message is decoded and queued as it arrives and answered in order, with no
        task per message (``protocol.streams.answer_inferences``, as for edgeinfer.v1).
        A failed request is answered with its error message (and its id in
        ``infer_response``); the stream stays open for the next one.
        """

        def decode(message: pb.ModelInferRequest) -> InferenceRequest:
            return self._request(message, context.time_remaining())

        def answer(
            message: pb.ModelInferRequest, result: InferenceResponse
        ) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(infer_response=encode_response(result))

        replies = answer_inferences(
            request_iterator,
            self.dataplane,
            connection_of(context.peer()),
            decode,
            answer,
            stream_error,
            size=lambda message: message.ByteSize(),
        )
        async with contextlib.aclosing(replies):
            async for reply in replies:
                yield reply

    # -- model repository ----------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        entries = self.dataplane.list_models()
        if request.ready:
            entries = [e for e in entries if e.state is ModelState.READY]
        return pb.RepositoryIndexResponse(models=[index_entry(e) for e in entries])

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        for key in request.parameters:
            if key in LOAD_OVERRIDE_PARAMETERS or key.startswith("file:"):
                raise InvalidInput(
                    f"load parameter {key!r} is not supported: edgeinferd loads what is in"
                    " the model repository (its config.toml and version folders) only"
                )
        await self.dataplane.load_model(
            request.model_name, caller_of(context, self.dataplane.peers)
        )
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.dataplane.unload_model(
            request.model_name, caller_of(context, self.dataplane.peers)
        )
        return pb.RepositoryModelUnloadResponse()

    # -- not served ----------------------------------------------------------------

    async def SystemSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        await _unimplemented(context, "system shared memory")

    async def SystemSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        await _unimplemented(context, "system shared memory")

    async def SystemSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        await _unimplemented(context, "system shared memory")

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        await _unimplemented(context, "CUDA shared memory")

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        await _unimplemented(context, "CUDA shared memory")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        await _unimplemented(context, "CUDA shared memory")

    async def TraceSetting(self, request: Any, context: Context) -> Any:
        await _unimplemented(context, "trace settings")

    async def LogSettings(self, request: Any, context: Context) -> Any:
        await _unimplemented(context, "log settings")


def add_to_server(server: grpc.aio.Server, dataplane: DataPlane) -> None:
    """Serve ``inference.GRPCInferenceService`` over ``dataplane`` on ``server``."""
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        GRPCInferenceServicer(dataplane), server
    )


async def _unimplemented(context: Context, feature: str) -> Never:
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        f"edgeinferd does not implement {feature}; see docs/kserve.md for what it serves",
    )


__all__ = [
    "SERVICE_NAME",
    "V2_DTYPES",
    "GRPCInferenceServicer",
    "add_to_server",
    "decode_request",
    "encode_response",
    "model_metadata",
]
