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
    bad = (("model", "mlp"), ("status", "INVALID_ARGUMENT"), ("version", "1"))
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
    assert served.requests_by_status == {"OK": 5, "INVALID_ARGUMENT": 2}
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


def test_names_callers_choose_do_not_grow_the_stats(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """2,000 calls to bogus names, 8 with 8 MiB names: GetStats and /metrics stay flat.

    Unknown and invalid names are counted in one ``(unknown)`` bucket; a wrong version
    of a real model under that model with no version.
    """
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    port = free_port()
    daemon = start_daemon(repo, f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    x = np.zeros((1, 16), np.float32)
    with daemon.client(timeout=60) as client:
        client.predict("mlp", {"x": x})
        before = len(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read())
        stub, request = client._stub, edgeinfer.client.build_request("mlp", {"x": x})
        names = [f"bogus-{index}" for index in range(2000)]
        names += [f"{index}" + "n" * (8 << 20) for index in range(8)]
        codes = []
        # In waves of 100 calls in flight: thousands of streams at once on one connection
        # can be refused by the transport (REFUSED_STREAM) before the daemon sees them.
        for wave in range(0, len(names), 100):
            futures = []
            for name in names[wave : wave + 100]:
                request.model = name
                futures.append(stub.Predict.future(request, timeout=60))
            codes += [future.exception().code().name for future in futures]  # type: ignore[union-attr]
        request.model, request.version = "mlp", "99"
        codes.append(stub.Predict.future(request, timeout=60).exception().code().name)  # type: ignore[union-attr]
        stats = client.get_stats()
    assert codes.count("NOT_FOUND") == 2001 and codes.count("INVALID_ARGUMENT") == 8
    keys = {(m.model, m.version): m.requests_by_status for m in stats.models}
    assert keys == {
        ("mlp", "1"): {"OK": 1},
        ("mlp", ""): {"NOT_FOUND": 1},
        ("(unknown)", ""): {"NOT_FOUND": 2000, "INVALID_ARGUMENT": 8},
    }
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
    assert b"bogus" not in text and b"nnnn" not in text
    assert len(text) < before + 16 * 1024


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_metrics_endpoint_holds_no_thread_per_connection(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """300 half-sent requests add no thread; beyond 16 at once connections are closed.

    Once the slow connections go away, a scrape is answered again.
    """
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    port = free_port()
    daemon = start_daemon(repo, f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()  # the worker exists
    threads = thread_count(daemon.process.pid)
    held = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /metr")
            held.append(sock)
        # The 17th and later were closed by the daemon: end-of-file, or a reset since
        # their unread request bytes were thrown away.
        closed = sum(1 for sock in held[16:] if closed_by_peer(sock))
        assert closed == len(held) - 16
        # ...at once, not by the 5 s request deadline: the first 16 are still open.
        for sock in held[:16]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        assert thread_count(daemon.process.pid) <= threads
    finally:
        for sock in held:
            sock.close()
    samples = scrape(port)
    assert samples[("edgeinfer_models_loaded", ())] == 1
