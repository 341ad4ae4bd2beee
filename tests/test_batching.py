"""Dynamic batching as callers see it: which calls share a forward pass, and when it runs.

Batches are read from the daemon's own counters (GetStats), so each test says
how many forward passes its calls became, not how fast they were.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
import torch
from torch import nn

import edgeinfer
from edgeinferd.batching import Batcher
from edgeinferd.repository import BatchingConfig, ModelConfig, TensorSpec
from tests import models
from tests.conftest import Daemon, StartDaemon, daemon_config, short_tmpdir
from tests.gate import Gate, write_launcher
from tests.reliability_helpers import Counter, wait_for

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


# -- one daemon whose models hold a forward pass at a gate (tests.gate) --------------


class Doubler(nn.Module):
    """Doubles rows of any length; a first value below zero holds the pass at the gate."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x[0, 0] < 0):
            x = torch.ops.edgeinfer_test.gate(x, self.gate)
        return x * 2


VARIABLE_CONFIG = """
max_batch_size = 4
[[inputs]]
name = "x"
dtype = "float32"
shape = [-1]
[[outputs]]
name = "y"
dtype = "float32"
shape = [-1]
[batching]
max_queue_delay_us = 0
delay_policy = "fixed"
[instances]
count = 1
inline_max_us = 0     # its passes may block at the gate: never on the event loop
"""

ADAPTIVE_CONFIG = models.scalar_config(
    2,
    f'[batching]\nmax_queue_delay_us = {FOREVER_US}\ndelay_policy = "adaptive"\n'
    f"[instances]\ncount = 1\n{models.NEVER_INLINE}",
)


@dataclass
class Gated:
    daemon: Daemon
    gate: Gate


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gated]:
    """One daemon for the gated tests: ``variable`` (a -1 dimension, delay 0, fixed policy)
    and ``adaptive`` (the counter, batches of 2, the adaptive policy with a 10 s delay)."""
    root = tmp_path_factory.mktemp("gated")
    gate = Gate(root / "gate")
    repo = root / "repo"
    folder = models.write_model(repo, "variable", VARIABLE_CONFIG)
    torch.jit.script(Doubler(str(gate.path))).save(str(folder / "model.pt"))
    folder = models.write_model(repo, "adaptive", ADAPTIVE_CONFIG)
    torch.jit.script(Counter(str(gate.path))).save(str(folder / "model.pt"))
    workdir = short_tmpdir()
    daemon = Daemon(daemon_config(repo), workdir, launcher=write_launcher(root)).wait_ready()
    with daemon.client(timeout=30) as client:  # GetStats lists a model once it was called
        for model in ("variable", "adaptive"):
            client.predict(model, {"x": np.zeros((1, 1), np.float32)})
    yield Gated(daemon, gate)
    gate.open()
    daemon.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def model_state(client: edgeinfer.Client, model: str) -> tuple[int, int]:
    """(queued, queued + running) of ``model``."""
    (stats,) = [m for m in client.get_stats().models if m.model == model]
    return stats.queued, stats.in_flight


def passes_since(daemon: Daemon, model: str, before: tuple[int, int]) -> tuple[int, int]:
    passes, rows = forward_passes(daemon, model)
    return passes - before[0], rows - before[1]


def behind_a_held_pass(gated: Gated, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Hold a pass of ``variable`` at the gate, queue a call per input behind it, then open
    the gate; the answers, in order. The blocker runs alone (one row) and every call is
    queued before any batch forms, so the batches do not depend on when calls arrived."""
    gated.gate.close()

    async def main() -> list[np.ndarray]:
        async with edgeinfer.AsyncClient(gated.daemon.address, timeout=60) as client:
            blocker = asyncio.ensure_future(
                client.predict("variable", {"x": -np.ones((1, 1), np.float32)})
            )
            with gated.daemon.client(timeout=10) as sync:
                assert await asyncio.to_thread(
                    wait_for, lambda: model_state(sync, "variable") == (0, 1)
                )
                calls = [
                    asyncio.ensure_future(client.predict("variable", {"x": x})) for x in inputs
                ]
                queued = (len(inputs), len(inputs) + 1)
                assert await asyncio.to_thread(
                    wait_for, lambda: model_state(sync, "variable") == queued
                )
            gated.gate.open()
            await blocker
            return [answer["y"] for answer in await asyncio.gather(*calls)]

    return asyncio.run(main())


def test_calls_differing_in_a_variable_dimension_never_share_a_pass(gated: Gated) -> None:
    """Rows of length 3 and 5 queued in turn: the two of each length are stacked together,
    the lengths never, and every call gets its own rows doubled.

    A held pass keeps all four queued until the gate opens, so the batches formed
    do not depend on when the calls happened to arrive.
    """
    before = forward_passes(gated.daemon, "variable")
    lengths = [3, 5, 3, 5]
    inputs = [np.full((1, n), i + 1, np.float32) for i, n in enumerate(lengths)]
    for x, y in zip(inputs, behind_a_held_pass(gated, inputs), strict=True):
        np.testing.assert_array_equal(y, 2 * x)
    # The blocker alone, then one pass per length with both of its calls.
    assert passes_since(gated.daemon, "variable", before) == (3, 5)


def test_calls_that_would_overfill_a_batch_run_in_the_next(gated: Gated) -> None:
    """A three-row and a two-row call with max_batch_size 4, queued behind a held pass:
    five rows do not fit one pass, so they run in two, each call answered with its own rows."""
    before = forward_passes(gated.daemon, "variable")
    inputs = [np.full((rows, 2), rows, np.float32) for rows in (3, 2)]
    for x, y in zip(inputs, behind_a_held_pass(gated, inputs), strict=True):
        np.testing.assert_array_equal(y, 2 * x)
    # The blocker (1 row), then 3 rows, then 2.
    assert passes_since(gated.daemon, "variable", before) == (3, 6)


def test_no_queue_delay_answers_a_lone_call_that_no_other_joins(gated: Gated) -> None:
    """max_queue_delay_us = 0 with the fixed policy (which waits on every batch otherwise):
    one call, and no other is ever sent, is answered at once.

    Its 5 s deadline is the only clock, and it is half the longest delay a config may
    set: a batcher that waited for company would hold the call until the deadline,
    since nothing else comes. (A wait far shorter than 5 s cannot be told apart from
    none without timing the call, which this suite does not do.)
    """
    before = forward_passes(gated.daemon, "variable")
    gated.gate.open()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with gated.daemon.client(timeout=5) as client:
        np.testing.assert_array_equal(client.predict("variable", {"x": x})["y"], 2 * x)
    assert passes_since(gated.daemon, "variable", before) == (1, 2)


def test_adaptive_delay_waits_once_calls_have_shared_a_pass(gated: Gated) -> None:
    """After two calls shared a forward pass, the next lone call waits for company, and gets it.

    A held pass runs alone (nothing shared a pass yet), two calls queue behind it and
    share the next; then a lone call stays queued (the 10 s delay) until a second joins.
    """
    gated.gate.close()
    before = forward_passes(gated.daemon, "adaptive")

    def x(value: float) -> dict[str, np.ndarray]:
        return {"x": np.full((1, 1), value, np.float32)}

    async def main() -> None:
        async with edgeinfer.AsyncClient(gated.daemon.address, timeout=60) as client:
            with gated.daemon.client(timeout=10) as sync:

                async def until(state: tuple[int, int]) -> None:
                    assert await asyncio.to_thread(
                        wait_for, lambda: model_state(sync, "adaptive") == state
                    )

                alone = asyncio.ensure_future(client.predict("adaptive", x(1)))  # held
                await until((0, 1))
                pair = [asyncio.ensure_future(client.predict("adaptive", x(0))) for _ in "ab"]
                await until((2, 3))
                gated.gate.open()
                await asyncio.gather(alone, *pair)
                first = asyncio.ensure_future(client.predict("adaptive", x(0)))
                await until((1, 1))  # queued, waiting for company
                await asyncio.gather(first, client.predict("adaptive", x(0)))

    asyncio.run(main())
    assert passes_since(gated.daemon, "adaptive", before) == (3, 5)


def test_a_worker_waiting_for_a_fuller_batch_is_not_stalled_by_signals() -> None:
    """A pair of calls, then a lone call that waits out the 100 µs delay (its batch had
    company), 3,000 times, while SIGUSR1 is sent to the worker thread every 50 µs: every
    call is answered. A signal interrupts the worker's timed wait; CPython 3.11's
    ``SimpleQueue.get(timeout=...)`` then retried with the passed deadline as a negative
    timeout, which waits for ever (the batcher's old wait hung this test)."""
    spec = TensorSpec("x", "float32", (1,))
    batching = BatchingConfig(max_queue_delay_us=100, delay_policy="adaptive")
    config = ModelConfig(
        "m", (spec,), (TensorSpec("y", "float32", (1,)),), max_batch_size=4, batching=batching
    )
    stop = threading.Event()

    def storm(thread: threading.Thread) -> None:
        while not stop.wait(0.00005):
            signal.pthread_kill(thread.ident or 0, signal.SIGUSR1)

    async def main() -> int:
        batcher = Batcher(config, lambda inputs: [inputs[0] + 1])  # never inline: no cost
        (worker,) = [t for t in threading.enumerate() if t.name == "forward:m:0"]
        sender = threading.Thread(target=storm, args=(worker,), daemon=True)
        sender.start()
        answered = 0
        try:
            for i in range(ROUNDS):
                # A pair shares a pass, so the lone call after it waits out the delay.
                for size in (2, 1):
                    x = np.full((1, 1), i, np.float32)
                    calls = [batcher.enqueue([x]) for _ in range(size)]
                    # A bound on a hang, not on speed: each takes well under a millisecond.
                    await asyncio.wait_for(asyncio.gather(*(c.future for c in calls)), 30)
                    answered += size
        finally:
            stop.set()
            sender.join()
        await batcher.close()
        return answered

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        assert asyncio.run(main()) == 3 * ROUNDS
    finally:
        signal.signal(signal.SIGUSR1, previous)


#: Rounds of the signal test: a pair of calls, then a lone one (a few seconds here).
ROUNDS = 3000
