"""One error boundary: an unexpected exception in any handler is INTERNAL with a request id.

The daemon is real, on a real socket, but started by a launcher that replaces
every edgeinfer.v1 and KServe V2 handler with one that raises RuntimeError
(there is no input that makes every handler fail on its own). Each method is
then called through a plain channel with an empty request. V2 messages come
from tritonclient's ``service_pb2`` (the same protocol; edgeinfer's own copy
cannot share the test process with it).

A second daemon, also real, has its data plane raise RuntimeError for calls
with the id "boom" only: on a v1 or V2 stream that message is answered
INTERNAL with its request id, and the messages around it are served.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2 as grpc_service_pb2

from edgeinfer.v1 import inference_pb2
from tests.conftest import Daemon, daemon_config, short_tmpdir

LAUNCHER = textwrap.dedent(
    """
    import sys
    from edgeinferd.protocol.kserve import GRPCInferenceServicer
    from edgeinferd.protocol.v1 import InferenceServicer
    from edgeinferd import cli

    def broken(name, streaming):
        if streaming:
            async def handler(self, request, context):
                raise RuntimeError(f"boom in {name}")
                yield
        else:
            async def handler(self, request, context):
                raise RuntimeError(f"boom in {name}")
        return handler

    for servicer, service in ((InferenceServicer, @V1@), (GRPCInferenceServicer, @V2@)):
        for name, streaming in service:
            setattr(servicer, name, broken(name, streaming))
    sys.exit(cli.main(sys.argv[1:]))
    """
)

SERVICES = [
    inference_pb2.DESCRIPTOR.services_by_name["Inference"],
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
]
METHODS = [(service, method) for service in SERVICES for method in service.methods]


@pytest.fixture(scope="module")
def broken_daemon(model_repo: Path) -> Iterator[Daemon]:
    workdir = short_tmpdir()
    v1, v2 = ([(m.name, m.server_streaming) for m in s.methods] for s in SERVICES)
    launcher = workdir / "launch.py"
    launcher.write_text(LAUNCHER.replace("@V1@", repr(v1)).replace("@V2@", repr(v2)))
    daemon = Daemon(daemon_config(model_repo), workdir, launcher=launcher).wait_ready()
    yield daemon
    daemon.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize(
    ("service", "method"), METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS]
)
def test_unexpected_error_in_any_handler_is_internal_with_a_request_id(
    broken_daemon: Daemon, service: object, method: object
) -> None:
    """Every method answers INTERNAL (never UNKNOWN) naming a request id the log also has."""
    full = f"/{service.full_name}/{method.name}"  # type: ignore[attr-defined]
    request_class = method.input_type._concrete_class  # type: ignore[attr-defined]
    with grpc.insecure_channel(broken_daemon.address) as channel:
        kwargs = {
            "request_serializer": request_class.SerializeToString,
            "response_deserializer": lambda data: data,
        }
        streaming_in = method.client_streaming  # type: ignore[attr-defined]
        streaming_out = method.server_streaming  # type: ignore[attr-defined]
        if streaming_in and streaming_out:
            call = lambda: list(channel.stream_stream(full, **kwargs)(iter([request_class()])))  # noqa: E731
        elif streaming_out:
            call = lambda: list(channel.unary_stream(full, **kwargs)(request_class()))  # noqa: E731
        else:
            call = lambda: channel.unary_unary(full, **kwargs)(request_class(), timeout=30)  # noqa: E731
        with pytest.raises(grpc.RpcError) as caught:
            call()
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL, (error.code(), error.details())
    found = re.search(r"request id '([^']+)'", error.details())
    assert found, error.details()
    assert "boom" not in error.details()  # the exception's text stays in the log
    log = broken_daemon.log_text()
    (line,) = [line for line in log.splitlines() if found.group(1) in line]
    assert f"boom in {method.name}" in line  # type: ignore[attr-defined]
    assert "Traceback" in line or '"exc_type": "RuntimeError"' in line


# -- an unexpected exception inside one message of a stream ---------------------------

MESSAGE_LAUNCHER = textwrap.dedent(
    """
    import sys
    from edgeinferd.dataplane import DataPlane
    from edgeinferd import cli

    original = DataPlane.start

    def start(self, request):
        if request.id == "boom":
            raise RuntimeError("boom in one message")
        return original(self, request)

    DataPlane.start = start
    sys.exit(cli.main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def message_daemon(model_repo: Path) -> Iterator[Daemon]:
    """A daemon whose data plane raises RuntimeError for a call with the id "boom" (no input
    makes the real data plane fail that way on its own); every other call is real."""
    workdir = short_tmpdir()
    launcher = workdir / "launch.py"
    launcher.write_text(MESSAGE_LAUNCHER)
    daemon = Daemon(daemon_config(model_repo), workdir, launcher=launcher).wait_ready()
    yield daemon
    daemon.stop()
    shutil.rmtree(workdir, ignore_errors=True)


#: The adder's inputs (int64, any length).
VALUES = [1, 2, 3]


def test_an_unexpected_error_in_one_v1_stream_message_is_internal_and_the_stream_goes_on(
    message_daemon: Daemon,
) -> None:
    import numpy as np

    from edgeinfer.client import build_request
    from edgeinfer.v1 import inference_pb2_grpc

    x = np.array(VALUES, np.int64)
    requests = [build_request("adder", {"a": x, "b": x}, request_id=i) for i in ("a", "boom", "c")]
    with grpc.insecure_channel(message_daemon.address) as channel:
        answers = list(inference_pb2_grpc.InferenceStub(channel).PredictStream(iter(requests)))
    assert [a.id for a in answers] == ["a", "boom", "c"]
    assert [a.WhichOneof("result") for a in answers] == ["response", "error", "response"]
    error = answers[1].error
    assert error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "request id 'boom'" in error.message and "boom in one message" not in error.message
    assert "boom in one message" in message_daemon.log_text()  # with its traceback


def test_an_unexpected_error_in_one_v2_stream_message_is_internal_and_the_stream_goes_on(
    message_daemon: Daemon,
) -> None:
    import numpy as np

    x = np.array(VALUES, np.int64)
    messages = []
    for request_id in ("a", "boom", "c"):
        message = grpc_service_pb2.ModelInferRequest(model_name="adder", id=request_id)
        for name in ("a", "b"):
            message.inputs.add(name=name, datatype="INT64", shape=list(x.shape))
            message.raw_input_contents.append(x.tobytes())
        messages.append(message)
    with grpc.insecure_channel(message_daemon.address) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=grpc_service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=grpc_service_pb2.ModelStreamInferResponse.FromString,
        )
        answers = list(stream(iter(messages)))
    assert [a.infer_response.id for a in answers] == ["a", "boom", "c"]
    assert [a.error_message == "" for a in answers] == [True, False, True]
    assert "request id 'boom'" in answers[1].error_message
    status = answers[1].infer_response.parameters["edgeinfer_status"].string_param
    assert status == "INTERNAL"
