"""Helpers for the reliability tests: process figures, raw gRPC calls, certificates, models.

Every figure a reliability test measures is printed as one ``FIGURE`` line, so
``pytest -s`` shows the numbers that docs/reliability.md quotes.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from tests.gate import Gate
from tests.models import NEVER_INLINE, scalar_config, write_model

PREDICT = "/edgeinfer.v1.Inference/Predict"
PREDICT_STREAM = "/edgeinfer.v1.Inference/PredictStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"

#: Status codes that name a caller's mistake (or the model's state), never the daemon's fault.
CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


def figure(name: str, **values: object) -> None:
    """Print one measured figure (shown with ``pytest -s``)."""
    print(f"\nFIGURE {name}: " + ", ".join(f"{key}={value}" for key, value in values.items()))


def rss_kib(pid: int) -> int:
    """The process's resident set size, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def code_of(value: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == value)


def health_status(channel: grpc.Channel, service: str = "") -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def raw_unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    """A call that sends and receives bytes as they are (no protobuf on this side)."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def raw_stream(channel: grpc.Channel, method: str) -> grpc.StreamStreamMultiCallable:
    return channel.stream_stream(method, request_serializer=None, response_deserializer=None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def code_of_future(future: grpc.Future) -> grpc.StatusCode:
    """The status a finished (or finishing) call ended with."""
    try:
        future.result()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its SHA-256 (and every folder), to compare before/after."""
    result = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        result[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return result


# -- a model that counts its forward passes ------------------------------------


class Counter(nn.Module):
    """Counts its forward passes in a buffer and returns the count; waits on a gate for ``x > 0``.

    Calling it with ``x = 0`` reads the count back (that call included), so a
    test can prove which calls reached the model and which were dropped. A
    call with ``x > 0`` holds its forward pass until the test opens ``gate``
    (``tests.gate``), so the test decides when the one instance is free again.
    """

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(1, dtype=torch.float32))
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1.0)
        if bool(x[0, 0] > 0):
            x = torch.ops.edgeinfer_test.gate(x, self.gate)
        return x * 0 + self.calls


def add_counter(repo: Path, gate: Gate, name: str = "counter", queue: int = 1024) -> None:
    """The counter model; its daemon must start with ``tests.gate``'s launcher. Its passes
    block on the gate, so none may run on the event loop."""
    tables = f"[batching]\nmax_queue_size = {queue}\n[instances]\ncount = 1\n{NEVER_INLINE}"
    folder = write_model(repo, name, scalar_config(1, tables))
    torch.jit.script(Counter(str(gate.path))).save(str(folder / "model.pt"))


# -- certificates (openssl command line) -------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    return cert, key


def make_cert(folder: Path, name: str, ca: tuple[Path, Path], server: bool) -> tuple[Path, Path]:
    """A P-256 key and a certificate for ``name`` signed by ``ca`` (cert, key)."""
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    extensions = folder / f"{name}.ext"
    if server:
        extensions.write_text(
            "subjectAltName = DNS:localhost, IP:127.0.0.1\nextendedKeyUsage = serverAuth\n"
        )
    else:
        extensions.write_text("extendedKeyUsage = clientAuth\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions),
        cwd=folder,
    )  # fmt: skip
    return cert, key
