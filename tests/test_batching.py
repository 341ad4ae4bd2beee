"""Dynamic batching as callers see it: which calls share a forward pass, and when it runs.

Batches are read from the daemon's own counters (GetStats), so each test says
how many forward passes its calls became, not how fast they were.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import torch

import edgeinfer
from tests import models
from tests.conftest import Daemon, StartDaemon

MLP = models.mlp_module(0)

#: Longer than any test waits (10 s, the config's limit): a batch that ran
#: only when its delay ran out would fail the call on its 5 s deadline.
FOREVER_US = 10_000_000
FIXED = 'delay_policy = "fixed"\n'


def reference(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return MLP(torch.from_numpy(x)).numpy()


def mlp_daemon(start_daemon: StartDaemon, tmp_path: Path, batching: str) -> Daemon:
    repo = tmp_path / "repo"
    config = models.MLP_CONFIG.replace("max_batch_size = 32", "max_batch_size = 4")
    models.add_mlp(repo, config=config + "[batching]\n" + batching)
    return start_daemon(repo)


def call_together(daemon: Daemon, inputs: list[np.ndarray]) -> None:
    """Send every input at once from one asyncio client (5 s deadline each); check the answers."""

    async def main() -> list[np.ndarray]:
        async with edgeinfer.AsyncClient(daemon.address, timeout=5) as client:
            answers = await asyncio.gather(*(client.predict("mlp", {"x": x}) for x in inputs))
            return [answer["y"] for answer in answers]

    for x, y in zip(inputs, asyncio.run(main()), strict=True):
        np.testing.assert_allclose(y, reference(x), rtol=1e-5, atol=1e-6)


def forward_passes(daemon: Daemon, model: str = "mlp") -> tuple[int, int]:
    """(forward passes, rows in them) of ``model`` so far, from the daemon's own counters."""
    with daemon.client(timeout=10) as client:
        (stats,) = [m for m in client.get_stats().models if m.model == model]
        return stats.batches, stats.batched_rows


def test_a_full_batch_runs_at_once_without_waiting_out_the_delay(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Four one-row calls fill max_batch_size 4 and run as one pass, long before the delay."""
    daemon = mlp_daemon(start_daemon, tmp_path, f"max_queue_delay_us = {FOREVER_US}\n{FIXED}")
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 16), dtype=np.float32) for _ in range(4)]
    call_together(daemon, inputs)
    assert forward_passes(daemon) == (1, 4)


def test_a_preferred_batch_size_runs_at_once(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Two rows reach preferred_batch_sizes = [2]: they run together without waiting for four."""
    daemon = mlp_daemon(
        start_daemon,
        tmp_path,
        f"max_queue_delay_us = {FOREVER_US}\npreferred_batch_sizes = [2]\n{FIXED}",
    )
    x = np.ones((1, 16), dtype=np.float32)
    call_together(daemon, [x, 2 * x])
    assert forward_passes(daemon) == (1, 2)


def test_a_lone_call_runs_when_its_delay_ends(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A call that no other joins runs alone once max_queue_delay_us has passed.

    The daemon's own queue-time counter shows it waited the delay out: a batcher
    that ignored the delay would also run it alone, but at once.
    """
    daemon = mlp_daemon(start_daemon, tmp_path, f"max_queue_delay_us = 200000\n{FIXED}")
    call_together(daemon, [np.ones((2, 16), dtype=np.float32)])
    assert forward_passes(daemon) == (1, 2)
    with daemon.client(timeout=10) as client:
        (stats,) = [m for m in client.get_stats().models if m.model == "mlp"]
    assert stats.queue_seconds_sum >= 0.2, stats.queue_seconds_sum


def test_v1_and_v2_calls_share_one_queue(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Two edgeinfer.v1 and two KServe V2 one-row calls fill one batch of four together.

    The delay is longer than the calls' deadline: only a shared queue lets them finish.
    """
    from tritonclient.grpc import service_pb2 as grpc_service_pb2
    from tritonclient.grpc import service_pb2_grpc as grpc_service_pb2_grpc

    daemon = mlp_daemon(start_daemon, tmp_path, f"max_queue_delay_us = {FOREVER_US}\n{FIXED}")
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((1, 16), dtype=np.float32) for _ in range(4)]

    async def main() -> list[np.ndarray]:
        async with (
            edgeinfer.AsyncClient(daemon.address, timeout=5) as client,
            grpc.aio.insecure_channel(daemon.address) as channel,
        ):
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def v2(x: np.ndarray) -> np.ndarray:
                request = grpc_service_pb2.ModelInferRequest(model_name="mlp")
                request.inputs.add(name="x", datatype="FP32", shape=x.shape)
                request.raw_input_contents.append(x.tobytes())
                response = await stub.ModelInfer(request, timeout=5)
                return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(1, 4)

            async def v1(x: np.ndarray) -> np.ndarray:
                return (await client.predict("mlp", {"x": x}))["y"]

            calls = [v1(inputs[0]), v2(inputs[1]), v1(inputs[2]), v2(inputs[3])]
            return list(await asyncio.gather(*calls))

    for x, y in zip(inputs, asyncio.run(main()), strict=True):
        np.testing.assert_allclose(y, reference(x), rtol=1e-5, atol=1e-6)
    assert forward_passes(daemon) == (1, 4)


def test_calls_that_would_overfill_a_batch_run_in_the_next(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Three two-row calls with max_batch_size 4: one pass of four rows, then one of two."""
    daemon = mlp_daemon(start_daemon, tmp_path, f"max_queue_delay_us = 200000\n{FIXED}")
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((2, 16), dtype=np.float32) for _ in range(3)]
    call_together(daemon, inputs)
    assert forward_passes(daemon) == (2, 6)


def test_adaptive_delay_makes_a_lone_caller_wait_for_no_one(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """With the adaptive policy, one caller's calls in turn run at once, whatever the delay."""
    daemon = mlp_daemon(
        start_daemon, tmp_path, f'max_queue_delay_us = {FOREVER_US}\ndelay_policy = "adaptive"\n'
    )
    x = np.ones((1, 16), dtype=np.float32)
    with daemon.client(timeout=5) as client:
        for _ in range(5):
            np.testing.assert_allclose(
                client.predict("mlp", {"x": x})["y"], reference(x), rtol=1e-5, atol=1e-6
            )
    assert forward_passes(daemon) == (5, 5)


ADAPTIVE_SLOW_CONFIG = models.scalar_config(
    2,
    f'[batching]\nmax_queue_delay_us = {FOREVER_US}\ndelay_policy = "adaptive"\n'
    f"[instances]\n{models.NEVER_INLINE}",
)


def test_adaptive_delay_waits_once_calls_have_shared_a_pass(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """After two calls shared a forward pass, the next lone call waits for company, and gets it."""
    repo = tmp_path / "repo"
    models.add_slow(repo, config=ADAPTIVE_SLOW_CONFIG)
    daemon = start_daemon(repo)

    def rounds(n: int) -> dict[str, np.ndarray]:
        return {"x": np.full((1, 1), n, dtype=np.float32)}

    async def main() -> None:
        async with edgeinfer.AsyncClient(daemon.address, timeout=5) as client:
            # A long pass runs alone (nothing shared a pass yet, so nothing waits) ...
            alone = asyncio.ensure_future(client.predict("slow", rounds(3000)))
            await asyncio.sleep(0.1)
            # ... while two calls queue behind it and then share the next pass.
            await asyncio.gather(alone, *(client.predict("slow", rounds(1)) for _ in range(2)))
            # Now a lone call waits (up to 10 s) until a second one fills its batch of 2.
            first = asyncio.ensure_future(client.predict("slow", rounds(1)))
            await asyncio.sleep(0.3)
            await asyncio.gather(first, client.predict("slow", rounds(1)))

    asyncio.run(main())
    assert forward_passes(daemon, "slow") == (3, 5)
