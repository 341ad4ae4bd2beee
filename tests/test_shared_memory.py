"""Tensors in POSIX shared memory: registered once, referenced by offset, validated.

Every test runs a real daemon and calls it through the real clients. Tests of
other users run a second client process that drops to uid 65534 ("nobody")
after importing, so that the daemon sees a different kernel-attested uid.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import edgeinfer
from edgeinfer.client import peer_token
from edgeinfer.shm import SHM_ROOT, SharedMemoryRegion
from edgeinfer.v1 import inference_pb2, inference_pb2_grpc
from tests.conftest import ROOT, Daemon, StartDaemon, short_tmpdir
from tests.reliability_helpers import free_port
from tests.test_predict import reference

NOBODY = 65534


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _stub_call(daemon: Daemon, method: str, request: object, token: bool = True) -> object:
    """A raw call that carries (or not) this process's peer token, past the client's checks."""
    metadata = (("edgeinfer-peer-token", peer_token(daemon.address) or ""),) if token else ()
    with grpc.insecure_channel(daemon.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return getattr(stub, method)(request, metadata=metadata, timeout=30)


def test_inputs_and_outputs_through_shared_memory(client: edgeinfer.Client) -> None:
    """A call whose input and output live in a registered region gives the inline answer."""
    x = np.random.default_rng(3).standard_normal((32, 16), dtype=np.float32)
    with SharedMemoryRegion.create(1 << 20) as region:
        client.register_shared_memory(region)
        try:
            assert region.name in client.list_shared_memory()
            via_shm = client.predict("mlp", {"x": x}, shared_memory=region)
            both = client.predict(
                "mlp", {"x": x}, shared_memory=region, outputs=["y"], outputs_in_shared_memory=True
            )
        finally:
            client.unregister_shared_memory(region)
    np.testing.assert_allclose(via_shm["y"], reference(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(both["y"], via_shm["y"])


def test_async_client_has_the_same_shared_memory_methods(daemon: Daemon) -> None:
    """AsyncClient registers, lists, predicts through and unregisters a region like Client."""
    x = np.random.default_rng(4).standard_normal((8, 16), dtype=np.float32)

    async def main() -> tuple[list[str], dict[str, np.ndarray], list[str]]:
        async with edgeinfer.AsyncClient(daemon.address, timeout=30) as client:
            with SharedMemoryRegion.create(1 << 16) as region:
                await client.register_shared_memory(region)
                listed = await client.list_shared_memory()
                outputs = await client.predict(
                    "mlp",
                    {"x": x},
                    shared_memory=region,
                    outputs=["y"],
                    outputs_in_shared_memory=True,
                )
                await client.unregister_shared_memory(region)
                return listed, outputs, await client.list_shared_memory()

    listed, outputs, after = asyncio.run(main())
    assert len(listed) == 1 and listed[0].startswith("edgeinfer-")
    np.testing.assert_allclose(outputs["y"], reference(x), rtol=1e-5, atol=1e-6)
    assert after == []


def _shm_request(region: str, outputs_in_shm: bool) -> inference_pb2.PredictRequest:
    """Predict mlp on 4 rows read from ``region`` (built by hand: the client's own mapping
    of a truncated object would fault in the test process)."""
    request = inference_pb2.PredictRequest(model="mlp")
    tensor = request.inputs.add(name="x", dtype=edgeinfer.tensors.dtype_code(np.dtype(np.float32)))
    tensor.shape.extend([4, 16])
    tensor.shared_memory.region = region
    tensor.shared_memory.byte_size = 4 * 16 * 4
    wanted = request.outputs.add(name="y")
    if outputs_in_shm:
        wanted.shared_memory.region = region
        wanted.shared_memory.offset = 4096
        wanted.shared_memory.byte_size = 4 * 4 * 4
    return request


def test_object_truncated_after_registration_is_refused_not_a_crash(
    daemon: Daemon, client: edgeinfer.Client
) -> None:
    """Register an 8 KiB object, truncate it to 0 bytes, Predict from it: INVALID_ARGUMENT.

    A daemon that mapped the object died of SIGBUS here; it must answer and keep serving.
    The same for outputs: an object truncated between input and output is refused too.
    """
    key = f"/edgeinfer-truncate-{os.getpid()}"
    path = SHM_ROOT / key[1:]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 8192)
        register = inference_pb2.RegisterSharedMemoryRequest(
            name="shrinks", key=key, offset=0, byte_size=8192
        )
        _stub_call(daemon, "RegisterSharedMemory", register)
        _stub_call(daemon, "Predict", _shm_request("shrinks", True))  # fine at 8 KiB
        os.ftruncate(fd, 0)
        for outputs_in_shm in (False, True):
            with pytest.raises(grpc.RpcError) as caught:
                _stub_call(daemon, "Predict", _shm_request("shrinks", outputs_in_shm))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "which has 0 bytes" in caught.value.details()
        # Inputs still there, the output slice cut off: refused when writing.
        os.ftruncate(fd, 4096)
        with pytest.raises(grpc.RpcError) as caught:
            _stub_call(daemon, "Predict", _shm_request("shrinks", True))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "which has 4096 bytes" in caught.value.details()
        _stub_call(
            daemon,
            "UnregisterSharedMemory",
            inference_pb2.UnregisterSharedMemoryRequest(name="shrinks"),
        )
    finally:
        os.close(fd)
        path.unlink()
    assert daemon.process.poll() is None
    assert client.health() == "SERVING"
    x = np.ones((1, 16), np.float32)
    np.testing.assert_allclose(client.predict("mlp", {"x": x})["y"], reference(x), rtol=1e-5)


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
    with SharedMemoryRegion.create(4096) as region:
        request = inference_pb2.RegisterSharedMemoryRequest(
            name="probe", key=key or region.key, offset=offset, byte_size=size
        )
        with pytest.raises(grpc.RpcError) as caught:
            _stub_call(daemon, "RegisterSharedMemory", request)
    assert caught.value.code() == code
    assert words in caught.value.details()


def test_world_writable_object_is_refused(client: edgeinfer.Client) -> None:
    """An object every user may write is refused: its bytes could change under a call."""
    with SharedMemoryRegion.create(4096, mode=0o666) as region:
        assert (SHM_ROOT / region.name).stat().st_mode & 0o777 == 0o666
        with pytest.raises(edgeinfer.EdgeInferError) as caught:
            client.register_shared_memory(region)
    assert "writable by every user" in caught.value.message


@pytest.mark.parametrize("change", ["chmod 0666", "chown nobody"])
def test_object_is_checked_again_at_every_use(client: edgeinfer.Client, change: str) -> None:
    """A chmod 0666 or a change of owner after registration is noticed at the next call."""
    x = np.ones((1, 16), np.float32)
    with SharedMemoryRegion.create(4096) as region:
        client.register_shared_memory(region)
        try:
            client.predict("mlp", {"x": x}, shared_memory=region)  # fine before
            path = SHM_ROOT / region.name
            if change == "chmod 0666":
                os.chmod(path, 0o666)
            else:
                os.chown(path, NOBODY, -1)
            with pytest.raises(edgeinfer.EdgeInferError) as caught:
                client.predict("mlp", {"x": x}, shared_memory=region)
        finally:
            client.unregister_shared_memory(region)
    if change == "chmod 0666":
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "writable by every user" in caught.value.message
    else:
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert f"belongs to uid {NOBODY}" in caught.value.message


def test_slice_outside_region_is_refused_by_the_daemon(daemon: Daemon) -> None:
    """A tensor whose slice runs past the region is INVALID_ARGUMENT naming the sizes.

    The request is built by hand: the client's own check would refuse it first.
    """
    with SharedMemoryRegion.create(256) as region:
        _stub_call(
            daemon,
            "RegisterSharedMemory",
            inference_pb2.RegisterSharedMemoryRequest(
                name="small", key=region.key, offset=0, byte_size=256
            ),
        )
        try:
            request = inference_pb2.PredictRequest(model="mlp")
            tensor = request.inputs.add(
                name="x", dtype=edgeinfer.tensors.dtype_code(np.dtype(np.float32))
            )
            tensor.shape.extend([32, 16])
            tensor.shared_memory.region = "small"
            tensor.shared_memory.byte_size = 32 * 16 * 4
            with pytest.raises(grpc.RpcError) as caught:
                _stub_call(daemon, "Predict", request)
        finally:
            _stub_call(
                daemon,
                "UnregisterSharedMemory",
                inference_pb2.UnregisterSharedMemoryRequest(name="small"),
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bytes 0..2048 of shared-memory region 'small', which has 256 bytes" in (
        caught.value.details()
    )


def test_the_daemon_never_maps_a_region(daemon: Daemon, client: edgeinfer.Client) -> None:
    """Regions are copied through pread/pwrite: nothing of them is mapped, before or after."""
    with SharedMemoryRegion.create(8192) as region:
        client.register_shared_memory(region)
        client.predict("mlp", {"x": np.ones((2, 16), np.float32)}, shared_memory=region)
        assert region.name not in Path(f"/proc/{daemon.process.pid}/maps").read_text()
        client.unregister_shared_memory(region)
    assert not os.path.exists(SHM_ROOT / region.name)


def test_regions_hold_no_descriptor_and_are_capped(daemon: Daemon) -> None:
    """64 regions add no open file to the daemon; the 65th is RESOURCE_EXHAUSTED."""
    regions = [SharedMemoryRegion.create(4096) for _ in range(65)]
    try:
        with daemon.client(timeout=30) as client:
            client.list_shared_memory()  # the token fetched, the channel up
            before = _open_fds(daemon.process.pid)
            for region in regions[:64]:
                client.register_shared_memory(region)
            assert _open_fds(daemon.process.pid) == before
            with pytest.raises(edgeinfer.EdgeInferError) as caught:
                client.register_shared_memory(regions[64])
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "64 shared-memory regions" in caught.value.message
            for region in regions[:64]:
                client.unregister_shared_memory(region)
            assert client.list_shared_memory() == []
    finally:
        for region in regions:
            region.close()


def test_bytes_per_user_are_capped(daemon: Daemon) -> None:
    """A registration that would pass the per-user byte cap (16 GiB) is RESOURCE_EXHAUSTED."""
    with SharedMemoryRegion.create(4096) as region:
        request = inference_pb2.RegisterSharedMemoryRequest(
            name="huge", key=region.key, offset=0, byte_size=(16 << 30) + 1
        )
        with pytest.raises(grpc.RpcError) as caught:
            _stub_call(daemon, "RegisterSharedMemory", request)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 17179869184 are allowed" in caught.value.details()


def test_empty_name_unregisters_nothing(daemon: Daemon, client: edgeinfer.Client) -> None:
    """UnregisterSharedMemory(name="") is INVALID_ARGUMENT and every region stays."""
    with SharedMemoryRegion.create(4096) as region:
        client.register_shared_memory(region)
        try:
            with pytest.raises(grpc.RpcError) as caught:
                _stub_call(
                    daemon, "UnregisterSharedMemory", inference_pb2.UnregisterSharedMemoryRequest()
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert region.name in client.list_shared_memory()
        finally:
            client.unregister_shared_memory(region)


def test_calls_without_a_peer_token_are_refused(daemon: Daemon) -> None:
    """Shared-memory calls with no token (so no known uid) are PERMISSION_DENIED, saying why."""
    with SharedMemoryRegion.create(4096) as region:
        request = inference_pb2.RegisterSharedMemoryRequest(
            name="x", key=region.key, offset=0, byte_size=4096
        )
        with pytest.raises(grpc.RpcError) as caught:
            _stub_call(daemon, "RegisterSharedMemory", request, token=False)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only for callers on this device's Unix socket" in caught.value.details()


def test_tcp_callers_get_permission_denied(start_daemon: StartDaemon, model_repo: Path) -> None:
    """Over TCP every shared-memory call is PERMISSION_DENIED, even with a valid token."""
    port = free_port()
    daemon = start_daemon(model_repo, f'tcp = "127.0.0.1:{port}"\n[management]\nallow = "unix"\n')
    token = peer_token(daemon.address)
    assert token
    with (
        SharedMemoryRegion.create(4096) as region,
        grpc.insecure_channel(f"127.0.0.1:{port}") as ch,
    ):
        stub = inference_pb2_grpc.InferenceStub(ch)
        metadata = (("edgeinfer-peer-token", token),)
        calls = [
            (
                stub.RegisterSharedMemory,
                inference_pb2.RegisterSharedMemoryRequest(
                    name="x", key=region.key, offset=0, byte_size=4096
                ),
            ),
            (stub.ListSharedMemory, inference_pb2.ListSharedMemoryRequest()),
            (
                stub.UnregisterSharedMemory,
                inference_pb2.UnregisterSharedMemoryRequest(name="x"),
            ),
        ]
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as caught:
                method(request, metadata=metadata, timeout=30)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "Unix socket" in caught.value.details()


# -- other users -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_daemon(model_repo: Path) -> Iterator[Daemon]:
    """A daemon whose socket folder and socket another user may reach."""
    workdir = short_tmpdir()
    workdir.chmod(0o755)
    config = f'repository = "{model_repo}"\n[listen]\nunix = "@SOCKET@"\nunix_mode = "0666"\n'
    daemon = Daemon(config, workdir).wait_ready()
    yield daemon
    daemon.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def as_nobody(daemon: Daemon, body: str) -> dict[str, object]:
    """Run ``body`` in a client process that has become uid/gid 65534; returns its JSON result.

    Everything is imported before the switch: the interpreter's own files may not be
    readable by that user.
    """
    prelude = textwrap.dedent(
        f"""
        import json, os, sys
        sys.path[:0] = [{str(ROOT / "client")!r}, {str(ROOT)!r}]
        import grpc, numpy as np, edgeinfer, edgeinfer.client, edgeinfer.tensors
        from edgeinfer.shm import SharedMemoryRegion
        from edgeinfer.v1 import inference_pb2
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        client = edgeinfer.Client({daemon.address!r}, timeout=30)
        result = {{}}
        def code_of(call):
            try:
                call()
            except edgeinfer.EdgeInferError as error:
                return [error.code.name, error.message]
            except grpc.RpcError as error:
                return [error.code().name, error.details()]
            return ["OK", ""]
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(body) + "\nprint(json.dumps(result))"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_another_users_object_is_refused(shared_daemon: Daemon) -> None:
    """A caller registering an object it does not own (root's 0600) gets PERMISSION_DENIED."""
    with SharedMemoryRegion.create(4096) as region:
        secret = np.frombuffer(b"secret!!" * 8, np.float32)
        with open(SHM_ROOT / region.name, "r+b") as f:
            f.write(secret.tobytes())
        result = as_nobody(
            shared_daemon,
            f"""
            result["register"] = code_of(lambda: client._stub.RegisterSharedMemory(
                inference_pb2.RegisterSharedMemoryRequest(
                    name="stolen", key={region.key!r}, offset=0, byte_size=4096),
                metadata=client._shm_metadata()))
            """,
        )
        assert (SHM_ROOT / region.name).read_bytes()[:64] == secret.tobytes()
    assert result["register"][0] == "PERMISSION_DENIED", result
    assert "belongs to uid 0" in str(result["register"][1])


def test_other_users_cannot_list_use_or_unregister_a_region(shared_daemon: Daemon) -> None:
    """Root's region is invisible to uid 65534: not listed, not usable, not unregistrable."""
    with shared_daemon.client(timeout=30) as owner, SharedMemoryRegion.create(4096) as region:
        owner.register_shared_memory(region)
        try:
            result = as_nobody(
                shared_daemon,
                f"""
                result["listed"] = client.list_shared_memory()
                fake = SharedMemoryRegion({region.name!r}, {region.key!r}, 4096, None)
                fake.registered = True
                fake.write_inputs = lambda inputs, request: (request.inputs.add(
                    name="x", dtype=edgeinfer.tensors.dtype_code(np.dtype("float32")),
                    shape=[1, 16],
                    shared_memory={{"region": {region.name!r}, "byte_size": 64}}), 64)[1]
                result["predict"] = code_of(lambda: client.predict(
                    "mlp", {{"x": np.ones((1, 16), np.float32)}}, shared_memory=fake))
                result["unregister"] = code_of(lambda: client.unregister_shared_memory(fake))
                """,
            )
            assert result["listed"] == []
            assert result["predict"][0] == "INVALID_ARGUMENT"
            assert "is not registered" in str(result["predict"][1])
            assert result["unregister"][0] == "INVALID_ARGUMENT"
            assert owner.list_shared_memory() == [region.name]
            owner.predict("mlp", {"x": np.ones((1, 16), np.float32)}, shared_memory=region)
        finally:
            owner.unregister_shared_memory(region)


TRUNCATED_BY_ANOTHER_PROCESS = """
import json, subprocess, sys
import numpy as np
import edgeinfer
from edgeinfer.shm import SHM_ROOT, SharedMemoryRegion
from edgeinfer.v1 import tensor_pb2

x = np.ones((1, 16), np.float32)
result = {}
with edgeinfer.Client(sys.argv[1], timeout=30) as client, SharedMemoryRegion.create(8192) as region:
    client.register_shared_memory(region)
    shm = {"shared_memory": region, "outputs": ["y"], "outputs_in_shared_memory": True}
    client.predict("mlp", {"x": x}, **shm)

    def truncate(size):  # another process of the same user
        subprocess.run(["truncate", "-s", str(size), str(SHM_ROOT / region.name)], check=True)

    truncate(0)
    try:
        client.predict("mlp", {"x": x}, **shm)
    except edgeinfer.EdgeInferError as error:
        result["predict"] = error.code.name
    truncate(0)
    output = tensor_pb2.Tensor(name="y", dtype=tensor_pb2.FLOAT32, shape=[1, 4])
    output.shared_memory.CopyFrom(
        tensor_pb2.SharedMemoryRef(region=region.name, offset=64, byte_size=16)
    )
    try:
        region.read(output)
    except ValueError as error:
        result["read"] = str(error)
    client.unregister_shared_memory(region)
print(json.dumps(result))
"""


def test_client_survives_its_region_truncated_by_another_process(daemon: Daemon) -> None:
    """Another process of the same user truncates the client's object: errors, not SIGBUS.

    The client runs in a child process, so that a client that mapped the object
    (and died of SIGBUS writing inputs or reading outputs) fails this test instead
    of killing pytest. The truncation is done by ``truncate(1)``, a real other process.
    """
    child = subprocess.run(
        [sys.executable, "-c", TRUNCATED_BY_ANOTHER_PROCESS, daemon.address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    result = json.loads(child.stdout)
    # Inputs were written past the cut (the object grew back to hold them); the daemon
    # then refused the output slice beyond the object's new end.
    assert result["predict"] == "INVALID_ARGUMENT"
    assert "needs bytes 64..80" in result["read"] and "which has 0 bytes" in result["read"]
    assert daemon.process.poll() is None
