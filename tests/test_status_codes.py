"""Every caller mistake gets a precise status code and a message naming what was wrong."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

import edgeinfer
from edgeinfer.client import build_request
from edgeinfer.v1 import inference_pb2_grpc
from tests.conftest import Daemon

X = np.zeros((1, 16), dtype=np.float32)


def call_error(
    client: edgeinfer.Client, model: str, inputs: dict[str, np.ndarray], **kw: object
) -> edgeinfer.EdgeInferError:
    with pytest.raises(edgeinfer.EdgeInferError) as caught:
        client.predict(model, inputs, **kw)  # type: ignore[arg-type]
    return caught.value


@pytest.mark.parametrize(
    ("model", "inputs", "code", "words"),
    [
        ("ghost", {"x": X}, grpc.StatusCode.NOT_FOUND, ["'ghost'", "not in the repository"]),
        (
            "mlp",
            {"x": X.astype(np.float64)},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'x'", "float64", "float32"],
        ),
        (
            "mlp",
            {"x": np.zeros((1, 15), np.float32)},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'x'", "[1, 15]", "[-1, 16]"],
        ),
        (
            "mlp",
            {"x": np.zeros(16, np.float32)},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'x'", "[16]", "[-1, 16]"],
        ),
        ("mlp", {}, grpc.StatusCode.INVALID_ARGUMENT, ["'x'", "missing", "float32[-1, 16]"]),
        ("mlp", {"x": X, "z": X}, grpc.StatusCode.INVALID_ARGUMENT, ["no input 'z'", "takes x"]),
        (
            "mlp",
            {"x": np.zeros((33, 16), np.float32)},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["batch of 33", "1 to 32"],
        ),
        (
            "mlp",
            {"x": np.zeros((0, 16), np.float32)},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["batch of 0"],
        ),
        ("corrupt", {"x": X}, grpc.StatusCode.UNAVAILABLE, ["'corrupt'", "FAILED"]),
        ("../mlp", {"x": X}, grpc.StatusCode.INVALID_ARGUMENT, ["model name", "invalid"]),
    ],
)
def test_bad_request_gets_precise_status(
    client: edgeinfer.Client,
    model: str,
    inputs: dict[str, np.ndarray],
    code: grpc.StatusCode,
    words: list[str],
) -> None:
    """Each mistake maps to its code; the message names the tensor, what came, what was expected."""
    error = call_error(client, model, inputs)
    assert error.code == code
    for word in words:
        assert word in error.message


def test_unknown_version_is_not_found(client: edgeinfer.Client) -> None:
    """A version that is not served is NOT_FOUND and names the version served."""
    error = call_error(client, "mlp", {"x": X}, version="7")
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert "'7'" in error.message and "'1'" in error.message


def test_unknown_output_is_invalid(client: edgeinfer.Client) -> None:
    """Asking for an output the model lacks is INVALID_ARGUMENT naming the outputs it has."""
    error = call_error(client, "mlp", {"x": X}, outputs=["nope"])
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'nope'" in error.message and "returns y" in error.message


def raw_predict(daemon: Daemon, request: object) -> grpc.RpcError:
    with daemon.client() as client:
        stub = inference_pb2_grpc.InferenceStub(client._channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(request, timeout=10)
    return caught.value


def test_byte_length_mismatch_is_invalid(daemon: Daemon) -> None:
    """Tensor bytes that don't match shape x dtype are refused, naming both sizes."""
    request = build_request("mlp", {"x": X})
    request.inputs[0].data = request.inputs[0].data[:-4]
    error = raw_predict(daemon, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "60 bytes" in error.details() and "needs 64" in error.details()


def test_huge_declared_shape_is_refused_before_allocation(daemon: Daemon) -> None:
    """A tensor declaring 10**12 elements is INVALID_ARGUMENT, not an allocation."""
    request = build_request("mlp", {"x": X})
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([10**6, 10**6])
    error = raw_predict(daemon, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 4000000000000" in error.details()


def test_duplicate_and_unnamed_inputs_are_invalid(daemon: Daemon) -> None:
    """Two tensors with one name, or a nameless one, are INVALID_ARGUMENT."""
    request = build_request("mlp", {"x": X})
    request.inputs.add().CopyFrom(request.inputs[0])
    assert "appears twice" in raw_predict(daemon, request).details()
    request = build_request("mlp", {"x": X})
    request.inputs[0].name = ""
    assert "empty name" in raw_predict(daemon, request).details()


def test_unknown_dtype_is_invalid(daemon: Daemon) -> None:
    """A dtype number the protocol doesn't define is INVALID_ARGUMENT."""
    request = build_request("mlp", {"x": X})
    request.inputs[0].dtype = 99  # type: ignore[assignment]
    error = raw_predict(daemon, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dtype" in error.details()


def test_message_over_the_limit_is_resource_exhausted(daemon: Daemon) -> None:
    """A request larger than the daemon's message limit is RESOURCE_EXHAUSTED, from the daemon.

    80 MiB: past the daemon's 64 MiB default, within this client's 256 MiB cap, so the
    refusal is the daemon's ("Received ... larger than max"), not the client's ("Sent").
    """
    big = np.zeros((32, 80 * 1024 * 1024 // 32 // 4), dtype=np.float32)
    assert 64 << 20 < big.nbytes < 256 << 20
    with edgeinfer.Client(daemon.address, max_message_bytes=256 * 1024 * 1024) as client:
        error = call_error(client, "mlp", {"x": big})
        assert client.health() == "SERVING"
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in error.message, error.message
    assert "vs. 67108864" in error.message


def test_failing_forward_pass_is_internal_and_next_call_succeeds(
    client: edgeinfer.Client, daemon: Daemon
) -> None:
    """A model that raises fails that call with INTERNAL (request id logged), then serves again."""
    error = call_error(
        client, "picky", {"x": -np.ones((1, 2), np.float32)}, request_id="req-negative"
    )
    assert error.code == grpc.StatusCode.INTERNAL
    assert "forward pass" in error.message and "Traceback" not in error.message
    ok = client.predict("picky", {"x": np.ones((1, 2), np.float32)})
    np.testing.assert_array_equal(ok["y"], np.full((1, 2), 2, np.float32))
    # The model's own traceback is logged (as JSON here), with the request id.
    (line,) = [
        json.loads(line)
        for line in daemon.log_text().splitlines()
        if "req-negative" in line and "forward pass failed" in line
    ]
    assert line["request_id"] == "req-negative"
    # The model's own exception (TorchScript's, carrying the model's message) is logged,
    # not only the daemon's ModelExecutionError that wraps it.
    frames = line["exception"]
    assert any(
        frame["exc_type"] != "ModelExecutionError" and "negative input" in frame["exc_value"]
        for frame in frames
    ), frames


def test_more_tensors_than_the_model_takes_are_refused_before_decoding(daemon: Daemon) -> None:
    """3,000 tiny tensors (about 60 KB) are refused by count, on v1 and V2 alike.

    The message names the count, not a tensor: the check runs before any is
    decoded. (Far more fields than this are refused before parsing: test_wire.py.)
    """
    from tritonclient.grpc import service_pb2 as grpc_service_pb2
    from tritonclient.grpc import service_pb2_grpc as grpc_service_pb2_grpc

    from edgeinfer.v1 import inference_pb2, tensor_pb2

    v1 = inference_pb2.PredictRequest(model="mlp")
    v2 = grpc_service_pb2.ModelInferRequest(model_name="mlp")
    for index in range(3_000):
        v1.inputs.add(name=f"x{index}", dtype=tensor_pb2.FLOAT32, shape=[1])
        v2.inputs.add(name=f"x{index}", datatype="FP32", shape=[1])
    with grpc.insecure_channel(daemon.address) as channel:
        with pytest.raises(grpc.RpcError) as first:
            inference_pb2_grpc.InferenceStub(channel).Predict(v1, timeout=60)
        with pytest.raises(grpc.RpcError) as second:
            grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(v2, timeout=60)
    for caught in (first, second):
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "has 3000 input tensors; model 'mlp' takes 1" in caught.value.details()
