"""Blocking and asyncio clients for edgeinferd.

Both speak the same protocol through the same conversion helpers; each
method is a thin wrapper: numpy in, protobuf over gRPC, numpy out. Every
failure raises ``EdgeInferError`` carrying the gRPC status code and message.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import grpc
import grpc.aio
import numpy as np

from edgeinfer.shm import SharedMemoryRegion
from edgeinfer.tensors import DTYPE_NAMES, from_proto, to_proto
from edgeinfer.v1 import health_pb2, inference_pb2, inference_pb2_grpc

DEFAULT_ADDRESS = "unix:///run/edgeinfer/edgeinfer.sock"
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_STATE_NAMES = {v: k for k, v in inference_pb2.ModelState.items()}

Inputs = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]


class EdgeInferError(Exception):
    """A call failed; ``code`` is the gRPC status, ``message`` the daemon's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = "") -> None:
        self.code = code
        self.message = message
        self.request_id = request_id
        super().__init__(f"{code.name}: {message}")

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> EdgeInferError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code, details or "")

    @classmethod
    def from_stream(cls, error: inference_pb2.Error, request_id: str) -> EdgeInferError:
        code = next(
            (c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN
        )
        return cls(code, error.message, request_id)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    #: -1 marks a variable dimension (the batch, for batched models).
    shape: tuple[int, ...]


@dataclass(frozen=True)
class VersionInfo:
    version: str
    state: str
    format: str
    size_bytes: int
    manifest: dict[str, Any]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    state: str
    reason: str
    serving_version: str
    versions: list[VersionInfo]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    max_batch_size: int
    generative: bool

    @classmethod
    def from_proto(cls, info: inference_pb2.ModelInfo) -> ModelInfo:
        from google.protobuf.json_format import MessageToDict

        def specs(items: Iterable[Any]) -> list[TensorInfo]:
            return [
                TensorInfo(s.name, DTYPE_NAMES.get(s.dtype, "?"), tuple(s.shape)) for s in items
            ]

        return cls(
            name=info.name,
            state=_STATE_NAMES.get(info.state, "UNKNOWN"),
            reason=info.reason,
            serving_version=info.serving_version,
            versions=[
                VersionInfo(
                    v.version,
                    _STATE_NAMES.get(v.state, "UNKNOWN"),
                    v.format,
                    v.size_bytes,
                    MessageToDict(v.manifest),
                )
                for v in info.versions
            ],
            inputs=specs(info.inputs),
            outputs=specs(info.outputs),
            max_batch_size=info.max_batch_size,
            generative=info.generative,
        )


@dataclass(frozen=True)
class ModelStats:
    model: str
    version: str
    state: str
    requests_by_status: dict[str, int]
    batches: int
    batched_rows: int
    queued: int
    in_flight: int
    queue_seconds_sum: float
    compute_seconds_sum: float
    total_seconds_sum: float
    #: Forward passes the daemon ran on its event loop (part of ``batches``).
    inline_passes: int = 0


@dataclass(frozen=True)
class Stats:
    models: list[ModelStats]
    in_flight: int
    resident_memory_bytes: int
    uptime_seconds: float

    @classmethod
    def from_proto(cls, stats: inference_pb2.Stats) -> Stats:
        return cls(
            models=[
                ModelStats(
                    model=m.model,
                    version=m.version,
                    state=_STATE_NAMES.get(m.state, "UNKNOWN"),
                    requests_by_status=dict(m.requests_by_status),
                    batches=m.batches,
                    batched_rows=m.batched_rows,
                    queued=m.queued,
                    in_flight=m.in_flight,
                    queue_seconds_sum=m.queue_seconds_sum,
                    compute_seconds_sum=m.compute_seconds_sum,
                    total_seconds_sum=m.total_seconds_sum,
                    inline_passes=m.inline_passes,
                )
                for m in stats.models
            ],
            in_flight=stats.in_flight,
            resident_memory_bytes=stats.resident_memory_bytes,
            uptime_seconds=stats.uptime_seconds,
        )


@dataclass(frozen=True)
class StreamResult:
    """One answer on a stream: outputs, or the error for that message alone."""

    id: str
    outputs: Outputs | None = None
    error: EdgeInferError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class GenerateChunk:
    """Newly generated tokens and the text they decode to.

    The text may lag the ids by a few characters: text that could begin a stop
    sequence, or an incomplete UTF-8 character, is held until it is settled.
    """

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class GenerateSummary:
    """The last message of a generation."""

    #: "LENGTH" (max_new_tokens reached), "STOP" (the model's end-of-sequence token
    #: or a stop sequence), "CONTEXT" (the context is full) or "CANCELLED" (the
    #: daemon stopped it: model unloaded, daemon shutting down).
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    tokens_per_second: float


GenerateEvent = GenerateChunk | GenerateSummary


@dataclass(frozen=True)
class GenerateResult:
    """A whole generation, collected."""

    text: str
    token_ids: list[int]
    summary: GenerateSummary


def collect_generation(events: Iterable[GenerateEvent]) -> GenerateResult:
    """Join a generation's chunks; the stream must end with its summary."""
    texts: list[str] = []
    ids: list[int] = []
    for event in events:
        if isinstance(event, GenerateSummary):
            return GenerateResult("".join(texts), ids, event)
        texts.append(event.text)
        ids.extend(event.token_ids)
    raise EdgeInferError(grpc.StatusCode.UNKNOWN, "the generation ended without a summary")


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation: ``role`` is "system", "user" or "assistant"."""

    role: str
    content: str


#: Text, token ids of the model's vocabulary, or a conversation (rendered by the
#: model's own chat template on the daemon).
Prompt = str | Iterable[int] | Sequence[ChatMessage]


class GenerateOptions(TypedDict, total=False):
    """Keyword options of every generate and chat method.

    ``temperature`` 0 (the default) is greedy; ``top_k`` 0, ``top_p`` 1,
    ``min_p`` 0 and ``repetition_penalty`` 1 are off; ``seed`` makes sampling
    reproducible; the text stops before any of ``stop``.
    """

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float | None
    min_p: float
    repetition_penalty: float | None
    seed: int | None
    stop: Iterable[str]
    version: str
    request_id: str
    timeout: float | None


def build_generate_request(
    model: str, prompt: Prompt, **options: Unpack[GenerateOptions]
) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        model=model,
        version=options.get("version", ""),
        id=options.get("request_id", ""),
        max_new_tokens=options.get("max_new_tokens", 64),
        temperature=options.get("temperature", 0.0),
        top_k=options.get("top_k", 0),
        min_p=options.get("min_p", 0.0),
        stop=list(options.get("stop", ())),
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        items = list(prompt)
        if items and isinstance(items[0], ChatMessage):
            request.messages.messages.extend(
                inference_pb2.ChatMessage(role=m.role, content=m.content)
                for m in items
                if isinstance(m, ChatMessage)
            )
        else:
            request.tokens.ids.extend(i for i in items if isinstance(i, int))
    for name in ("top_p", "repetition_penalty", "seed"):
        value = options.get(name)
        if value is not None:
            setattr(request, name, value)
    return request


def decode_generate_event(message: inference_pb2.GenerateResponse) -> GenerateEvent:
    if message.HasField("summary"):
        summary = message.summary
        return GenerateSummary(
            finish_reason=inference_pb2.FinishReason.Name(summary.finish_reason),
            prompt_tokens=summary.prompt_tokens,
            generated_tokens=summary.generated_tokens,
            time_to_first_token_s=summary.time_to_first_token_s,
            tokens_per_second=summary.tokens_per_second,
        )
    return GenerateChunk(tuple(message.chunk.token_ids), message.chunk.text)


@dataclass(frozen=True)
class TlsOptions:
    """PEM bytes: the CA that signed the daemon's cert; a client cert+key for mutual TLS."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    #: Name to check the server certificate against (when not the address's host).
    server_name: str | None = None


def normalize_address(address: str) -> str:
    """Accept ``unix:///abs``, ``unix:rel.sock``, ``host:port`` and bare paths."""
    if address.startswith(("/", "./", "../")):
        return f"unix:{address}"
    return address


#: Metadata that carries the token standing for this process's uid (see peer_token).
PEER_TOKEN_METADATA = "edgeinfer-peer-token"
#: The daemon's credentials socket sits next to its gRPC socket, with this suffix.
CREDENTIALS_SUFFIX = ".cred"


def credentials_socket(address: str) -> str | None:
    """The daemon's credentials socket for a ``unix:`` address (None for TCP)."""
    address = normalize_address(address)
    if not address.startswith("unix:"):
        return None
    path = address[len("unix:") :]
    if path.startswith("//"):
        path = path[2:]
    return path + CREDENTIALS_SUFFIX


def _parse_token(reply: bytes, where: str) -> str:
    token = reply.decode("ascii", "replace").strip()
    if not token:
        raise EdgeInferError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"the daemon handed out no peer token on {where}"
        )
    return token


def peer_token(address: str, timeout: float = 10.0) -> str | None:
    """Ask the daemon for the token that stands for this process's uid.

    The daemon reads the uid from the kernel (SO_PEERCRED) on its credentials
    socket; shared-memory calls carry the token so the daemon knows whose
    regions they may touch. None for a TCP address: shared memory is refused there.
    """
    path = credentials_socket(address)
    if path is None:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            reply = b""
            while chunk := sock.recv(256):
                reply += chunk
        except OSError as error:
            raise EdgeInferError(
                grpc.StatusCode.UNAVAILABLE, f"cannot reach the credentials socket {path}: {error}"
            ) from None
    return _parse_token(reply, path)


async def peer_token_async(address: str) -> str | None:
    """``peer_token`` for asyncio callers."""
    path = credentials_socket(address)
    if path is None:
        return None
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            reply = await reader.read(256)
        finally:
            writer.close()
    except OSError as error:
        raise EdgeInferError(
            grpc.StatusCode.UNAVAILABLE, f"cannot reach the credentials socket {path}: {error}"
        ) from None
    return _parse_token(reply, path)


def _token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else ((PEER_TOKEN_METADATA, token),)


def _register_request(region: SharedMemoryRegion) -> inference_pb2.RegisterSharedMemoryRequest:
    return inference_pb2.RegisterSharedMemoryRequest(
        name=region.name, key=region.key, offset=0, byte_size=region.byte_size
    )


def _region_names(response: inference_pb2.ListSharedMemoryResponse) -> list[str]:
    return [r.name for r in response.regions]


def _channel_options(max_message_bytes: int, tls: TlsOptions | None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def _credentials(tls: TlsOptions) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )


def build_request(
    model: str,
    inputs: Inputs,
    version: str = "",
    request_id: str = "",
    outputs: Iterable[str] = (),
) -> inference_pb2.PredictRequest:
    request = inference_pb2.PredictRequest(model=model, version=version, id=request_id)
    for name, array in inputs.items():
        to_proto(name, array, request.inputs.add())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def decode_outputs(
    response: inference_pb2.PredictResponse, region: SharedMemoryRegion | None = None
) -> Outputs:
    return {
        tensor.name: region.read(tensor)
        if region is not None and tensor.HasField("shared_memory")
        else from_proto(tensor)
        for tensor in response.outputs
    }


def build_shm_request(
    model: str,
    inputs: Inputs,
    region: SharedMemoryRegion,
    version: str = "",
    request_id: str = "",
    outputs: Iterable[str] = (),
    outputs_in_shared_memory: bool = False,
) -> inference_pb2.PredictRequest:
    """Inputs go into ``region``; named outputs may come back in the space after them."""
    if not region.registered:
        raise ValueError(f"register shared-memory region {region.name!r} with the daemon first")
    request = inference_pb2.PredictRequest(model=model, version=version, id=request_id)
    used = region.write_inputs(dict(inputs), request)
    names = list(outputs)
    if outputs_in_shared_memory and not names:
        raise ValueError("name the outputs to receive in shared memory")
    share = ((region.byte_size - used) // max(len(names), 1)) // 64 * 64
    for index, name in enumerate(names):
        wanted = request.outputs.add(name=name)
        if outputs_in_shared_memory:
            wanted.shared_memory.region = region.name
            wanted.shared_memory.offset = used + index * share
            wanted.shared_memory.byte_size = share
    return request


def decode_stream_result(message: inference_pb2.PredictStreamResponse) -> StreamResult:
    if message.HasField("error"):
        return StreamResult(message.id, error=EdgeInferError.from_stream(message.error, message.id))
    return StreamResult(message.id, outputs=decode_outputs(message.response))


def _health_request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def _health_name(response: health_pb2.HealthCheckResponse) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class Client:
    """Blocking client. One channel, reused for every call; close() or use ``with``."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        tls: TlsOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.address = normalize_address(address)
        self.timeout = timeout
        options = _channel_options(max_message_bytes, tls)
        if tls is None:
            self._channel = grpc.insecure_channel(self.address, options=options)
        else:
            self._channel = grpc.secure_channel(self.address, _credentials(tls), options=options)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._health = self._channel.unary_unary(
            _HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        self._ids = itertools.count(1)
        self._shm_lock = threading.Lock()
        self._token: str | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None, metadata: Any = None) -> Any:
        try:
            return method(
                request,
                timeout=timeout if timeout is not None else self.timeout,
                metadata=metadata,
            )
        except grpc.RpcError as error:
            raise EdgeInferError.from_rpc(error) from None

    def _shm_metadata(self) -> tuple[tuple[str, str], ...]:
        """The peer-token metadata of shared-memory calls (fetched once per client)."""
        if self._token is None:
            self._token = peer_token(self.address)
        return _token_metadata(self._token)

    def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: str = "",
        outputs: Iterable[str] = (),
        request_id: str = "",
        timeout: float | None = None,
        shared_memory: SharedMemoryRegion | None = None,
        outputs_in_shared_memory: bool = False,
    ) -> Outputs:
        """Run one request; returns the outputs by name.

        With ``shared_memory`` (a registered region), the inputs travel through
        it instead of the message; with ``outputs_in_shared_memory`` too, the
        named outputs come back through it.
        """
        if shared_memory is None:
            request = build_request(model, inputs, version, request_id, outputs)
            return decode_outputs(self._call(self._stub.Predict, request, timeout))
        with self._shm_lock:  # one call at a time may use a region's bytes
            request = build_shm_request(
                model, inputs, shared_memory, version, request_id, outputs, outputs_in_shared_memory
            )
            metadata = self._shm_metadata()
            response = self._call(self._stub.Predict, request, timeout, metadata)
            return decode_outputs(response, shared_memory)

    def register_shared_memory(self, region: SharedMemoryRegion) -> None:
        """Let the daemon use ``region`` (same device, Unix socket, an object this user owns)."""
        metadata = self._shm_metadata()
        self._call(self._stub.RegisterSharedMemory, _register_request(region), None, metadata)
        region.registered = True

    def unregister_shared_memory(self, region: SharedMemoryRegion) -> None:
        """Ask the daemon to forget ``region``."""
        request = inference_pb2.UnregisterSharedMemoryRequest(name=region.name)
        self._call(self._stub.UnregisterSharedMemory, request, None, self._shm_metadata())
        region.registered = False

    def list_shared_memory(self) -> list[str]:
        """Names of the regions this user has registered (nobody sees another user's)."""
        request = inference_pb2.ListSharedMemoryRequest()
        return _region_names(
            self._call(self._stub.ListSharedMemory, request, None, self._shm_metadata())
        )

    def stream(
        self,
        model: str,
        batches: Iterable[Inputs],
        *,
        version: str = "",
        timeout: float | None = None,
    ) -> Iterator[StreamResult]:
        """Send each batch over one stream; yields results in the same order.

        A bad batch yields a result whose ``error`` is set; the stream goes on.
        """
        ids = (str(next(self._ids)) for _ in itertools.repeat(None))
        requests = (build_request(model, b, version, next(ids)) for b in batches)
        try:
            for message in self._stub.PredictStream(
                requests, timeout=timeout if timeout is not None else self.timeout
            ):
                yield decode_stream_result(message)
        except grpc.RpcError as error:
            raise EdgeInferError.from_rpc(error) from None

    def generate(
        self, model: str, prompt: Prompt, **options: Unpack[GenerateOptions]
    ) -> Generator[GenerateEvent, None, None]:
        """Stream a generation: chunks as tokens are made, then one GenerateSummary.

        Leaving the loop early cancels the call, which stops the generation on
        the daemon and frees its slot. See ``GenerateOptions`` for the options.
        """
        timeout = options.get("timeout")
        call = self._stub.Generate(
            build_generate_request(model, prompt, **options),
            timeout=timeout if timeout is not None else self.timeout,
        )
        try:
            for message in call:
                yield decode_generate_event(message)
        except grpc.RpcError as error:
            raise EdgeInferError.from_rpc(error) from None
        finally:
            call.cancel()

    def generate_text(
        self, model: str, prompt: Prompt, **options: Unpack[GenerateOptions]
    ) -> GenerateResult:
        """The whole generation at once (same options as ``generate``)."""
        return collect_generation(self.generate(model, prompt, **options))

    def chat(
        self, model: str, messages: Sequence[ChatMessage], **options: Unpack[GenerateOptions]
    ) -> Generator[GenerateEvent, None, None]:
        """Stream the assistant's answer to a conversation (the model's chat template)."""
        return self.generate(model, messages, **options)

    def chat_text(
        self, model: str, messages: Sequence[ChatMessage], **options: Unpack[GenerateOptions]
    ) -> GenerateResult:
        """The assistant's whole answer at once."""
        return collect_generation(self.generate(model, messages, **options))

    def list_models(self) -> list[ModelInfo]:
        response = self._call(self._stub.ListModels, inference_pb2.ListModelsRequest(), None)
        return [ModelInfo.from_proto(m) for m in response.models]

    def get_model(self, name: str) -> ModelInfo:
        request = inference_pb2.GetModelRequest(name=name)
        return ModelInfo.from_proto(self._call(self._stub.GetModel, request, None))

    def load_model(self, name: str, timeout: float | None = None) -> ModelInfo:
        request = inference_pb2.LoadModelRequest(name=name)
        return ModelInfo.from_proto(self._call(self._stub.LoadModel, request, timeout))

    def unload_model(self, name: str, timeout: float | None = None) -> ModelInfo:
        request = inference_pb2.UnloadModelRequest(name=name)
        return ModelInfo.from_proto(self._call(self._stub.UnloadModel, request, timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """'SERVING', 'NOT_SERVING', ... for the daemon ("") or one model by name."""
        return _health_name(self._call(self._health, _health_request(service), timeout))

    def get_stats(self) -> Stats:
        """Requests by status, latency sums and batch counts per model version."""
        return Stats.from_proto(
            self._call(self._stub.GetStats, inference_pb2.GetStatsRequest(), None)
        )


class AsyncClient:
    """asyncio client; create it inside a running event loop and ``await close()``."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        tls: TlsOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.address = normalize_address(address)
        self.timeout = timeout
        options = _channel_options(max_message_bytes, tls)
        if tls is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(
                self.address, _credentials(tls), options=options
            )
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._health = self._channel.unary_unary(
            _HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        self._ids = itertools.count(1)
        self._shm_lock = asyncio.Lock()
        self._token: str | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(
        self, method: Any, request: Any, timeout: float | None, metadata: Any = None
    ) -> Any:
        try:
            return await method(
                request,
                timeout=timeout if timeout is not None else self.timeout,
                metadata=metadata,
            )
        except grpc.RpcError as error:
            raise EdgeInferError.from_rpc(error) from None

    async def _shm_metadata(self) -> tuple[tuple[str, str], ...]:
        """The peer-token metadata of shared-memory calls (fetched once per client)."""
        if self._token is None:
            self._token = await peer_token_async(self.address)
        return _token_metadata(self._token)

    async def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: str = "",
        outputs: Iterable[str] = (),
        request_id: str = "",
        timeout: float | None = None,
        shared_memory: SharedMemoryRegion | None = None,
        outputs_in_shared_memory: bool = False,
    ) -> Outputs:
        """Run one request; shared memory works as in ``Client.predict``."""
        if shared_memory is None:
            request = build_request(model, inputs, version, request_id, outputs)
            return decode_outputs(await self._call(self._stub.Predict, request, timeout))
        metadata = await self._shm_metadata()
        async with self._shm_lock:  # one call at a time may use a region's bytes
            request = build_shm_request(
                model, inputs, shared_memory, version, request_id, outputs, outputs_in_shared_memory
            )
            response = await self._call(self._stub.Predict, request, timeout, metadata)
            return decode_outputs(response, shared_memory)

    async def register_shared_memory(self, region: SharedMemoryRegion) -> None:
        """Let the daemon use ``region`` (same device, Unix socket, an object this user owns)."""
        metadata = await self._shm_metadata()
        await self._call(self._stub.RegisterSharedMemory, _register_request(region), None, metadata)
        region.registered = True

    async def unregister_shared_memory(self, region: SharedMemoryRegion) -> None:
        """Ask the daemon to forget ``region``."""
        request = inference_pb2.UnregisterSharedMemoryRequest(name=region.name)
        metadata = await self._shm_metadata()
        await self._call(self._stub.UnregisterSharedMemory, request, None, metadata)
        region.registered = False

    async def list_shared_memory(self) -> list[str]:
        """Names of the regions this user has registered (nobody sees another user's)."""
        request = inference_pb2.ListSharedMemoryRequest()
        metadata = await self._shm_metadata()
        return _region_names(await self._call(self._stub.ListSharedMemory, request, None, metadata))

    async def stream(
        self,
        model: str,
        batches: AsyncIterable[Inputs] | Iterable[Inputs],
        *,
        version: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        """Send each batch over one stream; yields results in the same order."""

        async def requests() -> AsyncIterator[inference_pb2.PredictRequest]:
            if isinstance(batches, AsyncIterable):
                async for batch in batches:
                    yield build_request(model, batch, version, str(next(self._ids)))
            else:
                for batch in batches:
                    yield build_request(model, batch, version, str(next(self._ids)))

        call = self._stub.PredictStream(
            requests(), timeout=timeout if timeout is not None else self.timeout
        )
        try:
            async for message in call:
                yield decode_stream_result(message)
        except grpc.RpcError as error:
            raise EdgeInferError.from_rpc(error) from None
        finally:
            call.cancel()

    async def generate(
        self, model: str, prompt: Prompt, **options: Unpack[GenerateOptions]
    ) -> AsyncGenerator[GenerateEvent, None]:
        """Stream a generation (see ``Client.generate``); leaving early cancels it."""
        timeout = options.get("timeout")
        call = self._stub.Generate(
            build_generate_request(model, prompt, **options),
            timeout=timeout if timeout is not None else self.timeout,
        )
        try:
            async for message in call:
                yield decode_generate_event(message)
        except grpc.RpcError as error:
            raise EdgeInferError.from_rpc(error) from None
        finally:
            call.cancel()

    async def generate_text(
        self, model: str, prompt: Prompt, **options: Unpack[GenerateOptions]
    ) -> GenerateResult:
        """The whole generation at once (same options as ``generate``)."""
        texts: list[str] = []
        ids: list[int] = []
        async for event in self.generate(model, prompt, **options):
            if isinstance(event, GenerateSummary):
                return GenerateResult("".join(texts), ids, event)
            texts.append(event.text)
            ids.extend(event.token_ids)
        raise EdgeInferError(grpc.StatusCode.UNKNOWN, "the generation ended without a summary")

    def chat(
        self, model: str, messages: Sequence[ChatMessage], **options: Unpack[GenerateOptions]
    ) -> AsyncGenerator[GenerateEvent, None]:
        """Stream the assistant's answer to a conversation (the model's chat template)."""
        return self.generate(model, messages, **options)

    async def chat_text(
        self, model: str, messages: Sequence[ChatMessage], **options: Unpack[GenerateOptions]
    ) -> GenerateResult:
        """The assistant's whole answer at once."""
        return await self.generate_text(model, messages, **options)

    async def list_models(self) -> list[ModelInfo]:
        response = await self._call(self._stub.ListModels, inference_pb2.ListModelsRequest(), None)
        return [ModelInfo.from_proto(m) for m in response.models]

    async def get_model(self, name: str) -> ModelInfo:
        request = inference_pb2.GetModelRequest(name=name)
        return ModelInfo.from_proto(await self._call(self._stub.GetModel, request, None))

    async def load_model(self, name: str, timeout: float | None = None) -> ModelInfo:
        request = inference_pb2.LoadModelRequest(name=name)
        return ModelInfo.from_proto(await self._call(self._stub.LoadModel, request, timeout))

    async def unload_model(self, name: str, timeout: float | None = None) -> ModelInfo:
        request = inference_pb2.UnloadModelRequest(name=name)
        return ModelInfo.from_proto(await self._call(self._stub.UnloadModel, request, timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        return _health_name(await self._call(self._health, _health_request(service), timeout))

    async def get_stats(self) -> Stats:
        request = inference_pb2.GetStatsRequest()
        return Stats.from_proto(await self._call(self._stub.GetStats, request, None))
