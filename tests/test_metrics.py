"""Metrics: the Prometheus endpoint, GetStats and `edgeinfer stats` report the same counts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import edgeinfer
from tests import models
from tests.conftest import StartDaemon


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_requests_by_status_and_latency(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """After 5 good calls and 2 bad ones, the endpoint and GetStats show exactly those counts."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    models.add_corrupt(repo)
    port = free_port()
    daemon = start_daemon(repo, f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    with daemon.client(timeout=30) as client:
        for _ in range(5):
            client.predict("mlp", {"x": np.zeros((2, 16), np.float32)})
        for _ in range(2):
            with pytest.raises(edgeinfer.EdgeInferError):
                client.predict("mlp", {"x": np.zeros((2, 15), np.float32)})
        stats = client.get_stats()
    samples = scrape(port)
    label = (("model", "mlp"), ("status", "OK"), ("version", "1"))
    assert samples[("edgeinfer_requests_total", label)] == 5
    bad = (("model", "mlp"), ("status", "INVALID_ARGUMENT"), ("version", ""))
    assert samples[("edgeinfer_requests_total", bad)] == 2
    for phase in ("queue", "compute", "total"):
        key = (("model", "mlp"), ("phase", phase), ("version", "1"))
        assert samples[("edgeinfer_request_duration_seconds_count", key)] == 5
        assert samples[("edgeinfer_request_duration_seconds_sum", key)] > 0
    assert samples[("edgeinfer_model_state", (("model", "corrupt"), ("state", "FAILED")))] == 1
    assert samples[("edgeinfer_models_loaded", ())] == 1
    assert samples[("edgeinfer_batch_size_count", (("model", "mlp"), ("version", "1")))] == 5
    assert samples[("process_resident_memory_bytes", ())] > 10 * 2**20

    (served,) = [m for m in stats.models if m.model == "mlp" and m.version == "1"]
    assert served.requests_by_status == {"OK": 5}
    assert served.batches == 5 and served.batched_rows == 10
    assert served.total_seconds_sum >= served.compute_seconds_sum > 0
    assert stats.resident_memory_bytes > 10 * 2**20


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the process's open sockets (an fd closed while listing is skipped)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except FileNotFoundError:
            continue
        if link.startswith("socket:"):
            inodes.add(link[8:-1])
    return inodes


def test_metrics_are_off_by_default(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Without [metrics] nothing listens for HTTP."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo)
    inodes = socket_inodes(daemon.process.pid)
    tcp = Path("/proc/net/tcp").read_text().splitlines()[1:]
    tcp += Path("/proc/net/tcp6").read_text().splitlines()[1:]
    listening = [line for line in tcp if line.split()[3] == "0A" and line.split()[9] in inodes]
    assert listening == []


def test_stats_command_prints_a_table(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """`edgeinfer stats` shows one row per model version with its OK count."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo)
    with daemon.client() as client:
        client.predict("mlp", {"x": np.zeros((1, 16), np.float32)})
    result = subprocess.run(
        [sys.executable, "-m", "edgeinfer.cli", "-a", daemon.address, "stats"],
        capture_output=True,
        text=True,
        check=True,
    )
    row = next(line for line in result.stdout.splitlines() if line.startswith("mlp "))
    assert row.split()[:3] == ["mlp", "1", "1"]
