"""`edgeinfer bench` against a real daemon: it measures something, and says so in JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import Daemon


def run_bench(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeinfer.cli", "-a", daemon.address, "bench", "mlp", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def bench(daemon: Daemon, *args: str) -> dict[str, Any]:
    result = run_bench(daemon, *args)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


@pytest.mark.parametrize(
    "args",
    [
        ("--concurrency", "1,4"),
        ("--mode", "stream", "--concurrency", "4"),
        ("--concurrency", "2", "--batch-size", "8", "--processes", "2", "--shared-memory"),
    ],
    ids=["unary-sweep", "stream", "two-processes-shared-memory"],
)
def test_bench_reports_throughput_and_ordered_percentiles(
    daemon: Daemon, args: tuple[str, ...]
) -> None:
    """A ~1 s run reports a positive rate, no errors, p50 <= p90 <= p99 and the daemon's CPU."""
    document = bench(daemon, "--duration", "1", "--warmup", "0.2", "--json", *args)
    results = document["results"]
    assert isinstance(results, list)
    assert results
    for cell in results:
        assert cell["throughput"] > 0
        assert cell["errors"] == {}
        assert cell["rows_per_s"] == pytest.approx(cell["throughput"] * cell["batch_size"])
        latency = cell["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
        # The daemon is found through the Unix socket (SO_PEERCRED).
        assert cell["server_cpu_percent"] is not None


def test_bench_refuses_a_batch_larger_than_the_model_takes(daemon: Daemon) -> None:
    """Exit 2 with one line naming the limit, before any load is sent."""
    result = run_bench(daemon, "--batch-size", "64")
    assert result.returncode == 2
    assert "max_batch_size 32" in result.stderr
