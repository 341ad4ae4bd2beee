"""Requests with more protobuf fields than the daemon parses are refused before parsing.

The first tests send hand-made wire bytes to the session's real daemon (the
``mlp`` model) over its Unix socket, through a raw gRPC channel so that no
client-side check stands in the way. The last ones call the field walk
directly (no daemon): its counting rules at the exact limit, which the
daemon's answers cannot show one by one.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from edgeinfer.v1 import inference_pb2
from edgeinferd.protocol.wire import MAX_FIELDS, WALK_ABOVE_BYTES, count_fields
from tests.conftest import Daemon
from tests.reliability_helpers import MODEL_STREAM_INFER

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
PREDICT = "/edgeinfer.v1.Inference/Predict"
REFUSED = f"more than {MAX_FIELDS} protobuf fields"


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def model_name(name: str = "mlp") -> bytes:
    return length_delimited(1, name.encode())


@pytest.fixture
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.address) as opened:
        yield opened


def call(channel: grpc.Channel, method: str, data: bytes) -> bytes:
    unary = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    answer: bytes = unary(data, timeout=60)
    return answer


def refusal(channel: grpc.Channel, method: str, data: bytes) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, method, data)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    details: str = caught.value.details()
    return details


def test_two_million_empty_input_tensors_are_refused_unparsed(channel: grpc.Channel) -> None:
    """4 MB of empty V2 input tensors, the kind protobuf parses slowest (about 50 ns a
    byte: 0.2 s here, seconds at the transport's 64 MiB)."""
    data = model_name() + length_delimited(5, b"") * 2_000_000
    details = refusal(channel, MODEL_INFER, data)
    assert REFUSED in details and "inside 'inputs'" in details, details
    assert f"{MAX_FIELDS} 'inputs', 1 'model_name'" in details, (
        details
    )  # the first {MAX_FIELDS + 1}


def test_fields_nested_inside_one_tensor_count_too(channel: grpc.Channel) -> None:
    """One V2 input tensor with 200,000 parameters: few top-level fields, the rest nested."""
    message = service_pb2.ModelInferRequest(model_name="mlp")
    tensor = message.inputs.add(name="x", datatype="FP32", shape=[1, 1000])
    for index in range(200_000):
        tensor.parameters[f"p{index}"].int64_param = index
    details = refusal(channel, MODEL_INFER, message.SerializeToString())
    assert REFUSED in details and "inside 'inputs'" in details, details
    assert "1 'inputs'" in details, details


def test_unpacked_contents_elements_count_one_each(channel: grpc.Channel) -> None:
    """100,000 booleans written one field each (legal, unpacked) inside a tensor's contents."""
    contents = b"\x08\x01" * 100_000  # bool_contents = 1, one key and value per element
    tensor = length_delimited(1, b"x") + length_delimited(5, contents)
    details = refusal(channel, MODEL_INFER, model_name() + length_delimited(5, tensor))
    assert REFUSED in details, details


def test_v1_predict_with_200000_tensors_is_refused_unparsed(channel: grpc.Channel) -> None:
    message = inference_pb2.PredictRequest(model="mlp")
    for index in range(200_000):
        message.inputs.add(name=f"x{index}")
    details = refusal(channel, PREDICT, message.SerializeToString())
    assert REFUSED in details and "inside 'inputs'" in details, details


def test_at_the_limit_the_request_is_parsed_and_judged_by_the_model(
    channel: grpc.Channel,
) -> None:
    """Exactly MAX_FIELDS fields (walked: over WALK_ABOVE_BYTES) reach the handler, whose
    own count check answers; one more field and the walk refuses it."""
    at_limit = model_name() + length_delimited(5, b"") * (MAX_FIELDS - 1)
    assert len(at_limit) > WALK_ABOVE_BYTES
    details = refusal(channel, MODEL_INFER, at_limit)
    assert f"has {MAX_FIELDS - 1} input tensors; model 'mlp' takes 1" in details, details
    details = refusal(channel, MODEL_INFER, at_limit + length_delimited(5, b""))
    assert REFUSED in details, details


def test_a_large_request_with_few_fields_is_served(channel: grpc.Channel) -> None:
    """The adder's two inputs of 100,000 int64 each (1.6 MB, walked) as raw bytes: answered."""
    a = np.arange(100_000, dtype=np.int64)
    message = service_pb2.ModelInferRequest(model_name="adder")
    for name in ("a", "b"):
        message.inputs.add(name=name, datatype="INT64", shape=[a.size])
        message.raw_input_contents.append(a.tobytes())
    data = message.SerializeToString()
    assert len(data) > WALK_ABOVE_BYTES
    answer = service_pb2.ModelInferResponse.FromString(call(channel, MODEL_INFER, data))
    sums = {
        out.name: raw for out, raw in zip(answer.outputs, answer.raw_output_contents, strict=True)
    }
    assert np.array_equal(np.frombuffer(sums["sum"], np.int64), 2 * a)


def test_on_a_stream_the_messages_before_are_answered(channel: grpc.Channel) -> None:
    """A ModelStreamInfer stream: one good message, then one over the limit."""
    good = service_pb2.ModelInferRequest(model_name="mlp", id="good")
    good.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    good.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    bad = model_name() + length_delimited(5, b"") * (MAX_FIELDS + 1)
    stream = channel.stream_stream(MODEL_STREAM_INFER, None, None)
    answers = stream(iter([good.SerializeToString(), bad]), timeout=60)
    first = service_pb2.ModelStreamInferResponse.FromString(next(answers))
    assert first.error_message == "" and first.infer_response.id == "good"
    with pytest.raises(grpc.RpcError) as caught:
        next(answers)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert REFUSED in caught.value.details()


# The walk alone (no daemon).

DESCRIPTOR = service_pb2.ModelInferRequest.DESCRIPTOR


def fields_of(count: int) -> bytes:
    """``count`` top-level fields: a model name and empty input tensors."""
    return model_name() + length_delimited(5, b"") * (count - 1)


def test_the_walk_counts_to_the_limit_exactly() -> None:
    assert count_fields(fields_of(10), DESCRIPTOR, limit=10) is None
    assert count_fields(fields_of(11), DESCRIPTOR, limit=10) is not None


def test_a_packed_repeated_field_counts_once_however_long() -> None:
    """A million packed floats inside one tensor's contents: four fields in all."""
    message = service_pb2.ModelInferRequest(model_name="mlp")
    tensor = message.inputs.add(name="x")
    tensor.contents.fp32_contents.extend(np.zeros(1_000_000, np.float32).tolist())
    data = message.SerializeToString()
    # model_name, inputs, inputs.name, inputs.contents, contents.fp32_contents
    assert count_fields(data, DESCRIPTOR, limit=5) is None
    assert count_fields(data, DESCRIPTOR, limit=4) is not None


def test_bytes_the_walk_cannot_follow_are_left_to_the_parser() -> None:
    """Groups and invalid wire types, a hundred fields' worth over a limit of ten: no
    verdict from the walk, which stops at the first; the parser refuses them."""
    assert count_fields(b"\x0b" * 100, DESCRIPTOR, limit=10) is None  # group starts
    assert count_fields(b"\x0f" * 100, DESCRIPTOR, limit=10) is None  # wire type 7
