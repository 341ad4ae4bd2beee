"""The stream pipeline's bounds: per stream, and per connection.

The per-stream tests are transport-free on purpose: ``finish`` blocks on a
gate, standing for a caller that never reads its answers, and the test counts
how many messages were started meanwhile. The per-connection budget is shown
on a real daemon over TCP, through the real client, with the bytes the daemon
holds read from its own ``/metrics`` gauges.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

import edgeinfer
from edgeinfer.client import build_request
from edgeinfer.v1 import inference_pb2_grpc
from edgeinferd.budgets import CONNECTION_STREAM_BYTES, LOCAL_STREAM_BYTES, ByteBudget
from edgeinferd.protocol.streams import STREAM_PIPELINE_BYTES, answer_in_order
from tests import models
from tests.conftest import StartDaemon
from tests.reliability_helpers import figure, free_port, wait_for

MESSAGE = 2 << 20  # bytes


async def _messages(count: int, size: int) -> AsyncIterator[int]:
    for _ in range(count):
        yield size


async def _idle() -> None:
    """Let every ready task run until it blocks (asyncio runs ready callbacks in order,
    so a fixed number of loop turns is deterministic, not a guess at speed)."""
    for _ in range(1000):
        await asyncio.sleep(0)


def _run(count: int, size: int) -> tuple[int, list[int]]:
    """Messages started while the first answer is held; then every answer, in order."""

    async def main() -> tuple[int, list[int]]:
        gate = asyncio.Event()
        started: list[int] = []

        def start(message: int) -> int:
            started.append(message)
            return len(started)

        async def finish(index: int) -> int:
            if index == 1:
                await gate.wait()  # the caller is not reading answers
            return index

        answers: list[int] = []

        async def consume() -> None:
            async for answer in answer_in_order(
                _messages(count, size), start, finish, lambda _: None, size=lambda m: m
            ):
                answers.append(answer)

        task = asyncio.create_task(consume())
        await _idle()
        held = len(started)
        gate.set()
        await task
        return held, answers

    return asyncio.run(main())


def test_a_stream_holds_its_byte_budget_not_64_messages() -> None:
    """With 2 MiB messages, at most 16 MiB of them are started while an answer is held."""
    held, answers = _run(40, MESSAGE)
    assert held == STREAM_PIPELINE_BYTES // MESSAGE
    assert answers == list(range(1, 41))


def test_small_messages_are_bounded_by_the_depth() -> None:
    """Tiny messages still stop at the pipeline depth (64)."""
    held, answers = _run(200, 10)
    assert held == 64
    assert answers == list(range(1, 201))


def test_a_message_larger_than_the_budget_runs_alone() -> None:
    """A message over the budget is not refused: it runs once nothing else is in flight."""
    held, answers = _run(3, STREAM_PIPELINE_BYTES * 2)
    assert held == 1
    assert answers == [1, 2, 3]


def test_a_release_into_a_full_budget_wakes_only_its_own_stream() -> None:
    """100 streams wait on a full shared budget; another stream's answer gives bytes back
    but leaves it full: only that stream's own reader is woken (it now holds nothing), not
    the hundred, each of which would look again. Once there is room, all of them go on."""
    looks = [0]

    def holds_something() -> bool:
        looks[0] += 1  # a woken stream looks again
        return False

    async def main() -> tuple[int, int, bool]:
        budget = ByteBudget(limit=10)
        budget.take(20)  # full
        waiting = [
            asyncio.ensure_future(budget.wait_for_room(object(), holds_something))
            for _ in range(100)
        ]
        own = object()
        own_holds = [5]
        mine = asyncio.ensure_future(budget.wait_for_room(own, lambda: own_holds[0] == 0))
        await _idle()
        before = looks[0]
        own_holds[0] = 0
        budget.release(5, own)  # 15 held: still full
        await _idle()
        looked_while_full = looks[0] - before
        budget.release(15)  # room now
        await _idle()
        return looked_while_full, sum(task.done() for task in waiting), mine.done()

    looked_while_full, went_on_with_room, mine = asyncio.run(main())
    assert mine
    assert looked_while_full == 0
    assert went_on_with_room == 100


# -- the per-connection budget, on a real daemon -------------------------------------

#: int64 elements per input: two inputs make one 2 MiB request (and a 2 MiB answer).
ELEMENTS = 1 << 17
#: Streams one connection opens, and the messages each offers (more than it may hold).
STREAMS_PER_CONNECTION = 4
#: Messages each stream offers (2 MiB each). As with LOCAL_OFFERED below: a stream's
#: bytes count until answered, and answers (1 MiB each) go on being written until the
#: unread connection's flow-control windows are full; with 12 messages the KServe V2
#: stream had 8 answered first once, leaving 8 MiB of its 16 MiB bound. 24 leave
#: enough either way.
OFFERED = 24


def gauges(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("edgeinfer_stream_"):
            name, value = line.split()
            values[name] = float(value)
    return values


def unread_stream(stub: inference_pb2_grpc.InferenceStub, count: int) -> grpc.Future:
    """A stream of ``count`` 2 MiB requests; no answer is read.

    The first connection's streams use the real client's own stub rather than
    ``Client.stream``, whose generator starts the call only when its first answer
    is asked for: a stream opened on a connection whose budget is full has no
    message read, so it has no first answer.
    """
    a = np.arange(ELEMENTS, dtype=np.int64)
    requests = (build_request("adder", {"a": a, "b": a}) for _ in range(count))
    # wait_for_ready: a channel still connecting must not fail the stream at once.
    call: grpc.Future = stub.PredictStream(requests, timeout=120, wait_for_ready=True)
    return call


def unread_v2_stream(channel: grpc.Channel, count: int) -> grpc.Future:
    """The same requests on a KServe V2 ``ModelStreamInfer`` stream; no answer is read."""
    from tritonclient.grpc import service_pb2

    a = np.arange(ELEMENTS, dtype=np.int64)
    message = service_pb2.ModelInferRequest(model_name="adder")
    for name in ("a", "b"):
        message.inputs.add(name=name, datatype="INT64", shape=[ELEMENTS])
        message.raw_input_contents.append(a.tobytes())
    infer = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=service_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
    )
    call: grpc.Future = infer((message for _ in range(count)), timeout=120, wait_for_ready=True)
    return call


def test_a_connections_streams_share_one_byte_budget(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Four streams on one TCP connection, answers unread, hold the connection's budget
    (plus at most one message per stream), not four times the per-stream bound;
    a second connection (a KServe V2 stream) has a budget of its own; the bookkeeping
    empties when they end."""
    repo = tmp_path / "repo"
    models.add_adder(repo)
    tcp, metrics = free_port(), free_port()
    daemon = start_daemon(
        repo, f'tcp = "127.0.0.1:{tcp}"\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
    )
    a = np.arange(ELEMENTS, dtype=np.int64)
    message = build_request("adder", {"a": a, "b": a}).ByteSize()
    # Below its budget, each of the connection's streams may read one more message.
    bound = CONNECTION_STREAM_BYTES + STREAMS_PER_CONNECTION * message
    with edgeinfer.Client(f"127.0.0.1:{tcp}", timeout=60) as first:
        streams = [unread_stream(first._stub, OFFERED) for _ in range(STREAMS_PER_CONNECTION)]
        # The connection's streams stop reading once it holds its budget.
        assert wait_for(
            lambda: gauges(metrics)["edgeinfer_stream_request_bytes"] >= CONNECTION_STREAM_BYTES,
            timeout=60,
        ), (gauges(metrics), [(c.done(), c.done() and c.code()) for c in streams])
        # A second connection, for sure: gRPC lets channels to one address share theirs.
        with grpc.insecure_channel(
            f"127.0.0.1:{tcp}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            other = unread_v2_stream(channel, OFFERED)
            # Its one KServe V2 stream fills its own bound in its own connection's budget
            # (the gauges count only streams that have one), beside the first.
            assert wait_for(
                lambda: (
                    gauges(metrics)["edgeinfer_stream_request_bytes"]
                    - gauges(metrics)["edgeinfer_stream_connection_request_bytes_max"]
                    >= STREAM_PIPELINE_BYTES
                ),
                timeout=60,
            ), gauges(metrics)
            held = gauges(metrics)
            for call in [*streams, other]:
                call.cancel()
            assert wait_for(lambda: gauges(metrics)["edgeinfer_stream_connections"] == 0)
            after = gauges(metrics)
    figure(
        "streams.connection_budget",
        streams=STREAMS_PER_CONNECTION,
        message_bytes=message,
        offered_per_stream=OFFERED * message,
        held_by_first_connection=int(held["edgeinfer_stream_connection_request_bytes_max"]),
        held_in_all=int(held["edgeinfer_stream_request_bytes"]),
        bound=bound,
        per_stream_bounds_alone=STREAMS_PER_CONNECTION * (STREAM_PIPELINE_BYTES + message),
        connections_after=int(after["edgeinfer_stream_connections"]),
        bytes_after=int(after["edgeinfer_stream_request_bytes"]),
    )
    assert held["edgeinfer_stream_connection_request_bytes_max"] <= bound
    assert held["edgeinfer_stream_connections"] == 2
    assert after["edgeinfer_stream_request_bytes"] == 0
    with daemon.client(timeout=30) as client:  # still serving
        a = np.arange(3, dtype=np.int64)
        assert client.predict("adder", {"a": a, "b": a})["sum"].tolist() == [0, 2, 4]


#: Streams the Unix-socket test leaves unread: their per-stream bounds alone would
#: hold more than the local budget.
LOCAL_STREAMS = 6
#: Messages each of them offers. A stream's bytes count until answered, and answers go
#: on being written until the unread connection's flow-control windows are full: with
#: 12 messages (24 MiB), up to 8 of a stream's could be answered first, leaving its 4
#: unanswered ones (6 streams x 8 MiB) short of the budget. 24 leave enough either way.
LOCAL_OFFERED = 24


def test_unix_socket_streams_share_the_local_budget_and_each_keeps_moving(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Six streams on the Unix socket, answers unread, hold the local budget (plus at most
    one message each), not six times the per-stream bound. With the budget full, a
    seventh stream on its own connection, read by its caller, still has every message
    answered, one at a time; the bookkeeping empties when they end."""
    repo = tmp_path / "repo"
    models.add_adder(repo)
    metrics = free_port()
    daemon = start_daemon(repo, f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n')
    a = np.arange(ELEMENTS, dtype=np.int64)
    message = build_request("adder", {"a": a, "b": a}).ByteSize()
    bound = LOCAL_STREAM_BYTES + LOCAL_STREAMS * message
    assert bound < LOCAL_STREAMS * STREAM_PIPELINE_BYTES  # the test can tell them apart
    with grpc.insecure_channel(f"unix:{daemon.socket}") as stalled:
        stub = inference_pb2_grpc.InferenceStub(stalled)
        streams = [unread_stream(stub, LOCAL_OFFERED) for _ in range(LOCAL_STREAMS)]
        assert wait_for(
            lambda: gauges(metrics)["edgeinfer_stream_local_request_bytes"] >= LOCAL_STREAM_BYTES,
            timeout=60,
        ), (gauges(metrics), [(c.done(), c.done() and c.code()) for c in streams])
        # Another local caller, on a connection of its own, reading its answers.
        with grpc.insecure_channel(
            f"unix:{daemon.socket}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as reading:
            small = np.arange(3, dtype=np.int64)
            requests = (build_request("adder", {"a": small, "b": small}) for _ in range(5))
            answers = list(
                inference_pb2_grpc.InferenceStub(reading).PredictStream(requests, timeout=60)
            )
        assert [answer.WhichOneof("result") for answer in answers] == ["response"] * 5
        held = gauges(metrics)
        for call in streams:
            call.cancel()
        assert wait_for(lambda: gauges(metrics)["edgeinfer_stream_connections"] == 0)
        after = gauges(metrics)
    figure(
        "streams.local_budget",
        streams=LOCAL_STREAMS,
        message_bytes=message,
        offered_per_stream=LOCAL_OFFERED * message,
        held_on_the_unix_socket=int(held["edgeinfer_stream_local_request_bytes"]),
        bound=bound,
        per_stream_bounds_alone=LOCAL_STREAMS * (STREAM_PIPELINE_BYTES + message),
        other_stream_answers=len(answers),
        bytes_after=int(after["edgeinfer_stream_request_bytes"]),
    )
    assert held["edgeinfer_stream_local_request_bytes"] <= bound
    assert after["edgeinfer_stream_request_bytes"] == 0
