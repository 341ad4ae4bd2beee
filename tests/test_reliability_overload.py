"""Overload and deadlines: bounded queues, dropped expired calls, freed slots, bounded waits.

The ``counter`` model counts its forward passes in a buffer (read back with a
call of ``x = 0``), so these tests prove which calls reached the model. A call
with ``x > 0`` holds the one instance until the test opens its gate
(``tests.gate``): the model is busy for exactly as long as a test needs, on
any machine, and every figure asserted is a count, not a duration.
"""

from __future__ import annotations

import asyncio
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
from tests.gate import Gate, write_launcher
from tests.reliability_helpers import (
    MODEL_INFER,
    add_counter,
    code_of_future,
    figure,
    raw_stream,
    rss_kib,
    wait_for,
)


def spin(gated: bool, request_id: str = "") -> pb.PredictRequest:
    """A call that holds its forward pass until the gate opens (``gated``) or runs at once."""
    return build_request(
        "counter", {"x": np.full((1, 1), float(gated), np.float32)}, request_id=request_id
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


def counter_daemon(start_daemon: StartDaemon, tmp_path: Path, queue: int) -> tuple[Daemon, Gate]:
    repo = tmp_path / "repo"
    gate = Gate(tmp_path / "gate")
    add_counter(repo, gate, queue=queue)
    return start_daemon(repo, launcher=write_launcher(tmp_path)), gate


@dataclass
class Busy:
    """A counter daemon whose one instance holds a gated forward pass (``blocker``)."""

    client: edgeinfer.Client
    channel: grpc.Channel
    stub: inference_pb2_grpc.InferenceStub
    gate: Gate
    #: Forward passes before the blocker, so ``passes_since()`` counts what ran after.
    before: int
    blocker: grpc.Future

    def passes_since(self) -> int:
        """Forward passes since the blocker was sent, the blocker and this reading excluded."""
        return count(self.client) - self.before - 1


@contextmanager
def busy(daemon: Daemon, gate: Gate) -> Iterator[Busy]:
    """Send a gated call and wait until it runs with nothing queued behind it.

    The gate opens when the block ends (or fails), so the daemon is never left stuck.
    """
    with daemon.client(timeout=60) as client, grpc.insecure_channel(daemon.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        before = count(client)
        blocker = stub.Predict.future(spin(True), timeout=120)
        try:
            assert wait_for(lambda: queue_state(client) == (0, 1))
            yield Busy(client, channel, stub, gate, before, blocker)
        finally:
            gate.open()


def test_full_queue_refuses_new_calls_at_once(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Past max_queue_size, calls get RESOURCE_EXHAUSTED while the model is still busy."""
    daemon, gate = counter_daemon(start_daemon, tmp_path, queue=4)
    with busy(daemon, gate) as b:
        calls = [b.stub.Predict.future(spin(False, f"c{i}"), timeout=120) for i in range(20)]
        assert wait_for(lambda: sum(f.done() for f in calls) >= 16)
        refused_while_busy = Counter(code_of_future(f).name for f in calls if f.done())
        assert queue_state(b.client) == (4, 5)  # the blocker still runs, four wait
        gate.open()
        assert code_of_future(b.blocker) == grpc.StatusCode.OK
        codes = Counter(code_of_future(f).name for f in calls)
        ran = b.passes_since()
    figure("overload.queue_full", calls=20, max_queue_size=4, codes=dict(codes), model_ran=ran)
    # Every refusal came back while the forward pass was still held at its gate.
    assert refused_while_busy == {"RESOURCE_EXHAUSTED": 16}
    assert codes == {"OK": 4, "RESOURCE_EXHAUSTED": 16}
    assert ran == 1 + 4  # the blocker and the four admitted calls


#: The V2 ``timeout`` parameter of the queued calls, and the gRPC deadline of the v1 ones.
TIMEOUT_S = 0.3


def test_expired_calls_are_dropped_without_running(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Calls whose deadline passes while queued get DEADLINE_EXCEEDED and never reach the model."""
    daemon, gate = counter_daemon(start_daemon, tmp_path, queue=64)
    with busy(daemon, gate) as b:
        # gRPC deadlines (the call is cancelled on both sides when it passes) ...
        v1 = [b.stub.Predict.future(spin(False), timeout=TIMEOUT_S) for _ in range(5)]
        v1_codes = Counter(code_of_future(f).name for f in v1)
        # ... and V2's timeout parameter, enforced by the daemon alone when the call's turn comes.
        infer = b.channel.unary_unary(
            MODEL_INFER,
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        v2 = []
        for _ in range(5):
            message = service_pb2.ModelInferRequest(model_name="counter")
            message.parameters["timeout"].int64_param = int(TIMEOUT_S * 1e6)  # microseconds
            message.inputs.add(name="x", datatype="FP32", shape=[1, 1])
            message.raw_input_contents.append(np.zeros((1, 1), np.float32).tobytes())
            v2.append(infer.future(message, timeout=120))
        # Only the V2 calls wait their turn (the v1 ones were withdrawn when their deadline
        # passed); once queued, their deadline is at most TIMEOUT_S away on the shared clock.
        assert wait_for(lambda: queue_state(b.client) == (5, 6))
        queued_at = time.monotonic()
        assert wait_for(lambda: time.monotonic() > queued_at + TIMEOUT_S)
        assert not b.blocker.done()
        gate.open()
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
    daemon, gate = counter_daemon(start_daemon, tmp_path, queue=2)
    with busy(daemon, gate) as b:
        queued = [b.stub.Predict.future(spin(False), timeout=120) for _ in range(2)]
        assert wait_for(lambda: queue_state(b.client)[0] == 2)
        assert code_of_future(b.stub.Predict.future(spin(False), timeout=30)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        for future in queued:
            future.cancel()
        assert wait_for(lambda: queue_state(b.client)[0] == 0)

        v2 = service_pb2.ModelInferRequest(model_name="counter")
        v2.inputs.add(name="x", datatype="FP32", shape=[1, 1])
        v2.raw_input_contents.append(np.zeros((1, 1), np.float32).tobytes())
        for method, message in (
            ("/edgeinfer.v1.Inference/PredictStream", spin(False).SerializeToString()),
            ("/inference.GRPCInferenceService/ModelStreamInfer", v2.SerializeToString()),
        ):
            release = threading.Event()

            def messages(
                message: bytes = message, release: threading.Event = release
            ) -> Iterator[bytes]:
                yield message
                yield message
                release.wait(60)

            stream = raw_stream(b.channel, method)(messages(), timeout=120)
            assert wait_for(lambda: queue_state(b.client)[0] == 2), method
            stream.cancel()
            release.set()
            assert wait_for(lambda: queue_state(b.client)[0] == 0), method

        admitted = [b.stub.Predict.future(spin(False), timeout=120) for _ in range(2)]
        assert wait_for(lambda: queue_state(b.client)[0] == 2)
        refused = code_of_future(b.stub.Predict.future(spin(False), timeout=30))
        assert not b.blocker.done()
        gate.open()
        codes = [code_of_future(f).name for f in (b.blocker, *admitted)]
        ran = b.passes_since()
    figure("overload.freed_slots", cancelled=2, stream_messages_closed=4, model_ran=ran)
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED  # the limit still holds
    assert codes == ["OK", "OK", "OK"]
    assert ran == 3  # blocker and the two admitted calls; none of the cancelled ones


#: Queue depth of the load test, callers (each with one call outstanding) and calls admitted.
LOAD_QUEUE = 8
LOAD_CALLERS = 4 * (LOAD_QUEUE + 1)
LOAD_CALLS = 120
#: An admitted call finds at most LOAD_QUEUE calls ahead of it; what a caller sees may also
#: count an answer still on its way. An unbounded queue would put LOAD_CALLERS - 1 ahead.
PASSES_AHEAD_BOUND = LOAD_QUEUE + 1
RSS_BOUND_KIB = 32 * 1024


@dataclass
class LoadResult:
    codes: Counter[str]
    #: For each admitted call: forward passes that ran before its own and whose answers had
    #: not reached any caller when it was sent (the calls ahead of it, as callers see it).
    passes_ahead: list[int]
    latencies_s: list[float]
    refused_while_gated: int
    #: Passes the test let through one by one, each while the queue was full.
    cycles: int


async def closed_loop(address: str, gate: Gate, base: int) -> LoadResult:
    """LOAD_CALLERS callers, one call outstanding each, until LOAD_CALLS were admitted.

    Every call waits at the gate, and the test lets one pass through only while the queue
    is full and only once the previous answer arrived, so
    the model, not this process, is the bottleneck: overload on any machine, whatever
    its speed. A refused caller tries again when an answer arrives (a slot may be free),
    or when the daemon shows a free slot that no call is on its way to take: an answer can
    reach the caller before the worker has taken the next call off the queue, so both
    calls made on that answer can be refused, and nothing else would wake a caller.
    """
    result = LoadResult(Counter(), [], [], 0, 0)
    answered = 0
    trying = 0  # callers with a call made and not yet answered or refused
    waiting = 0  # refused callers waiting for a slot
    freed = asyncio.Semaphore(0)
    first_wave_refused = asyncio.Event()
    request = spin(True)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        blocker = asyncio.ensure_future(stub.Predict(request, timeout=120))

        async def caller() -> None:
            nonlocal answered, trying, waiting
            while answered < LOAD_CALLS:
                seen = answered
                started = time.monotonic()
                trying += 1
                try:
                    reply = await stub.Predict(request, timeout=120)
                except grpc.aio.AioRpcError as error:
                    trying -= 1
                    result.codes[error.code().name] += 1
                    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        return
                    if result.codes["RESOURCE_EXHAUSTED"] == LOAD_CALLERS - LOAD_QUEUE:
                        first_wave_refused.set()
                    waiting += 1
                    await freed.acquire()
                    waiting -= 1
                    continue
                trying -= 1
                result.codes["OK"] += 1
                result.latencies_s.append(time.monotonic() - started)
                own_pass = int(np.frombuffer(reply.outputs[0].data, np.float32)[0]) - base
                result.passes_ahead.append(own_pass - 1 - seen)
                answered += 1
                # One waiting caller may take the freed slot; after the last call, all go home.
                for _ in range(1 if answered < LOAD_CALLS else LOAD_CALLERS):
                    freed.release()

        with edgeinfer.Client(address, timeout=30) as client:

            async def full_or_done() -> bool:
                """Until the queue is full again (or all calls are in); a free slot that
                no call is on its way to (every call made is counted by the daemon)
                wakes one refused caller."""
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    queued, in_flight = await asyncio.to_thread(queue_state, client)
                    if answered >= LOAD_CALLS or queued >= LOAD_QUEUE:
                        return True
                    if waiting and trying <= in_flight:
                        freed.release()
                    await asyncio.sleep(0.002)
                return False

            assert await asyncio.to_thread(wait_for, lambda: queue_state(client) == (0, 1))
            callers = [asyncio.ensure_future(caller()) for _ in range(LOAD_CALLERS)]
            await asyncio.wait_for(first_wave_refused.wait(), 60)
            result.refused_while_gated = result.codes["RESOURCE_EXHAUSTED"]
            gate.release()  # the blocker's pass; its slot goes to one refused caller
            await blocker
            freed.release()
            while answered < LOAD_CALLS:
                assert await full_or_done()
                if answered >= LOAD_CALLS:
                    break
                before = answered
                gate.release()  # exactly one pass, with a full queue behind it
                assert await asyncio.to_thread(wait_for, lambda n=before: answered > n, 60.0, 0.002)
                result.cycles += 1
            gate.open()  # the last admitted calls finish
            await asyncio.gather(*callers)
    return result


def test_overload_keeps_admitted_waits_bounded(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Four times more callers than the queue holds, the model the bottleneck throughout:
    admitted calls find at most about max_queue_size calls ahead of them, the rest are
    refused, nothing else fails, and memory stays."""
    daemon, gate = counter_daemon(start_daemon, tmp_path, queue=LOAD_QUEUE)
    pid = daemon.process.pid
    with daemon.client(timeout=30) as client:
        base = count(client) + 1  # and the blocker's pass
    rss_before = rss_kib(pid)
    load = asyncio.run(closed_loop(daemon.address, gate, base))
    rss_after = rss_kib(pid)
    with daemon.client(timeout=30) as client:
        assert wait_for(lambda: queue_state(client) == (0, 0))
        ran = count(client) - base - 1
    ahead = sorted(load.passes_ahead)
    latencies = sorted(load.latencies_s)
    figure(
        "overload.load",
        callers=LOAD_CALLERS,
        max_queue_size=LOAD_QUEUE,
        codes=dict(load.codes),
        refused_while_gated=load.refused_while_gated,
        gate_cycles=load.cycles,
        passes_ahead_p50=ahead[len(ahead) // 2],
        passes_ahead_max=ahead[-1],
        unbounded_queue_would_reach=LOAD_CALLERS - 1,
        admitted_p50_ms=round(latencies[len(latencies) // 2] * 1000, 1),
        admitted_max_ms=round(latencies[-1] * 1000, 1),
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
    )
    assert set(load.codes) == {"OK", "RESOURCE_EXHAUSTED"}
    assert load.refused_while_gated == LOAD_CALLERS - LOAD_QUEUE
    assert load.codes["RESOURCE_EXHAUSTED"] > load.refused_while_gated  # refused under load too
    assert load.codes["OK"] >= LOAD_CALLS
    assert ran == load.codes["OK"]  # no refused call reached the model
    assert ahead[-1] <= PASSES_AHEAD_BOUND < LOAD_CALLERS - 1
    assert rss_after - rss_before < RSS_BOUND_KIB
