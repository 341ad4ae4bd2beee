"""Hostile input: thousands of generated requests to both APIs get precise status codes.

Each request starts as a valid call to a served model and then gets up to
three generated mistakes (wrong dtype, shape, byte length, names, models,
versions, enormous or negative dims, ...), or its serialized bytes are broken
by hand (invalid UTF-8 in string fields, truncation, garbage). Every mistake
has one status code it may cause; a reply must carry the code of one of the
mistakes made (OK when none), so client mistakes are never INTERNAL or UNKNOWN.

The V2 requests use tritonclient's ``service_pb2`` over a plain channel: this
process must not import ``edgeinfer.kserve`` (both register ``inference.*``).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from edgeinfer.tensors import MAX_DIMS
from edgeinfer.v1 import inference_pb2 as pb
from edgeinfer.v1 import tensor_pb2
from tests.conftest import Daemon
from tests.reliability_helpers import (
    MODEL_INFER,
    MODEL_STREAM_INFER,
    PREDICT,
    PREDICT_STREAM,
    code_of,
    figure,
    health_status,
    raw_stream,
    raw_unary,
    rss_kib,
)

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
INTERNAL = grpc.StatusCode.INTERNAL
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED

#: Requests per hypothesis example, sent at once on one channel (so they batch together).
BATCH = 20
#: Growth of the daemon's resident memory allowed over one property test.
RSS_BOUND_KIB = 64 * 1024
EXAMPLES = 50

FLOAT32, INT64 = tensor_pb2.FLOAT32, tensor_pb2.INT64
NUMPY = {tensor_pb2.FLOAT32: np.float32, tensor_pb2.INT64: np.int64}
V2_NAMES = {tensor_pb2.FLOAT32: "FP32", tensor_pb2.INT64: "INT64"}


@dataclass(frozen=True)
class Spec:
    """What the session daemon's models take (see tests/models.py)."""

    inputs: tuple[tuple[str, int, tuple[int, ...]], ...]
    outputs: tuple[str, ...]
    max_batch: int


SPECS = {
    "mlp": Spec((("x", FLOAT32, (16,)),), ("y",), 32),
    "adder": Spec((("a", INT64, (-1,)), ("b", INT64, (-1,))), ("sum", "product"), 0),
    "picky": Spec((("x", FLOAT32, (2,)),), ("y",), 8),
}
FAILED_MODELS = ["corrupt", "pickled", "tampered"]
INVALID_NAMES = [
    "",
    "..",
    "../mlp",
    "mlp/../mlp",
    "/etc/passwd",
    ".hidden",
    "-mlp",
    "mlp\x00",
    "mödel",
    "m" * 129,
    "m" * 20000,
]
INT64_MAX = 2**63 - 1
BIG_DIMS = [[10**6, 10**6], [2**62, 4], [INT64_MAX], [2**31] * 4, [10**12]]


@dataclass
class Case:
    """One request: its bytes, the codes its mistakes allow, and what was done to it."""

    model: str
    payload: bytes = b""
    allowed: set[grpc.StatusCode] = field(default_factory=set)
    kinds: list[str] = field(default_factory=list)
    #: The model raises on this request (picky with a negative input): INTERNAL is its answer.
    model_raises: bool = False

    def note(self, kind: str, code: grpc.StatusCode | None = None) -> None:
        self.kinds.append(kind)
        if code is not None:
            self.allowed.add(code)


# -- generated tensors -----------------------------------------------------------


def values(draw: st.DrawFn, dtype: int, count: int, model: str) -> np.ndarray:
    kind = draw(st.sampled_from(["zeros", "random", "nan", "inf", "mixed"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype == INT64:
        return rng.integers(-(2**40), 2**40, size=count, dtype=np.int64)
    array = np.zeros(count, np.float32) if kind == "zeros" else rng.random(count, np.float32)
    if kind == "nan":
        array[:] = np.nan
    elif kind == "inf":
        array[:] = np.inf
    elif kind == "mixed" and count:
        array[rng.integers(0, count, size=max(1, count // 3))] = np.float32(np.nan)
        array[0] = np.inf
    return array


@dataclass
class Tensor:
    name: str
    dtype: int
    shape: list[int]
    data: bytes
    shm_region: str = ""


def base_tensors(draw: st.DrawFn, model: str) -> list[Tensor]:
    spec = SPECS[model]
    rows = draw(st.integers(1, 4))
    length = draw(st.integers(1, 6))
    tensors = []
    for name, dtype, shape in spec.inputs:
        full = [rows, *shape] if spec.max_batch else [length if d == -1 else d for d in shape]
        array = values(draw, dtype, int(np.prod(full)), model)
        tensors.append(Tensor(name, dtype, full, array.astype(NUMPY[dtype]).tobytes()))
    return tensors


def zeros_for(tensor: Tensor, itemsize: int) -> bytes:
    """Zero bytes matching the tensor's shape; its old bytes if the shape is not a small one."""
    count = math.prod(tensor.shape)
    if min(tensor.shape, default=0) < 0 or count * itemsize > 1 << 16:
        return tensor.data
    return bytes(count * itemsize)


# -- mistakes, each with the code it may cause --------------------------------------

Mutation = Callable[[st.DrawFn, Case, list[Tensor], dict[str, object]], None]


def pick(draw: st.DrawFn, tensors: list[Tensor]) -> Tensor | None:
    return draw(st.sampled_from(tensors)) if tensors else None


def unknown_model(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    req["model"] = "ghost-" + draw(st.text("abcxyz019_.-", min_size=1, max_size=20))
    case.note("unknown model")


def invalid_model_name(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    req["model"] = draw(st.sampled_from(INVALID_NAMES))
    case.note("invalid or very long model name")


def failed_model(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    req["model"] = draw(st.sampled_from(FAILED_MODELS))
    case.note("model that failed to load")


def unknown_version(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    req["version"] = draw(st.sampled_from(["2", "0", "x", "../1", "9" * 30, "1" * 5000]))
    case.note("unknown version")


def wrong_dtype(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    tensor = pick(draw, tensors)
    if tensor is None:
        return
    others = [code for code in (FLOAT32, INT64, tensor_pb2.FLOAT64, tensor_pb2.UINT8)]
    tensor.dtype = draw(st.sampled_from([c for c in others if c != tensor.dtype]))
    size = np.dtype(
        {FLOAT32: "f4", INT64: "i8", tensor_pb2.FLOAT64: "f8", tensor_pb2.UINT8: "u1"}[tensor.dtype]
    ).itemsize
    tensor.data = zeros_for(tensor, size)
    case.note("wrong dtype")


def unknown_dtype(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    tensor = pick(draw, tensors)
    if tensor is not None:
        tensor.dtype = draw(st.sampled_from([0, 13, 99, 2**31 - 1]))
        case.note("unknown dtype")


def byte_length(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    tensor = pick(draw, tensors)
    if tensor is None:
        return
    delta = draw(st.integers(-len(tensor.data), 64).filter(lambda d: d != 0))
    tensor.data = tensor.data[:delta] if delta < 0 else tensor.data + bytes(delta)
    case.note("byte length that does not match")


def negative_dim(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    tensor = pick(draw, tensors)
    if tensor is not None:
        index = draw(st.integers(0, len(tensor.shape) - 1))
        tensor.shape[index] = draw(st.sampled_from([-1, -2, -(2**63)]))
        case.note("negative dimension")


def enormous_dims(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    tensor = pick(draw, tensors)
    if tensor is not None:
        tensor.shape = list(draw(st.sampled_from(BIG_DIMS)))
        case.note("enormous dimensions (10**12 elements and more)")


def too_many_dims(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    tensor = pick(draw, tensors)
    if tensor is not None:
        tensor.shape = [1] * draw(st.integers(MAX_DIMS + 1, 200))
        tensor.data = tensor.data[: np.dtype(NUMPY.get(tensor.dtype, np.uint8)).itemsize]
        case.note("too many dimensions")


def wrong_shape(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    """Same bytes, another shape: one more dimension, or a different last one."""
    tensor = pick(draw, tensors)
    if tensor is None:
        return
    count = math.prod(tensor.shape)
    itemsize = len(tensor.data) // max(count, 1) if count else 1
    if draw(st.booleans()):
        tensor.shape = [*tensor.shape, 1]
    else:
        tensor.shape = [*tensor.shape[:-1], min(tensor.shape[-1] + 1, INT64_MAX)]
        tensor.data = zeros_for(tensor, itemsize)
    case.note("wrong shape")


def zero_rows(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    """A zero first dimension: no batch for batched models, empty vectors for the adder."""
    if not tensors:
        return
    for tensor in tensors:
        tensor.shape[0] = 0
        tensor.data = b""
    case.note("zero-size dimension")


def length_mismatch(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    """Inputs whose first dimensions differ (batch rows, or the adder's equal-length rule)."""
    if len(tensors) < 2:
        if SPECS[case.model].max_batch and tensors:
            rows = SPECS[case.model].max_batch + draw(st.integers(1, 40))
            tensor = tensors[0]
            tensor.shape[0] = rows
            tensor.data = zeros_for(tensor, 4)
            case.note("more rows than max_batch_size")
        return
    tensor = tensors[0]
    tensor.shape[0] = min(tensor.shape[0] + draw(st.integers(1, 5)), INT64_MAX)
    tensor.data = zeros_for(tensor, 8)
    case.note("inputs of unequal lengths")


def empty_name(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    tensor = pick(draw, tensors)
    if tensor is not None:
        tensor.name = ""
        case.note("empty tensor name")


def duplicate_name(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    tensor = pick(draw, tensors)
    if tensor is not None:
        tensors.append(Tensor(tensor.name, tensor.dtype, list(tensor.shape), tensor.data))
        case.note("duplicate tensor name")


def unknown_input(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    name = draw(st.sampled_from(["z", "X", "x ", "y", "n" * 20000]))
    tensors.append(Tensor(name, FLOAT32, [1], bytes(4)))
    case.note("unknown or very long input name")


def missing_input(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    names = sorted({t.name for t in tensors} & {name for name, _, _ in SPECS[case.model].inputs})
    if names:
        name = draw(st.sampled_from(names))
        tensors[:] = [t for t in tensors if t.name != name]
        case.note("missing input")


def unknown_output(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    req["outputs"] = [draw(st.sampled_from(["nope", "Y", "o" * 20000, ""]))]
    case.note("unknown output")


def shm_region(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    tensor = pick(draw, tensors)
    if tensor is not None:
        tensor.shm_region = draw(st.sampled_from(["nope", "r" * 300]))
        case.note("shared-memory region without a peer token")


def odd_id(draw: st.DrawFn, case: Case, tensors: list[Tensor], req: dict) -> None:
    req["id"] = draw(st.sampled_from(["", "é" * 1000, "\x00", "i" * 20000]))
    case.note("odd request id (not a mistake)")


MUTATIONS: list[Mutation] = [
    unknown_model,
    invalid_model_name,
    failed_model,
    unknown_version,
    wrong_dtype,
    unknown_dtype,
    byte_length,
    negative_dim,
    enormous_dims,
    too_many_dims,
    wrong_shape,
    zero_rows,
    length_mismatch,
    empty_name,
    duplicate_name,
    unknown_input,
    missing_input,
    unknown_output,
    odd_id,
]
V1_ONLY: list[Mutation] = [shm_region]


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string_field(number: int, raw: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(raw)) + raw


NON_UTF8 = [b"\xff", b"\xc3\x28", b"mlp\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80" * 300]


def break_bytes(draw: st.DrawFn, case: Case, payload: bytes, top: int, nested: int) -> bytes:
    """Invalid UTF-8 in a string field (at the top or in an input tensor), or garbage."""
    how = draw(st.sampled_from(["top", "nested", "truncate", "garbage"]))
    bad = draw(st.sampled_from(NON_UTF8))
    if how == "top":
        case.note("invalid UTF-8 in a string field")
        case.allowed = {INVALID}
        return payload + string_field(draw(st.integers(1, top)), bad)
    if how == "nested":
        case.note("invalid UTF-8 in a tensor name")
        case.allowed = {INVALID}
        return payload + string_field(nested, string_field(1, bad))
    if how == "truncate" and len(payload) > 2:
        case.note("truncated message")
        case.allowed |= {INVALID, NOT_FOUND, UNAVAILABLE, OK}
        return payload[: draw(st.integers(1, len(payload) - 1))]
    case.note("garbage bytes")
    case.allowed |= {INVALID, NOT_FOUND, UNAVAILABLE}
    return draw(st.binary(min_size=1, max_size=300))


# -- the oracle: what the final request's mistakes allow --------------------------------

ITEMSIZE = {
    FLOAT32: 4,
    INT64: 8,
    tensor_pb2.FLOAT64: 8,
    tensor_pb2.UINT8: 1,
    tensor_pb2.BOOL: 1,
}
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def mistakes(request: dict, tensors: list[Tensor], intended: str) -> set[grpc.StatusCode]:
    """The documented rules, each checked on its own; the order the daemon checks is free."""
    found: set[grpc.StatusCode] = set()
    model, version = request["model"], request.get("version", "")
    if not MODEL_NAME.fullmatch(model):
        found.add(INVALID)
    elif model in FAILED_MODELS:
        found.add(UNAVAILABLE)
    elif model not in SPECS or version not in ("", "1"):
        found.add(NOT_FOUND)
    spec = SPECS[intended]
    declared = {name: (dtype, shape) for name, dtype, shape in spec.inputs}
    names = [t.name for t in tensors]
    if "" in names or len(set(names)) != len(names) or set(names) ^ set(declared):
        found.add(INVALID)  # empty, duplicate, unknown or missing names
    rows = set()
    for tensor in tensors:
        itemsize = ITEMSIZE.get(tensor.dtype)
        shape = tensor.shape
        if tensor.shm_region:
            # These calls carry no peer token: shared memory is refused before the region
            # is even looked up (the region tests are in test_shared_memory.py).
            found.add(PERMISSION_DENIED)
            continue
        if (
            itemsize is None
            or len(shape) > MAX_DIMS
            or min(shape, default=0) < 0
            or math.prod(shape) * itemsize != len(tensor.data)
        ):
            found.add(INVALID)
            continue
        if tensor.name not in declared:
            continue
        dtype, dims = declared[tensor.name]
        expected = (-1, *dims) if spec.max_batch else dims
        if tensor.dtype != dtype or len(shape) != len(expected):
            found.add(INVALID)
            continue
        if any(e not in (-1, d) for e, d in zip(expected, shape, strict=True)):
            found.add(INVALID)
        if spec.max_batch and not 1 <= shape[0] <= spec.max_batch:
            found.add(INVALID)
        rows.add(shape[0])
    if len(rows) > 1:  # batch rows differ, or the adder's a and b differ in length
        found.add(INVALID)
    if set(request.get("outputs", [])) - set(spec.outputs):
        found.add(INVALID)
    return found


# -- building requests for each API --------------------------------------------------


def int64s(shape: list[int]) -> list[int]:
    """Shapes travel as int64: mutations stacked on the extreme ones may step past its range."""
    return [max(-(2**63), min(dim, INT64_MAX)) for dim in shape]


def v1_bytes(request: dict, tensors: list[Tensor]) -> bytes:
    message = pb.PredictRequest(
        model=request["model"], version=request.get("version", ""), id=request.get("id", "")
    )
    for tensor in tensors:
        item = message.inputs.add(name=tensor.name, shape=int64s(tensor.shape), data=tensor.data)
        item.dtype = tensor.dtype  # type: ignore[assignment]  # unknown numbers on purpose
        if tensor.shm_region:
            item.shared_memory.region = tensor.shm_region
            item.shared_memory.byte_size = 4
    for name in request.get("outputs", []):
        message.outputs.add(name=name)
    return message.SerializeToString()


def v2_bytes(draw: st.DrawFn, request: dict, tensors: list[Tensor], case: Case) -> bytes:
    message = service_pb2.ModelInferRequest(
        model_name=request["model"],
        model_version=request.get("version", ""),
        id=request.get("id", ""),
    )
    typed = draw(st.booleans()) and not case.allowed and not case.model_raises
    for tensor in tensors:
        datatype = {
            FLOAT32: "FP32",
            INT64: "INT64",
            tensor_pb2.FLOAT64: "FP64",
            tensor_pb2.UINT8: "UINT8",
        }.get(tensor.dtype)
        if datatype is None:
            datatype = draw(st.sampled_from(["FP8", "", "fp32", "BYTES", "BF16", "T" * 5000]))
        item = message.inputs.add(name=tensor.name, datatype=datatype, shape=int64s(tensor.shape))
        if typed and datatype in ("FP32", "INT64"):
            array = np.frombuffer(tensor.data, NUMPY[tensor.dtype])
            target = item.contents.fp32_contents if datatype == "FP32" else None
            (target if target is not None else item.contents.int64_contents).extend(array)
        else:
            message.raw_input_contents.append(tensor.data)
    for name in request.get("outputs", []):
        message.outputs.add(name=name)
    extra = draw(st.sampled_from(["none", "none", "raw_count", "shm", "classification"]))
    if extra == "raw_count" and message.inputs and not typed:
        message.raw_input_contents.append(b"\0" * 4)
        case.note("more raw buffers than inputs", INVALID)
    elif extra == "shm" and message.inputs:
        message.inputs[0].parameters["shared_memory_region"].string_param = "nope"
        case.note("shared-memory parameter", INVALID)
    elif extra == "classification":
        output = message.outputs.add(name="y")
        output.parameters["classification"].int64_param = 3
        case.note("classification parameter", INVALID)
    return message.SerializeToString()


@st.composite
def cases(draw: st.DrawFn, api: str, breakable: bool = True) -> Case:
    model = draw(st.sampled_from(sorted(SPECS)))
    case = Case(model)
    tensors = base_tensors(draw, model)
    request: dict = {"model": model, "id": f"r{draw(st.integers(0, 10**6))}"}
    mutations = MUTATIONS + (V1_ONLY if api == "v1" else [])
    chosen = draw(st.lists(st.sampled_from(mutations), max_size=3, unique=True))
    # A zero-size tensor is valid for the adder: made first, later mistakes cannot be undone.
    chosen.sort(key=lambda mutation: mutation is not zero_rows)
    for mutation in chosen:
        mutation(draw, case, tensors, request)
    if model == "picky" and draw(st.integers(0, 9)) == 0 and tensors:
        tensor = tensors[0]
        if tensor.dtype == FLOAT32 and len(tensor.data) % 4 == 0 and tensor.data:
            tensor.data = np.full(len(tensor.data) // 4, -1, np.float32).tobytes()
            case.model_raises = True
            case.note("input the model raises on (its own failure)")
    # Only a request that passes validation reaches the model and can fail there.
    case.allowed = mistakes(request, tensors, model) or ({INTERNAL} if case.model_raises else set())
    if api == "v1":
        payload = v1_bytes(request, tensors)
        top, nested = 3, 4
    else:
        payload = v2_bytes(draw, request, tensors, case)
        top, nested = 3, 5
    if breakable and draw(st.integers(0, 7)) == 0:
        payload = break_bytes(draw, case, payload, top, nested)
    if not case.allowed:
        case.allowed = {OK}
        case.kinds.append("valid request")
    case.payload = payload
    return case


# -- the property tests ---------------------------------------------------------------


class Tally:
    """What was sent and what came back, for the printed figures."""

    def __init__(self) -> None:
        self.requests = 0
        self.codes: collections.Counter[str] = collections.Counter()
        self.kinds: collections.Counter[str] = collections.Counter()

    def add(self, case: Case, code: grpc.StatusCode) -> None:
        self.requests += 1
        self.codes[code.name] += 1
        self.kinds.update(case.kinds)


def check(case: Case, code: grpc.StatusCode, batch: list[Case]) -> None:
    allowed = set(case.allowed)
    if case.model == "picky" and any(c.model_raises and c.model == "picky" for c in batch):
        allowed.add(INTERNAL)  # a failing forward pass fails the batch it ran in
    assert code in allowed, f"{code} for {case.kinds} (allowed {allowed}): {case.payload[:200]!r}"
    assert code not in (grpc.StatusCode.UNKNOWN,)


@pytest.fixture(scope="module")
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    options = [
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ]
    with grpc.insecure_channel(daemon.address, options=options) as channel:
        yield channel


def run_property(
    daemon: Daemon, name: str, send: Callable[[list[Case], Tally], None], api: str, stream: bool
) -> None:
    """Run ``send`` on generated batches; print and bound the daemon's memory growth."""
    tally = Tally()
    pid = daemon.process.pid
    before: list[int] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(cases(api, breakable=not stream), min_size=BATCH, max_size=BATCH))
    def run(batch: list[Case]) -> None:
        send(batch, tally)
        if not before:  # after the first batch: buffers and arenas have been set up
            before.append(rss_kib(pid))

    run()
    after = rss_kib(pid)
    figure(
        name,
        requests=tally.requests,
        examples=EXAMPLES,
        codes=dict(sorted(tally.codes.items())),
        mistake_kinds=len(tally.kinds),
        rss_before_kib=before[0],
        rss_after_kib=after,
        rss_growth_kib=after - before[0],
    )
    assert tally.requests == EXAMPLES * BATCH
    assert after - before[0] < RSS_BOUND_KIB


def test_v1_unary_requests_get_precise_codes(daemon: Daemon, channel: grpc.Channel) -> None:
    """Generated Predict calls get the code of one of their mistakes; health answers after each."""
    call = raw_unary(channel, PREDICT)

    def send(batch: list[Case], tally: Tally) -> None:
        futures = [call.future(case.payload, timeout=60) for case in batch]
        for case, future in zip(batch, futures, strict=True):
            try:
                reply = pb.PredictResponse.FromString(future.result())
                code = OK
                assert reply.model == case.model
            except grpc.RpcError as error:
                code = error.code()
            check(case, code, batch)
            tally.add(case, code)
        assert health_status(channel) == "SERVING"

    run_property(daemon, "input.v1_unary", send, "v1", stream=False)


def test_v1_stream_mixing_good_and_bad_messages(daemon: Daemon, channel: grpc.Channel) -> None:
    """One PredictStream per batch answers every message in order, each with its precise code."""
    call = raw_stream(channel, PREDICT_STREAM)

    def send(batch: list[Case], tally: Tally) -> None:
        replies = list(call(iter([case.payload for case in batch]), timeout=60))
        assert len(replies) == len(batch)
        for case, raw in zip(batch, replies, strict=True):
            reply = pb.PredictStreamResponse.FromString(raw)
            code = code_of(reply.error.code) if reply.HasField("error") else OK
            check(case, code, batch)
            tally.add(case, code)
        assert health_status(channel) == "SERVING"

    run_property(daemon, "input.v1_stream", send, "v1", stream=True)


def test_v2_unary_requests_get_precise_codes(daemon: Daemon, channel: grpc.Channel) -> None:
    """Generated KServe V2 ModelInfer calls get the code of one of their mistakes."""
    call = raw_unary(channel, MODEL_INFER)

    def send(batch: list[Case], tally: Tally) -> None:
        futures = [call.future(case.payload, timeout=60) for case in batch]
        for case, future in zip(batch, futures, strict=True):
            try:
                service_pb2.ModelInferResponse.FromString(future.result())
                code = OK
            except grpc.RpcError as error:
                code = error.code()
            check(case, code, batch)
            tally.add(case, code)
        assert health_status(channel) == "SERVING"

    run_property(daemon, "input.v2_unary", send, "v2", stream=False)


def test_v2_stream_mixing_good_and_bad_messages(daemon: Daemon, channel: grpc.Channel) -> None:
    """ModelStreamInfer answers every message in order; errors exactly for the bad ones."""
    call = raw_stream(channel, MODEL_STREAM_INFER)

    def send(batch: list[Case], tally: Tally) -> None:
        replies = list(call(iter([case.payload for case in batch]), timeout=60))
        assert len(replies) == len(batch)
        for case, raw in zip(batch, replies, strict=True):
            reply = service_pb2.ModelStreamInferResponse.FromString(raw)
            # The V2 stream carries a message; the daemon's code rides along in the
            # edgeinfer_status parameter, so the code checked is the daemon's, not a guess.
            if not reply.error_message:
                code = OK
            else:
                status = reply.infer_response.parameters["edgeinfer_status"].string_param
                assert status, f"error {reply.error_message!r} without edgeinfer_status"
                code = grpc.StatusCode[status]
            check(case, code, batch)
            tally.add(case, code)
        assert health_status(channel) == "SERVING"

    run_property(daemon, "input.v2_stream", send, "v2", stream=True)


def test_stream_ending_in_undecodable_bytes_answers_the_rest_first(channel: grpc.Channel) -> None:
    """Messages before an undecodable one are answered, then the stream ends INVALID_ARGUMENT."""
    good = pb.PredictRequest(model="mlp", id="good")
    good.inputs.add(name="x", dtype=FLOAT32, shape=[1, 16], data=bytes(64))
    messages = [good.SerializeToString()] * 5 + [string_field(1, b"\xff")]
    replies: list[pb.PredictStreamResponse] = []

    def read() -> None:
        for raw in raw_stream(channel, PREDICT_STREAM)(iter(messages), timeout=30):
            replies.append(pb.PredictStreamResponse.FromString(raw))

    with pytest.raises(grpc.RpcError) as caught:
        read()
    assert caught.value.code() == INVALID
    assert [r.id for r in replies] == ["good"] * 5
    assert all(r.HasField("response") for r in replies)
