"""Overload and deadlines: bounded queues, dropped expired calls, freed slots, bounded latency.

The ``counter`` model counts its forward passes in a buffer (read back with a
call of ``x = 0``), so these tests prove which calls reached the model.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

import edgeinfer
from edgeinfer.client import build_request
from edgeinfer.v1 import inference_pb2 as pb
from edgeinfer.v1 import inference_pb2_grpc
from tests.conftest import Daemon, StartDaemon
from tests.reliability_helpers import (
    MODEL_INFER,
    add_counter,
    code_of_future,
    figure,
    raw_stream,
    rss_kib,
    wait_for,
)

#: Rounds of a 256x256 matmul that keep the one instance busy for a couple of seconds.
BLOCK_ROUNDS = 10000


def spin(rounds: int, request_id: str = "") -> pb.PredictRequest:
    return build_request(
        "counter", {"x": np.full((1, 1), rounds, np.float32)}, request_id=request_id
    )


def count(client: edgeinfer.Client) -> int:
    """Forward passes so far, this reading included."""
    return int(client.predict("counter", {"x": np.zeros((1, 1), np.float32)})["y"][0, 0])


def queue_state(client: edgeinfer.Client) -> tuple[int, int]:
    """(queued, queued + running) of the counter model."""
    for model in client.get_stats().models:
        if model.model == "counter" and model.version == "1":
            return model.queued, model.in_flight
    return 0, 0


def counter_daemon(start_daemon: StartDaemon, tmp_path: Path, queue: int) -> Daemon:
    repo = tmp_path / "repo"
    add_counter(repo, queue=queue)
    return start_daemon(repo)


@dataclass
class Busy:
    """A counter daemon whose one instance is busy with a long forward pass (``blocker``)."""

    client: edgeinfer.Client
    channel: grpc.Channel
    stub: inference_pb2_grpc.InferenceStub
    #: Forward passes before the blocker, so ``passes_since()`` counts what ran after.
    before: int
    blocker: grpc.Future

    def passes_since(self) -> int:
        """Forward passes since the blocker was sent, the blocker and this reading excluded."""
        return count(self.client) - self.before - 1


@contextmanager
def busy(daemon: Daemon) -> Iterator[Busy]:
    """Send a long call and wait until it runs with nothing queued behind it."""
    with daemon.client(timeout=60) as client, grpc.insecure_channel(daemon.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        before = count(client)
        blocker = stub.Predict.future(spin(BLOCK_ROUNDS), timeout=120)
        assert wait_for(lambda: queue_state(client) == (0, 1))
        yield Busy(client, channel, stub, before, blocker)


def test_full_queue_refuses_new_calls_at_once(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Past max_queue_size, calls get RESOURCE_EXHAUSTED while the model is still busy."""
    daemon = counter_daemon(start_daemon, tmp_path, queue=4)
    with busy(daemon) as b:
        calls = [b.stub.Predict.future(spin(0, f"c{i}"), timeout=120) for i in range(20)]
        assert wait_for(lambda: sum(f.done() for f in calls) >= 16)
        still_running = not b.blocker.done()
        rejected = [f for f in calls if f.done()]
        codes = Counter(code_of_future(f).name for f in calls)
        assert code_of_future(b.blocker) == grpc.StatusCode.OK
        ran = b.passes_since()
    figure("overload.queue_full", calls=20, max_queue_size=4, codes=dict(codes), model_ran=ran)
    assert still_running  # every refusal came back while the forward pass was still running
    assert len(rejected) == 16
    assert codes == {"OK": 4, "RESOURCE_EXHAUSTED": 16}
    assert ran == 1 + 4  # the blocker and the four admitted calls


def test_expired_calls_are_dropped_without_running(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Calls whose deadline passes while queued get DEADLINE_EXCEEDED and never reach the model."""
    daemon = counter_daemon(start_daemon, tmp_path, queue=64)
    with busy(daemon) as b:
        # gRPC deadlines (the call is cancelled on both sides when it passes) ...
        v1 = [b.stub.Predict.future(spin(0), timeout=0.3) for _ in range(5)]
        # ... and V2's timeout parameter, enforced by the daemon alone when the call's turn comes.
        infer = b.channel.unary_unary(
            MODEL_INFER,
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        v2 = []
        for _ in range(5):
            message = service_pb2.ModelInferRequest(model_name="counter")
            message.parameters["timeout"].int64_param = 300_000  # microseconds
            message.inputs.add(name="x", datatype="FP32", shape=[1, 1])
            message.raw_input_contents.append(np.zeros((1, 1), np.float32).tobytes())
            v2.append(infer.future(message, timeout=120))
        assert wait_for(lambda: queue_state(b.client)[0] == 5)  # the V2 calls wait their turn
        v1_codes = Counter(code_of_future(f).name for f in v1)
        assert not b.blocker.done()
        assert code_of_future(b.blocker) == grpc.StatusCode.OK
        v2_codes = Counter(code_of_future(f).name for f in v2)
        ran = b.passes_since()
    figure(
        "overload.deadlines",
        expired_grpc_deadline=dict(v1_codes),
        expired_v2_timeout=dict(v2_codes),
        model_ran=ran,
    )
    assert v1_codes == {"DEADLINE_EXCEEDED": 5}
    assert v2_codes == {"DEADLINE_EXCEEDED": 5}
    assert ran == 1  # the blocker only


def test_cancelled_calls_and_closed_streams_free_their_slots(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Cancelling queued calls or closing a stream frees its queue slots; those calls never run."""
    daemon = counter_daemon(start_daemon, tmp_path, queue=2)
    with busy(daemon) as b:
        queued = [b.stub.Predict.future(spin(0), timeout=120) for _ in range(2)]
        assert wait_for(lambda: queue_state(b.client)[0] == 2)
        assert code_of_future(b.stub.Predict.future(spin(0), timeout=30)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        for future in queued:
            future.cancel()
        assert wait_for(lambda: queue_state(b.client)[0] == 0)

        release = threading.Event()

        def messages() -> Iterator[bytes]:
            yield spin(0).SerializeToString()
            yield spin(0).SerializeToString()
            release.wait(60)

        stream = raw_stream(b.channel, "/edgeinfer.v1.Inference/PredictStream")(
            messages(), timeout=120
        )
        assert wait_for(lambda: queue_state(b.client)[0] == 2)
        stream.cancel()
        release.set()
        assert wait_for(lambda: queue_state(b.client)[0] == 0)

        admitted = [b.stub.Predict.future(spin(0), timeout=120) for _ in range(2)]
        assert wait_for(lambda: queue_state(b.client)[0] == 2)
        refused = code_of_future(b.stub.Predict.future(spin(0), timeout=30))
        assert not b.blocker.done()
        codes = [code_of_future(f).name for f in (b.blocker, *admitted)]
        ran = b.passes_since()
    figure("overload.freed_slots", cancelled=2, stream_messages_closed=2, model_ran=ran)
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED  # the limit still holds
    assert codes == ["OK", "OK", "OK"]
    assert ran == 3  # blocker and the two admitted calls; none of the cancelled ones


#: Per-call work of the load test, queue depth and load factor.
LOAD_ROUNDS = 40
LOAD_QUEUE = 8
LOAD_FACTOR = 4
LOAD_SECONDS = 3.0
#: Admitted calls wait for at most LOAD_QUEUE calls ahead; the bound is generous for a noisy
#: 2-core machine, and far below the backlog an unbounded queue would build (printed).
LATENCY_BOUND_S = 2.0
RSS_BOUND_KIB = 32 * 1024


async def closed_loop(address: str, seconds: float, concurrency: int) -> list[float]:
    """Calls per worker back to back; the latencies of successful calls."""
    latencies: list[float] = []
    request = spin(LOAD_ROUNDS)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        end = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < end:
                started = time.monotonic()
                await stub.Predict(request, timeout=30)
                latencies.append(time.monotonic() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def open_loop(address: str, rate: float, seconds: float) -> list[tuple[str, float]]:
    """Calls started at a fixed rate whatever happens to them: (code, latency) each."""
    results: list[tuple[str, float]] = []
    request = spin(LOAD_ROUNDS)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one() -> None:
            started = time.monotonic()
            try:
                await stub.Predict(request, timeout=30)
                code = "OK"
            except grpc.aio.AioRpcError as error:
                code = error.code().name
            results.append((code, time.monotonic() - started))

        tasks = []
        begin = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - begin < seconds:
            due = int((now - begin) * rate) + 1
            while sent < due:
                tasks.append(asyncio.create_task(one()))
                sent += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    return results


def test_overload_keeps_admitted_latency_bounded(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """At 4x capacity, admitted calls keep a bounded latency, the rest are refused, memory stays."""
    daemon = counter_daemon(start_daemon, tmp_path, queue=LOAD_QUEUE)
    pid = daemon.process.pid
    service = asyncio.run(closed_loop(daemon.address, 1.5, 1))
    capacity = len(service) / 1.5
    rss_before = rss_kib(pid)
    results = asyncio.run(open_loop(daemon.address, LOAD_FACTOR * capacity, LOAD_SECONDS))
    rss_after = rss_kib(pid)
    codes = Counter(code for code, _ in results)
    admitted = sorted(latency for code, latency in results if code == "OK")
    p50 = admitted[len(admitted) // 2]
    p99 = admitted[int(len(admitted) * 0.99)]
    unbounded_backlog_s = (LOAD_FACTOR - 1) * LOAD_SECONDS
    with daemon.client(timeout=30) as client:
        after = []
        for _ in range(20):
            started = time.monotonic()
            client.predict("counter", {"x": np.full((1, 1), LOAD_ROUNDS, np.float32)})
            after.append(time.monotonic() - started)
    figure(
        "overload.load",
        service_ms_median=round(statistics.median(service) * 1000, 2),
        capacity_per_s=round(capacity),
        offered_per_s=round(LOAD_FACTOR * capacity),
        seconds=LOAD_SECONDS,
        sent=len(results),
        codes=dict(codes),
        admitted_p50_ms=round(p50 * 1000, 1),
        admitted_p99_ms=round(p99 * 1000, 1),
        admitted_max_ms=round(admitted[-1] * 1000, 1),
        unbounded_queue_backlog_s=unbounded_backlog_s,
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
        after_load_median_ms=round(statistics.median(after) * 1000, 2),
    )
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert codes["RESOURCE_EXHAUSTED"] > 0
    assert codes["OK"] > 0.5 * capacity * LOAD_SECONDS
    assert p99 < LATENCY_BOUND_S < unbounded_backlog_s
    assert rss_after - rss_before < RSS_BOUND_KIB
    assert statistics.median(after) < 10 * statistics.median(service) + 0.05
