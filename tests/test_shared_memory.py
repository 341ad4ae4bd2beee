"""Tensors in POSIX shared memory: registered once, referenced by offset, validated."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
import pytest

import edgeinfer
from edgeinfer.shm import SHM_ROOT, SharedMemoryRegion
from tests.conftest import Daemon
from tests.test_predict import reference


def test_inputs_and_outputs_through_shared_memory(client: edgeinfer.Client) -> None:
    """A call whose input and output live in a registered region gives the inline answer."""
    x = np.random.default_rng(3).standard_normal((32, 16), dtype=np.float32)
    with SharedMemoryRegion.create(1 << 20) as region:
        client.register_shared_memory(region)
        try:
            via_shm = client.predict("mlp", {"x": x}, shared_memory=region)
            both = client.predict(
                "mlp", {"x": x}, shared_memory=region, outputs=["y"], outputs_in_shared_memory=True
            )
        finally:
            client.unregister_shared_memory(region)
    np.testing.assert_allclose(via_shm["y"], reference(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(both["y"], via_shm["y"])


def test_unregistered_region_is_refused(client: edgeinfer.Client) -> None:
    """After unregistering, a call naming the region is INVALID_ARGUMENT."""
    with SharedMemoryRegion.create(4096) as region:
        client.register_shared_memory(region)
        client.unregister_shared_memory(region)
        region.registered = True  # pretend, to send the stale reference
        with pytest.raises(edgeinfer.EdgeInferError) as caught:
            client.predict("mlp", {"x": np.zeros((1, 16), np.float32)}, shared_memory=region)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not registered" in caught.value.message


@pytest.mark.parametrize(
    ("key", "offset", "size", "code", "words"),
    [
        ("/edgeinfer-does-not-exist", 0, 16, grpc.StatusCode.NOT_FOUND, "does not exist"),
        ("../etc/passwd", 0, 16, grpc.StatusCode.INVALID_ARGUMENT, "is invalid"),
        (None, 0, 1 << 30, grpc.StatusCode.INVALID_ARGUMENT, "which has 4096 bytes"),
        (None, 4000, 200, grpc.StatusCode.INVALID_ARGUMENT, "bytes 4000..4200"),
    ],
)
def test_registration_is_validated(
    daemon: Daemon, key: str | None, offset: int, size: int, code: grpc.StatusCode, words: str
) -> None:
    """Missing objects, path tricks and out-of-bounds slices are refused at registration."""
    from edgeinfer.v1 import inference_pb2, inference_pb2_grpc

    with (
        SharedMemoryRegion.create(4096) as region,
        grpc.insecure_channel(daemon.address) as channel,
    ):
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.RegisterSharedMemoryRequest(
            name="probe", key=key or region.key, offset=offset, byte_size=size
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.RegisterSharedMemory(request)
    assert caught.value.code() == code
    assert words in caught.value.details()


def test_world_writable_object_is_refused(client: edgeinfer.Client) -> None:
    """An object every user may write is refused: its bytes could change under a call."""
    with SharedMemoryRegion.create(4096, mode=0o666) as region:
        assert (SHM_ROOT / region.name).stat().st_mode & 0o777 == 0o666
        with pytest.raises(edgeinfer.EdgeInferError) as caught:
            client.register_shared_memory(region)
    assert "writable by every user" in caught.value.message


def test_slice_outside_region_is_refused(client: edgeinfer.Client) -> None:
    """A tensor whose slice runs past the region is INVALID_ARGUMENT naming the sizes."""
    with SharedMemoryRegion.create(256) as region:
        client.register_shared_memory(region)
        try:
            with pytest.raises((edgeinfer.EdgeInferError, ValueError)):
                client.predict("mlp", {"x": np.zeros((32, 16), np.float32)}, shared_memory=region)
        finally:
            client.unregister_shared_memory(region)


def test_unregister_unmaps_the_region(daemon: Daemon, client: edgeinfer.Client) -> None:
    """The daemon's mapping of a region disappears from its address space when unregistered."""
    with SharedMemoryRegion.create(8192) as region:
        client.register_shared_memory(region)
        maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
        assert region.name in maps
        client.unregister_shared_memory(region)
        maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
        assert region.name not in maps
    assert not os.path.exists(SHM_ROOT / region.name)
