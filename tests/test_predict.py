"""Unary and streaming inference through the real client against a real daemon."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import grpc
import numpy as np
import torch

import edgeinfer
from edgeinfer.client import build_request
from edgeinfer.v1 import inference_pb2_grpc
from tests import models
from tests.conftest import Daemon, StartDaemon

MLP = models.mlp_module(0)  # built once: torch's seeding is global, not per thread


def reference(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return MLP(torch.from_numpy(x)).numpy()


def test_predict_matches_in_process_torch(client: edgeinfer.Client) -> None:
    """A unary call returns what the same module computes in-process."""
    x = np.random.default_rng(1).standard_normal((5, 16), dtype=np.float32)
    outputs = client.predict("mlp", {"x": x})
    assert list(outputs) == ["y"]
    np.testing.assert_allclose(outputs["y"], reference(x), rtol=1e-5, atol=1e-6)


def test_predict_exported_program_with_int64_and_two_outputs(client: edgeinfer.Client) -> None:
    """A torch.export artifact with int64 inputs returns both named outputs."""
    a = np.arange(10, dtype=np.int64)
    b = np.full(10, 3, dtype=np.int64)
    outputs = client.predict("adder", {"a": a, "b": b})
    np.testing.assert_array_equal(outputs["sum"], a + b)
    np.testing.assert_array_equal(outputs["product"], a * b)


def test_requested_outputs_are_the_only_ones_returned(client: edgeinfer.Client) -> None:
    """Naming outputs returns just those."""
    a = np.arange(4, dtype=np.int64)
    outputs = client.predict("adder", {"a": a, "b": a}, outputs=["product"])
    assert list(outputs) == ["product"]


def test_stream_answers_in_order_and_survives_a_bad_message(client: edgeinfer.Client) -> None:
    """Hundreds of messages come back in order; a bad one gets its own error."""
    rng = np.random.default_rng(2)
    batches = [{"x": rng.standard_normal((1, 16), dtype=np.float32)} for _ in range(300)]
    batches[150] = {"x": np.zeros((1, 15), dtype=np.float32)}
    results = list(client.stream("mlp", batches))
    assert [r.id for r in results] == [str(i) for i in range(1, 301)]
    bad = results[150]
    assert bad.error is not None
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "[1, 15]" in bad.error.message and "[-1, 16]" in bad.error.message
    for index, result in enumerate(results):
        if index != 150:
            assert result.outputs is not None
            np.testing.assert_allclose(
                result.outputs["y"], reference(batches[index]["x"]), rtol=1e-5, atol=1e-6
            )


def test_stream_reports_unknown_model_per_message(daemon: Daemon) -> None:
    """An unknown model on a stream is NOT_FOUND for that message only."""
    with daemon.client() as client:
        stub = inference_pb2_grpc.InferenceStub(client._channel)
        x = {"x": np.zeros((1, 16), np.float32)}
        requests = [
            build_request("mlp", x, request_id="a"),
            build_request("ghost", x, request_id="b"),
            build_request("mlp", x, request_id="c"),
        ]
        answers = list(stub.PredictStream(iter(requests)))
    assert [a.id for a in answers] == ["a", "b", "c"]
    assert answers[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert answers[0].HasField("response") and answers[2].HasField("response")


def test_concurrent_clients_each_get_their_own_answers(daemon: Daemon) -> None:
    """Eight threads calling at once (so calls batch together) each get their own rows back."""
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with daemon.client(timeout=30) as client:
            for _ in range(40):
                x = rng.standard_normal((int(rng.integers(1, 4)), 16), dtype=np.float32)
                got = client.predict("mlp", {"x": x})["y"]
                if not np.allclose(got, reference(x), rtol=1e-5, atol=1e-6):
                    failures.append(f"seed {seed}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_async_client_predicts_and_streams(daemon: Daemon) -> None:
    """The asyncio client gives the same answers as the blocking one."""
    x = np.ones((2, 16), dtype=np.float32)

    async def main() -> tuple[np.ndarray, list[edgeinfer.StreamResult]]:
        async with edgeinfer.AsyncClient(daemon.address, timeout=30) as client:
            unary = await client.predict("mlp", {"x": x})
            results = [r async for r in client.stream("mlp", [{"x": x}] * 20)]
            return unary["y"], results

    unary, results = asyncio.run(main())
    np.testing.assert_allclose(unary, reference(x), rtol=1e-5, atol=1e-6)
    assert len(results) == 20 and all(r.ok for r in results)


def test_tcp_listener_serves_the_same_api(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """With listen.tcp set (port 0: any free port), the daemon answers over TCP on loopback too."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo, 'tcp = "127.0.0.1:0"\n')
    serving = next(
        json.loads(line) for line in daemon.log_text().splitlines() if '"serving"' in line
    )
    (tcp,) = [a for a in serving["addresses"] if a.startswith("127.0.0.1:")]
    assert not tcp.endswith(":0")
    x = np.ones((1, 16), dtype=np.float32)
    with edgeinfer.Client(tcp, timeout=30) as client:
        np.testing.assert_allclose(
            client.predict("mlp", {"x": x})["y"], reference(x), rtol=1e-5, atol=1e-6
        )
