"""Model management, health and reflection, through the real client and real gRPC peers."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import edgeinfer
from tests import models
from tests.conftest import Daemon, StartDaemon

X = np.zeros((1, 16), dtype=np.float32)


def test_list_models_reports_states_and_reasons(client: edgeinfer.Client) -> None:
    """ListModels shows good models READY and broken ones FAILED with their reason."""
    states = {m.name: m for m in client.list_models()}
    assert states["mlp"].state == "READY"
    assert states["adder"].state == "READY"
    assert states["corrupt"].state == "FAILED"
    assert "cannot load torchscript artifact" in states["corrupt"].reason
    assert states["pickled"].state == "FAILED"
    assert "pickled modules are refused" in states["pickled"].reason
    assert states["tampered"].state == "FAILED"
    assert "does not match its manifest" in states["tampered"].reason


def test_get_model_describes_tensors_versions_and_manifest(client: edgeinfer.Client) -> None:
    """GetModel gives dtypes, shapes with -1 for the batch, the format, size and manifest facts."""
    info = client.get_model("signed")
    assert info.state == "READY"
    assert info.serving_version == "1"
    assert info.max_batch_size == 32
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [("x", "float32", (-1, 16))]
    assert [(t.name, t.dtype, t.shape) for t in info.outputs] == [("y", "float32", (-1, 4))]
    (version,) = info.versions
    assert version.format == "torchscript"
    assert version.size_bytes > 1000
    assert version.manifest["stages"][0]["name"] == "teacher"


def test_get_unknown_model_is_not_found(client: edgeinfer.Client) -> None:
    """GetModel on a name not in the repository is NOT_FOUND."""
    with pytest.raises(edgeinfer.EdgeInferError) as caught:
        client.get_model("ghost")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_unload_then_load_again(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """An unloaded model answers UNAVAILABLE until it is loaded again."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo)
    with daemon.client(timeout=30) as client:
        assert client.unload_model("mlp").state == "UNLOADED"
        with pytest.raises(edgeinfer.EdgeInferError) as caught:
            client.predict("mlp", {"x": X})
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert client.health("mlp") == "NOT_SERVING"
        assert client.load_model("mlp").state == "READY"
        assert client.predict("mlp", {"x": X})["y"].shape == (1, 4)
        assert client.health("mlp") == "SERVING"


def test_load_model_added_after_start(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A model folder created after start-up can be loaded by name."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo)
    models.add_adder(repo, "late")
    with daemon.client(timeout=60) as client:
        assert client.load_model("late").state == "READY"
        a = np.arange(3, dtype=np.int64)
        np.testing.assert_array_equal(client.predict("late", {"a": a, "b": a})["sum"], a * 2)


def test_load_failure_is_reported_with_reason(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Loading a broken model fails with FAILED_PRECONDITION naming the file; the others serve."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo)
    models.add_corrupt(repo, "broken")
    with daemon.client(timeout=60) as client:
        with pytest.raises(edgeinfer.EdgeInferError) as caught:
            client.load_model("broken")
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "broken/1/model.pt" in caught.value.message
        assert client.get_model("broken").state == "FAILED"
        assert client.predict("mlp", {"x": X})["y"].shape == (1, 4)


def test_management_can_be_disabled(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """With management.allow = 'none', load and unload are PERMISSION_DENIED."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo, '[management]\nallow = "none"\n')
    with daemon.client(timeout=30) as client:
        for action in (client.load_model, client.unload_model):
            with pytest.raises(edgeinfer.EdgeInferError) as caught:
                action("mlp")
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert client.predict("mlp", {"x": X})["y"].shape == (1, 4)


def test_standard_health_service_answers_for_server_and_models(daemon: Daemon) -> None:
    """grpc.health.v1 (as grpc_health_probe uses it) reports the server and each model."""
    with grpc.insecure_channel(daemon.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert stub.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        assert stub.Check(health_pb2.HealthCheckRequest(service="mlp")).status == serving
        failed = stub.Check(health_pb2.HealthCheckRequest(service="corrupt")).status
        assert failed == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_and_describes_the_services(daemon: Daemon) -> None:
    """Server reflection (what grpcurl uses) lists the services and resolves their methods."""
    with grpc.insecure_channel(daemon.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"edgeinfer.v1.Inference", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("edgeinfer.v1.Inference")
        assert {"Predict", "PredictStream", "ListModels"} <= {m.name for m in service.methods}
