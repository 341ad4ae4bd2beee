"""The Open Inference Protocol (KServe V2) service, spoken by the published tritonclient.

The daemon runs in a subprocess; this process never imports ``edgeinfer.kserve``
(tritonclient registers the same ``inference.*`` messages in protobuf's default
pool, and one process cannot hold both). Hand-built requests use tritonclient's
own ``service_pb2`` classes over a plain gRPC channel.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

import edgeinfer
from tests import models
from tests.conftest import Daemon, StartDaemon

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def v2(daemon: Daemon) -> Iterator[triton.InferenceServerClient]:
    """tritonclient pointed at the daemon's Unix socket, exactly as at a Triton server."""
    client = triton.InferenceServerClient(daemon.address)
    yield client
    client.close()


def mlp_input(x: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def adder_inputs(a: np.ndarray, b: np.ndarray) -> list[triton.InferInput]:
    tensors = []
    for name, array in (("a", a), ("b", b)):
        tensor = triton.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def status_of(error: InferenceServerException) -> str:
    return str(error.status())


def raw_infer(daemon: Daemon, request: service_pb2.ModelInferRequest) -> Any:
    """One ModelInfer call built by hand, over a plain channel with tritonclient's messages."""
    with grpc.insecure_channel(daemon.address) as channel:
        call = channel.unary_unary(
            MODEL_INFER,
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        return call(request, timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- health and metadata -----------------------------------------------------


def test_server_is_live_and_ready(v2: triton.InferenceServerClient) -> None:
    """A running daemon answers live and ready."""
    assert v2.is_server_live()
    assert v2.is_server_ready()


def test_server_metadata_names_edgeinferd_and_its_extensions(
    v2: triton.InferenceServerClient,
) -> None:
    """Server metadata gives the daemon's name, version and the extensions it serves."""
    import edgeinferd

    metadata = v2.get_server_metadata(as_json=True)
    assert metadata["name"] == "edgeinferd"
    assert metadata["version"] == edgeinferd.__version__
    assert {"model_repository", "model_configuration", "statistics"} <= set(metadata["extensions"])


def test_reflection_describes_the_v2_service(daemon: Daemon) -> None:
    """Server reflection lists inference.GRPCInferenceService and resolves its methods."""
    with grpc.insecure_channel(daemon.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in set(database.get_services())
        # A private pool: tritonclient already holds these names in the default one.
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        methods = {m.name: m for m in service.methods}
        assert {"ModelInfer", "ModelStreamInfer", "RepositoryIndex"} <= set(methods)
        stream = methods["ModelStreamInfer"].output_type
        assert [(f.name, f.number) for f in stream.fields] == [
            ("error_message", 1),
            ("infer_response", 2),
        ]


def test_model_ready_only_for_serving_models_and_versions(
    v2: triton.InferenceServerClient,
) -> None:
    """A loaded model is ready; a failed, unknown or wrong-version one is not."""
    assert v2.is_model_ready("mlp")
    assert v2.is_model_ready("mlp", "1")
    assert not v2.is_model_ready("mlp", "7")
    assert not v2.is_model_ready("corrupt")
    assert not v2.is_model_ready("ghost")


def test_model_metadata_uses_v2_datatypes_and_batch_dimension(
    v2: triton.InferenceServerClient,
) -> None:
    """Metadata gives V2 datatypes, -1 for the batch and variable dims, platform and version."""
    mlp = v2.get_model_metadata("mlp", as_json=True)
    assert mlp["name"] == "mlp"
    assert mlp["versions"] == ["1"]
    assert mlp["platform"] == "pytorch_libtorch"
    assert mlp["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "16"]}]
    assert mlp["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "4"]}]
    adder = v2.get_model_metadata("adder", as_json=True)
    assert adder["platform"] == "pytorch_exported_program"
    assert [(t["name"], t["datatype"], t["shape"]) for t in adder["outputs"]] == [
        ("sum", "INT64", ["-1"]),
        ("product", "INT64", ["-1"]),
    ]


def test_model_config_gives_dims_without_the_batch_dimension(
    v2: triton.InferenceServerClient,
) -> None:
    """Triton's config view has max_batch_size and per-row dims, as Triton writes them."""
    config = v2.get_model_config("mlp").config
    assert config.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("x", 11, [16])  # TYPE_FP32
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [4])]
    assert config.instance_group[0].count == 1


def test_repository_index_lists_every_model_with_its_state(
    v2: triton.InferenceServerClient,
) -> None:
    """The index has every model: READY ones with their version, failed ones UNAVAILABLE."""
    index = {m["name"]: m for m in v2.get_model_repository_index(as_json=True)["models"]}
    assert set(index) == {
        "mlp",
        "adder",
        "picky",
        "slow",
        "corrupt",
        "pickled",
        "signed",
        "tampered",
    }
    assert index["mlp"]["state"] == "READY" and index["mlp"]["version"] == "1"
    assert index["corrupt"]["state"] == "UNAVAILABLE" and index["corrupt"]["reason"]
    assert index["tampered"]["state"] == "UNAVAILABLE" and index["tampered"]["reason"]


# -- inference ---------------------------------------------------------------


def test_fp32_infer_equals_the_native_api(
    v2: triton.InferenceServerClient, client: edgeinfer.Client
) -> None:
    """An FP32 call through tritonclient returns what edgeinfer.Client returns, id echoed."""
    x = np.random.default_rng(3).standard_normal((5, 16), dtype=np.float32)
    result = v2.infer("mlp", [mlp_input(x)], request_id="req-7", model_version="1")
    native = client.predict("mlp", {"x": x})["y"]
    np.testing.assert_array_equal(result.as_numpy("y"), native)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-7", "mlp", "1")
    assert response.outputs[0].datatype == "FP32"


def test_int64_infer_returns_the_requested_outputs_only(
    v2: triton.InferenceServerClient, client: edgeinfer.Client
) -> None:
    """Asking for one output of two returns just it, equal to the native API's."""
    a = np.arange(10, dtype=np.int64)
    b = np.full(10, -3, dtype=np.int64)
    both = v2.infer("adder", adder_inputs(a, b))
    native = client.predict("adder", {"a": a, "b": b})
    np.testing.assert_array_equal(both.as_numpy("sum"), native["sum"])
    np.testing.assert_array_equal(both.as_numpy("product"), native["product"])
    one = v2.infer("adder", adder_inputs(a, b), outputs=[triton.InferRequestedOutput("product")])
    assert [o.name for o in one.get_response().outputs] == ["product"]
    assert one.as_numpy("sum") is None
    np.testing.assert_array_equal(one.as_numpy("product"), native["product"])


def test_asyncio_client_runs_concurrent_calls(daemon: Daemon, client: edgeinfer.Client) -> None:
    """tritonclient's asyncio client gets correct answers for concurrent calls."""
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((2, 16), dtype=np.float32) for _ in range(20)]

    async def run() -> list[np.ndarray]:
        async with triton_aio.InferenceServerClient(daemon.address) as aio:
            assert await aio.is_model_ready("mlp")
            results = await asyncio.gather(*(aio.infer("mlp", [mlp_input(x)]) for x in batches))
            return [r.as_numpy("y") for r in results]

    for x, y in zip(batches, asyncio.run(run()), strict=True):
        np.testing.assert_allclose(y, client.predict("mlp", {"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_stream_answers_in_order_and_survives_a_bad_request(
    v2: triton.InferenceServerClient, client: edgeinfer.Client
) -> None:
    """Hundreds of streamed requests answer in order; a bad one gets its error, the stream lives."""
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((1, 16), dtype=np.float32) for _ in range(300)]
    batches[150] = np.zeros((1, 15), dtype=np.float32)
    answers: list[tuple[Any, Any]] = []
    done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        answers.append((result, error))
        if len(answers) in (len(batches), len(batches) + 1):
            done.set()

    v2.start_stream(callback=callback)
    try:
        for index, x in enumerate(batches):
            v2.async_stream_infer("mlp", [mlp_input(x)], request_id=str(index))
        assert done.wait(30), f"{len(answers)} answers of {len(batches)}"
        done.clear()
        v2.async_stream_infer("mlp", [mlp_input(batches[0])], request_id="after")
        assert done.wait(30)
    finally:
        v2.stop_stream()
    result, error = answers[150]
    assert result is None
    assert "[1, 15]" in str(error) and "[-1, 16]" in str(error)
    good = [(i, r) for i, (r, e) in enumerate(answers[:300]) if i != 150]
    assert all(answers[i][1] is None for i, _ in good)
    assert [r.get_response().id for _, r in good] == [str(i) for i, _ in good]
    rows = np.concatenate([batches[i] for i, _ in good])
    expected = np.concatenate(
        [client.predict("mlp", {"x": rows[i : i + 32]})["y"] for i in range(0, len(rows), 32)]
    )
    got = np.concatenate([r.as_numpy("y") for _, r in good])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert answers[300][0].get_response().id == "after"


def test_typed_contents_equal_raw_contents(daemon: Daemon, client: edgeinfer.Client) -> None:
    """Inputs sent as typed fp32/int64 contents give the same answer as the native API."""
    x = np.random.default_rng(6).standard_normal((3, 16), dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name="mlp", id="typed")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[3, 16])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = raw_infer(daemon, request)
    y = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 4)
    np.testing.assert_array_equal(y, client.predict("mlp", {"x": x})["y"])
    assert response.id == "typed"

    a, b = np.array([1, -2, 3], dtype=np.int64), np.array([4, 5, 1 << 40], dtype=np.int64)
    request = service_pb2.ModelInferRequest(model_name="adder")
    for name, values in (("a", a), ("b", b)):
        request.inputs.add(name=name, datatype="INT64", shape=[3]).contents.int64_contents.extend(
            values.tolist()
        )
    request.parameters["some_unknown_knob"].string_param = "ignored"
    response = raw_infer(daemon, request)
    outputs = {
        o.name: np.frombuffer(raw, dtype="<i8")
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    native = client.predict("adder", {"a": a, "b": b})
    np.testing.assert_array_equal(outputs["sum"], native["sum"])
    np.testing.assert_array_equal(outputs["product"], native["product"])


# -- errors -------------------------------------------------------------------


def test_unknown_model_is_not_found(v2: triton.InferenceServerClient) -> None:
    """Inference on a model the repository lacks is NOT_FOUND."""
    with pytest.raises(InferenceServerException) as caught:
        v2.infer("ghost", [mlp_input(np.zeros((1, 16), np.float32))])
    assert status_of(caught.value) == "StatusCode.NOT_FOUND"
    assert "ghost" in caught.value.message()


def test_unknown_version_is_not_found(v2: triton.InferenceServerClient) -> None:
    """Asking for a version the daemon does not serve is NOT_FOUND, naming the one it does."""
    with pytest.raises(InferenceServerException) as caught:
        v2.infer("mlp", [mlp_input(np.zeros((1, 16), np.float32))], model_version="9")
    assert status_of(caught.value) == "StatusCode.NOT_FOUND"
    assert "'9'" in caught.value.message() and "'1'" in caught.value.message()


def test_failed_model_is_unavailable(v2: triton.InferenceServerClient) -> None:
    """Inference and metadata on a model that failed to load are UNAVAILABLE."""
    with pytest.raises(InferenceServerException) as caught:
        v2.infer("corrupt", [mlp_input(np.zeros((1, 16), np.float32))])
    assert status_of(caught.value) == "StatusCode.UNAVAILABLE"
    with pytest.raises(InferenceServerException) as caught:
        v2.get_model_metadata("corrupt")
    assert status_of(caught.value) == "StatusCode.UNAVAILABLE"


def test_wrong_shape_is_invalid(v2: triton.InferenceServerClient) -> None:
    """A shape the model does not take is INVALID_ARGUMENT, naming both shapes."""
    with pytest.raises(InferenceServerException) as caught:
        v2.infer("mlp", [mlp_input(np.zeros((2, 15), np.float32))])
    assert status_of(caught.value) == "StatusCode.INVALID_ARGUMENT"
    assert "[2, 15]" in caught.value.message() and "[-1, 16]" in caught.value.message()


def test_wrong_datatype_is_invalid(v2: triton.InferenceServerClient) -> None:
    """FP64 for an FP32 input is INVALID_ARGUMENT, naming both types."""
    with pytest.raises(InferenceServerException) as caught:
        v2.infer("mlp", [mlp_input(np.zeros((1, 16), np.float64), "FP64")])
    assert status_of(caught.value) == "StatusCode.INVALID_ARGUMENT"
    assert "float64" in caught.value.message() and "float32" in caught.value.message()


def test_bytes_input_is_refused_naming_the_expected_type(
    v2: triton.InferenceServerClient,
) -> None:
    """A BYTES tensor is INVALID_ARGUMENT, saying the model expects FP32."""
    tensor = triton.InferInput("x", [1, 16], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"a"] * 16], dtype=np.object_))
    with pytest.raises(InferenceServerException) as caught:
        v2.infer("mlp", [tensor])
    assert status_of(caught.value) == "StatusCode.INVALID_ARGUMENT"
    assert "BYTES" in caught.value.message() and "FP32" in caught.value.message()


def test_raw_buffer_length_and_count_are_checked(daemon: Daemon) -> None:
    """A raw buffer of the wrong length, or too few buffers, is INVALID_ARGUMENT."""
    short = service_pb2.ModelInferRequest(model_name="mlp")
    short.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    short.raw_input_contents.append(b"\0" * 60)
    with pytest.raises(grpc.RpcError) as caught:
        raw_infer(daemon, short)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "60 bytes" in caught.value.details() and "64" in caught.value.details()

    missing = service_pb2.ModelInferRequest(model_name="adder")
    missing.inputs.add(name="a", datatype="INT64", shape=[1])
    missing.inputs.add(name="b", datatype="INT64", shape=[1])
    missing.raw_input_contents.append(np.int64(1).tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        raw_infer(daemon, missing)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 raw_input_contents for 2 inputs" in caught.value.details()


def test_shared_memory_is_unimplemented(v2: triton.InferenceServerClient) -> None:
    """Shared-memory registration is UNIMPLEMENTED with a message saying so."""
    with pytest.raises(InferenceServerException) as caught:
        v2.get_system_shared_memory_status()
    assert status_of(caught.value) == "StatusCode.UNIMPLEMENTED"
    assert "shared memory" in caught.value.message()


# -- statistics and the repository extension -----------------------------------


def test_statistics_count_calls_rows_and_forward_passes(
    v2: triton.InferenceServerClient,
) -> None:
    """Statistics grow by one successful call, its rows and one forward pass, with timings."""

    def stats() -> Any:
        return v2.get_inference_statistics("mlp").model_stats[0]

    before = stats()
    v2.infer("mlp", [mlp_input(np.zeros((3, 16), np.float32))])
    after = stats()
    assert after.inference_count == before.inference_count + 3
    assert after.execution_count == before.execution_count + 1
    grown = after.inference_stats
    assert grown.success.count == before.inference_stats.success.count + 1
    assert grown.success.ns > before.inference_stats.success.ns
    assert grown.queue.count == grown.compute_infer.count == grown.compute_output.count
    assert grown.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert 3 in {b.batch_size for b in after.batch_stats}
    everything = v2.get_inference_statistics().model_stats
    assert "mlp" in {s.name for s in everything} and "corrupt" not in {s.name for s in everything}


def test_repository_load_and_unload(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Unloading makes a model unavailable; loading it again serves it."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo)
    with triton.InferenceServerClient(daemon.address) as v2:
        v2.unload_model("mlp")
        assert not v2.is_model_ready("mlp")
        (entry,) = v2.get_model_repository_index(as_json=True)["models"]
        assert (entry["name"], entry["state"]) == ("mlp", "UNAVAILABLE")
        v2.load_model("mlp")
        assert v2.is_model_ready("mlp")
        result = v2.infer("mlp", [mlp_input(np.ones((1, 16), np.float32))])
        assert result.as_numpy("y").shape == (1, 4)
        with pytest.raises(InferenceServerException) as caught:
            v2.load_model("ghost")
        assert status_of(caught.value) == "StatusCode.NOT_FOUND"


UNCHANGED_SCRIPT = """
import sys
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient(url=sys.argv[1])
assert client.is_server_live() and client.is_model_ready("mlp")
x = np.ones((2, 16), dtype=np.float32)
inputs = [grpcclient.InferInput("x", [2, 16], "FP32")]
inputs[0].set_data_from_numpy(x)
outputs = [grpcclient.InferRequestedOutput("y")]
result = client.infer(model_name="mlp", inputs=inputs, outputs=outputs)
print(result.as_numpy("y").tolist())
try:
    client.load_model("mlp")
except grpcclient.InferenceServerException as error:
    print(error.status())
"""


def test_unchanged_triton_script_over_tcp(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A stock tritonclient script reaches the daemon on host:port; management stays Unix-only."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    port = free_port()
    daemon = start_daemon(repo, f'tcp = "127.0.0.1:{port}"\n[management]\nallow = "unix"\n')
    run = subprocess.run(
        [sys.executable, "-c", UNCHANGED_SCRIPT, f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    y_line, status = run.stdout.strip().splitlines()
    with daemon.client(timeout=30) as native:
        expected = native.predict("mlp", {"x": np.ones((2, 16), np.float32)})["y"]
    np.testing.assert_array_equal(np.array(json.loads(y_line), dtype=np.float32), expected)
    assert status == "StatusCode.PERMISSION_DENIED"
