"""Transport-level garbage: undecodable bytes, truncated frames, raw HTTP/2 junk, big messages."""

from __future__ import annotations

import os
import shutil
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from edgeinfer.client import build_request
from tests import models
from tests.conftest import Daemon, daemon_config, short_tmpdir
from tests.reliability_helpers import (
    MODEL_INFER,
    MODEL_STREAM_INFER,
    PREDICT,
    PREDICT_STREAM,
    figure,
    health_status,
    raw_stream,
    raw_unary,
    rss_kib,
    thread_count,
    wait_for,
)

LIMIT = 1024 * 1024
#: Thread and memory growth allowed after the raw-socket garbage.
RSS_BOUND_KIB = 32 * 1024
X = np.ones((2, 16), np.float32)

UNDECODABLE = [
    b"\xff\xff\xff\xff",  # a field number of zero and a truncated varint
    b"\x0a\x05ml",  # a length past the end
    b"\x0a\x02\xc3\x28",  # invalid UTF-8 in field 1 (a string in every request below)
    b"\x0b",  # a start-group tag with no end
    b"\x0a\xff\xff\xff\xff\x0f",  # a 4 GiB length
]
UNARY_METHODS = [
    PREDICT,
    "/edgeinfer.v1.Inference/GetModel",
    "/edgeinfer.v1.Inference/LoadModel",
    "/edgeinfer.v1.Inference/UnloadModel",
    "/edgeinfer.v1.Inference/RegisterSharedMemory",
    MODEL_INFER,
    "/inference.GRPCInferenceService/ModelMetadata",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/grpc.health.v1.Health/Check",
]
STREAM_METHODS = [PREDICT_STREAM, MODEL_STREAM_INFER]


@pytest.fixture(scope="module")
def small_limit_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon serving the MLP with a 1 MiB message limit."""
    repo = tmp_path_factory.mktemp("repo")
    models.add_mlp(repo)
    extra = f"max_message_bytes = {LIMIT}\n"
    process = Daemon(daemon_config(repo, extra), short_tmpdir()).wait_ready()
    yield process
    process.stop()
    shutil.rmtree(process.workdir, ignore_errors=True)


def code_of_call(call: grpc.UnaryUnaryMultiCallable, payload: bytes) -> grpc.StatusCode:
    try:
        call(payload, timeout=30)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_undecodable_bytes_are_invalid_argument_on_every_method(daemon: Daemon) -> None:
    """Bytes that are not the method's message get INVALID_ARGUMENT, unary or streamed."""
    codes: Counter[str] = Counter()
    with grpc.insecure_channel(daemon.address) as channel:
        for method in UNARY_METHODS:
            for payload in UNDECODABLE:
                code = code_of_call(raw_unary(channel, method), payload)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, payload)
                codes[code.name] += 1
        for method in STREAM_METHODS:
            for payload in UNDECODABLE:
                with pytest.raises(grpc.RpcError) as caught:
                    list(raw_stream(channel, method)(iter([payload]), timeout=30))
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                codes[caught.value.code().name] += 1
        assert health_status(channel) == "SERVING"
    figure("transport.undecodable", calls=sum(codes.values()), codes=dict(codes))


def test_every_truncation_of_a_request_gets_a_client_code(daemon: Daemon) -> None:
    """Each prefix of a valid v1 and V2 request is answered OK or with a client-mistake code."""
    v1 = build_request("mlp", {"x": X}, request_id="cut").SerializeToString()
    v2_message = service_pb2.ModelInferRequest(model_name="mlp", id="cut")
    v2_message.inputs.add(name="x", datatype="FP32", shape=[2, 16])
    v2_message.raw_input_contents.append(X.tobytes())
    v2 = v2_message.SerializeToString()
    allowed = {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    }
    codes: Counter[str] = Counter()
    with grpc.insecure_channel(daemon.address) as channel:
        for method, payload in ((PREDICT, v1), (MODEL_INFER, v2)):
            call = raw_unary(channel, method)
            futures = [call.future(payload[:cut], timeout=60) for cut in range(len(payload))]
            for cut, future in enumerate(futures):
                try:
                    future.result()
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                assert code in allowed, (method, cut, code)
                codes[code.name] += 1
            assert code_of_call(call, payload) == grpc.StatusCode.OK
        assert health_status(channel) == "SERVING"
    figure("transport.truncated", prefixes=sum(codes.values()), codes=dict(codes))
    assert codes["INVALID_ARGUMENT"] > len(v1) // 2


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return size.to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


GARBAGE = {
    "random bytes": os.urandom(4096),
    "HTTP/1.1 request": b"GET / HTTP/1.1\r\nHost: edgeinfer\r\n\r\n",
    "preface, then hang up": PREFACE,
    "half a preface": PREFACE[:10],
    "unknown frame type": PREFACE + EMPTY_SETTINGS + frame(0xEE, 0, 1, os.urandom(64)),
    "HEADERS with junk HPACK": PREFACE + EMPTY_SETTINGS + frame(1, 4, 1, os.urandom(40)),
    "frame longer than the max": PREFACE + EMPTY_SETTINGS + frame(0, 0, 1, b"x", 0xFFFFFF),
    "DATA on stream 0": PREFACE + EMPTY_SETTINGS + frame(0, 1, 0, b"\0" * 16),
    "SETTINGS of odd length": PREFACE + frame(4, 0, 0, b"\0" * 5),
    "WINDOW_UPDATE of zero": PREFACE + EMPTY_SETTINGS + frame(8, 0, 0, b"\0\0\0\0"),
    "RST_STREAM on an idle stream": PREFACE + EMPTY_SETTINGS + frame(3, 0, 7, b"\0\0\0\x08"),
    "HEADERS truncated mid-frame": PREFACE + EMPTY_SETTINGS + frame(1, 4, 1, b"\x82\x86", 200),
}


def send_raw(path: Path, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except OSError:  # the daemon hung up on us: the point
            pass


def test_raw_http2_garbage_leaves_the_daemon_serving(small_limit_daemon: Daemon) -> None:
    """Garbage, half frames and idle connections on the socket leave no threads or memory behind."""
    daemon = small_limit_daemon
    pid = daemon.process.pid
    with daemon.client(timeout=30) as client:
        client.predict("mlp", {"x": X})
        for data in GARBAGE.values():  # once to warm up whatever is allocated lazily
            send_raw(daemon.socket, data)
        threads_before, rss_before = thread_count(pid), rss_kib(pid)
        rounds = 20
        for _ in range(rounds):
            for data in GARBAGE.values():
                send_raw(daemon.socket, data)
        idle = []
        for _ in range(200):  # connections that never say anything
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemon.socket))
            idle.append(sock)
        assert client.predict("mlp", {"x": X})["y"].shape == (2, 4)
        for sock in idle:
            sock.close()
        # Whatever the connections started must go again: waited for, not timed.
        assert wait_for(lambda: thread_count(pid) <= threads_before, timeout=60), (
            thread_count(pid),
            threads_before,
        )
        threads_after, rss_after = thread_count(pid), rss_kib(pid)
        assert client.health() == "SERVING"
        assert client.predict("mlp", {"x": X})["y"].shape == (2, 4)
    figure(
        "transport.raw_socket",
        garbage_connections=rounds * len(GARBAGE),
        kinds=len(GARBAGE),
        idle_connections=200,
        threads_before=threads_before,
        threads_after=threads_after,
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
    )
    assert rss_after - rss_before < RSS_BOUND_KIB


def test_messages_over_the_configured_limit_are_resource_exhausted(
    small_limit_daemon: Daemon,
) -> None:
    """With max_message_bytes = 1 MiB, bigger v1, V2 and streamed requests: RESOURCE_EXHAUSTED."""
    big = np.zeros((32, 16 * 1024), np.float32)  # 2 MiB
    v1 = build_request("mlp", {"x": big}).SerializeToString()
    v2_message = service_pb2.ModelInferRequest(model_name="mlp")
    v2_message.inputs.add(name="x", datatype="FP32", shape=list(big.shape))
    v2_message.raw_input_contents.append(big.tobytes())
    v2 = v2_message.SerializeToString()
    options = [("grpc.max_send_message_length", 64 * LIMIT)]
    with grpc.insecure_channel(small_limit_daemon.address, options=options) as channel:
        for method, payload in ((PREDICT, v1), (MODEL_INFER, v2)):
            assert code_of_call(raw_unary(channel, method), payload) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED
            )
        small = build_request("mlp", {"x": X}).SerializeToString()
        for method, payload in ((PREDICT_STREAM, v1), (MODEL_STREAM_INFER, v2)):
            with pytest.raises(grpc.RpcError) as caught:
                list(raw_stream(channel, method)(iter([small, payload]), timeout=30))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of_call(raw_unary(channel, PREDICT), small) == grpc.StatusCode.OK
