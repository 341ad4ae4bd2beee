"""Short forward passes run on the event loop; long ones, and calls with company, do not.

Where each pass ran is read from the daemon's own counters (GetStats'
``inline_passes`` beside ``batches``), so no test depends on how fast a pass is
beyond "a tiny MLP takes less than its budget and an 800x800 matrix chain more".
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeinferd.batching import Batcher, PassCost, QueuedCall, _loop_has_ready_work
from edgeinferd.repository import ModelConfig, TensorSpec
from tests import models
from tests.conftest import Daemon, StartDaemon, daemon_config, short_tmpdir
from tests.test_metrics import free_port, scrape

MLP = models.mlp_module(0)
METRICS_PORT = free_port()


def passes(daemon: Daemon, model: str) -> tuple[int, int]:
    """(forward passes, of which on the event loop) of ``model`` so far."""
    with daemon.client(timeout=10) as client:
        (stats,) = [m for m in client.get_stats().models if m.model == model]
        return stats.batches, stats.inline_passes


class Heavy(nn.Module):
    """Twenty 800x800 matrix products per call (hundreds of milliseconds of CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(800) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.weight
        for _ in range(20):
            state = torch.mm(state, self.weight)
        return x + state[0, 0]


@pytest.fixture(scope="module")
def inline_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """mlp (default budget), mlp-never (inline_max_us = 0) and heavy, one daemon."""
    repo = tmp_path_factory.mktemp("inline-repo")
    models.add_mlp(repo)
    models.add_mlp(
        repo, name="mlp-never", config=models.MLP_CONFIG + "[instances]\n" + models.NEVER_INLINE
    )
    folder = models.write_model(repo, "heavy", models.scalar_config(4))
    torch.jit.script(Heavy()).save(str(folder / "model.pt"))
    metrics = f'[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n'
    daemon = Daemon(daemon_config(repo, metrics), short_tmpdir()).wait_ready()
    yield daemon
    daemon.stop()


def test_a_lone_callers_short_passes_run_on_the_event_loop(inline_daemon: Daemon) -> None:
    """One caller, one call at a time: the MLP's passes run inline and answer correctly."""
    rng = np.random.default_rng(1)
    with inline_daemon.client(timeout=10) as client:
        for _ in range(20):
            x = rng.standard_normal((2, 16), dtype=np.float32)
            y = client.predict("mlp", {"x": x})["y"]
            with torch.inference_mode():
                np.testing.assert_allclose(
                    y, MLP(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6
                )
    batches, inline = passes(inline_daemon, "mlp")
    assert batches == 20
    # Most, not all: a call that finds another callback ready on the loop
    # (the daemon's own housekeeping) goes to a worker, as under load.
    assert inline >= 10, (batches, inline)
    samples = scrape(METRICS_PORT)
    assert (
        samples[("edgeinfer_inline_passes_total", (("model", "mlp"), ("version", "1")))] == inline
    )


def test_inline_max_us_zero_keeps_every_pass_in_a_worker(inline_daemon: Daemon) -> None:
    with inline_daemon.client(timeout=10) as client:
        for _ in range(10):
            client.predict("mlp-never", {"x": np.ones((1, 16), np.float32)})
    assert passes(inline_daemon, "mlp-never") == (10, 0)


def test_a_pass_longer_than_the_budget_never_runs_on_the_loop(inline_daemon: Daemon) -> None:
    """Its warm-up measured it over inline_max_us: a lone caller's calls go to the worker,
    and the loop answers health checks while one runs."""
    done = threading.Event()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with inline_daemon.client(timeout=120) as client:
                for _ in range(3):
                    client.predict("heavy", {"x": np.ones((1, 1), np.float32)})
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)
        finally:
            done.set()

    worker = threading.Thread(target=call)
    worker.start()
    health = 0
    with inline_daemon.client(timeout=10) as client:
        while not done.is_set():
            assert client.health() == "SERVING"
            health += 1
    worker.join()
    assert not errors, errors
    assert passes(inline_daemon, "heavy") == (3, 0)
    assert health > 0


def test_a_call_with_work_ahead_of_it_waits_its_turn_in_the_queue() -> None:
    """The batcher alone, driven by gates (it knows nothing of gRPC): a call that finds
    other callbacks ready on the loop goes to a worker; one that finds a pass running
    queues behind it; a lone call on an idle loop runs at once, on the loop's thread."""

    async def main() -> None:
        taken, gate = threading.Event(), threading.Event()
        threads: list[int] = []

        def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
            threads.append(threading.get_ident())
            if len(threads) == 1:
                taken.set()
                gate.wait(60)
            return [inputs[0] * 2]

        spec = TensorSpec("x", "float32", (1,))
        config = ModelConfig("m", (spec,), (TensorSpec("y", "float32", (1,)),), max_batch_size=4)
        batcher = Batcher(config, run, PassCost((1, 1e-6), (4, 2e-6)))
        x = np.ones((1, 1), np.float32)
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: None)  # other work is ready on the loop
        first = batcher.enqueue([x])
        assert await loop.run_in_executor(None, taken.wait, 60)  # a worker runs it
        second = batcher.enqueue([x])  # a pass is running: it queues
        assert not second.future.done()
        gate.set()
        await asyncio.gather(first.future, second.future)
        assert batcher.inline_passes == 0
        assert loop_thread not in threads
        await idle_loop()  # let the loop run what the deliveries scheduled
        third = batcher.enqueue([x])
        assert third.future.done()  # answered before enqueue returned: inline
        np.testing.assert_array_equal(third.future.result().outputs[0], x * 2)
        assert batcher.inline_passes == 1
        assert threads[-1] == loop_thread
        await batcher.close()

    loop_thread = threading.get_ident()
    asyncio.run(main())


def tiny_batcher(run: Callable[[Sequence[np.ndarray]], list[np.ndarray]]) -> Batcher:
    """A batcher whose passes are expected to take a microsecond (the default inline_max_us)."""
    spec = TensorSpec("x", "float32", (1,))
    config = ModelConfig("m", (spec,), (TensorSpec("y", "float32", (1,)),), max_batch_size=4)
    return Batcher(config, run, PassCost((1, 1e-6), (4, 2e-6)))


async def idle_loop() -> None:
    """Let the loop run what is ready (deliveries, wake-ups) until nothing is, by the
    batcher's own test of an idle loop."""
    loop = asyncio.get_running_loop()
    for _ in range(100):
        if not _loop_has_ready_work(loop):
            return
        await asyncio.sleep(0)


def test_after_a_pass_with_company_calls_queue_until_one_runs_alone() -> None:
    """Two calls that shared a pass mean callers come together: the next lone call queues
    (and finds out it is alone); the one after runs inline again."""

    async def main() -> None:
        batcher = tiny_batcher(lambda inputs: [inputs[0] * 2])
        x = np.ones((1, 1), np.float32)
        asyncio.get_running_loop().call_soon(lambda: None)  # busy: both queue
        pair = [batcher.enqueue([x]), batcher.enqueue([x])]
        await asyncio.gather(*(call.future for call in pair))
        assert (batcher.stats.batches, batcher.stats.rows) in {(1, 2), (2, 2)}
        company = batcher.stats.batches == 1
        await idle_loop()
        alone = batcher.enqueue([x])
        assert alone.future.done() is not company
        await alone.future
        await idle_loop()
        again = batcher.enqueue([x])
        assert again.future.done()
        await batcher.close()

    asyncio.run(main())


def test_a_descriptor_ready_on_the_loop_sends_the_call_to_a_worker() -> None:
    """No callback is waiting, but a socket the loop watches has data (as gRPC's wake-up
    socket has when requests arrive): the call is queued for a worker, not run inline."""

    async def main() -> None:
        batcher = tiny_batcher(lambda inputs: [inputs[0] * 2])
        x = np.ones((1, 1), np.float32)
        loop = asyncio.get_running_loop()
        watched, writer = socket.socketpair()
        queued: asyncio.Future[QueuedCall] = loop.create_future()

        def on_readable() -> None:  # the only callback running; its data still unread
            queued.set_result(batcher.enqueue([x]))
            loop.remove_reader(watched)

        await idle_loop()
        loop.add_reader(watched, on_readable)
        writer.send(b"x")
        call = await queued
        assert not call.future.done()
        await call.future
        assert batcher.inline_passes == 0
        watched.close()
        writer.close()
        await batcher.close()

    asyncio.run(main())


def test_a_pass_that_overruns_on_the_loop_turns_inlining_off() -> None:
    """Expected to take 1 µs, it spins for 20 ms of CPU: that one ran inline, none after
    it does."""

    def spin(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        started = time.thread_time()
        while time.thread_time() - started < 0.02:
            pass
        return [inputs[0] * 2]

    async def main() -> None:
        batcher = tiny_batcher(spin)
        x = np.ones((1, 1), np.float32)
        await idle_loop()
        assert batcher.enqueue([x]).future.done()
        await idle_loop()
        later = batcher.enqueue([x])
        assert not later.future.done()
        await later.future
        assert batcher.inline_passes == 1
        await batcher.close()

    asyncio.run(main())


def test_the_cost_estimate_follows_the_passes_it_sees() -> None:
    """A line through the two warm-up passes, scaled by what later passes took, a few
    percent per pass: one preempted pass barely moves it, a lasting change does."""
    cost = PassCost((16, 50e-6), (512, 150e-6))
    assert cost.expected(16) == pytest.approx(50e-6)
    assert cost.expected(512) == pytest.approx(150e-6)
    cost.observe(16, 50e-3)  # a thousand times slower, once
    assert cost.expected(16) < 60e-6
    for _ in range(100):
        cost.observe(16, 500e-6)  # ten times slower, for good
    assert cost.expected(16) == pytest.approx(500e-6, rel=0.01)
    assert cost.expected(512) == pytest.approx(1500e-6, rel=0.01)


def test_a_fixed_queue_delay_never_runs_inline(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """delay_policy = "fixed" asks every batch to wait for company: no pass skips the queue."""
    repo = tmp_path / "repo"
    config = models.MLP_CONFIG + '[batching]\nmax_queue_delay_us = 1\ndelay_policy = "fixed"\n'
    models.add_mlp(repo, config=config)
    daemon = start_daemon(repo)
    with daemon.client(timeout=10) as client:
        for _ in range(10):
            client.predict("mlp", {"x": np.ones((1, 16), np.float32)})
    assert passes(daemon, "mlp") == (10, 0)
