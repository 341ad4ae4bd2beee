"""Hostile probes against a real daemon, for the figures in docs/reliability.md.

    python benchmarks/hostile_probe.py

Starts edgeinferd on a private socket (with metrics) over a repository holding
the tests' ``mlp`` model, then: the shared-memory truncation sequence,
20,000 calls to bogus model names, and 200,000-tensor requests while a second
process measures its own Predict latency. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OTHER_CALLER = """
import sys, time, json, numpy as np, edgeinfer
x = np.ones((1, 16), np.float32)
with edgeinfer.Client(sys.argv[1], timeout=60) as client:
    client.predict("mlp", {"x": x})
    print("ready", flush=True)
    worst, count = 0.0, 0
    while sys.stdin.readline().strip() != "stop":
        for _ in range(50):
            started = time.perf_counter()
            client.predict("mlp", {"x": x})
            worst = max(worst, time.perf_counter() - started)
            count += 1
        print(json.dumps({"worst_ms": round(worst * 1000, 1), "calls": count}), flush=True)
        worst, count = 0.0, 0
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    import grpc

    import edgeinfer
    from edgeinfer.client import build_request, peer_token
    from edgeinfer.v1 import inference_pb2, inference_pb2_grpc, tensor_pb2
    from tests import models

    work = Path(tempfile.mkdtemp(prefix="ei-probe-", dir="/tmp"))
    repo = work / "repo"
    models.add_mlp(repo)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = work / "edgeinfer.sock"
    config = work / "edgeinferd.toml"
    config.write_text(
        f'repository = "{repo}"\n[listen]\nunix = "{sock}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
    )
    log = (work / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "edgeinferd", "--config", str(config)], stdout=log, stderr=log
    )
    address = f"unix://{sock}"
    figures: dict[str, object] = {}
    try:
        while True:
            try:
                with edgeinfer.Client(address, timeout=2) as client:
                    if client.health() == "SERVING":
                        break
            except edgeinfer.EdgeInferError:
                time.sleep(0.1)
        token = peer_token(address) or ""
        channel = grpc.insecure_channel(address)
        stub = inference_pb2_grpc.InferenceStub(channel)
        metadata = (("edgeinfer-peer-token", token),)

        # 1. Register an 8 KiB object, truncate it to 0, Predict from it.
        key = f"/edgeinfer-probe-{os.getpid()}"
        fd = os.open(f"/dev/shm{key}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, 8192)
        stub.RegisterSharedMemory(
            inference_pb2.RegisterSharedMemoryRequest(
                name="shrinks", key=key, offset=0, byte_size=8192
            ),
            metadata=metadata,
        )
        os.ftruncate(fd, 0)
        request = inference_pb2.PredictRequest(model="mlp")
        tensor = request.inputs.add(name="x", dtype=tensor_pb2.FLOAT32, shape=[1, 16])
        tensor.shared_memory.region, tensor.shared_memory.byte_size = "shrinks", 64
        try:
            stub.Predict(request, metadata=metadata, timeout=30)
            figures["truncated_region"] = "OK"
        except grpc.RpcError as error:
            figures["truncated_region"] = f"{error.code().name}: {error.details()}"
        os.close(fd)
        os.unlink(f"/dev/shm{key}")
        figures["daemon_alive_after_truncation"] = daemon.poll() is None

        # 2. 20,000 calls to bogus model names, 100 in flight at a time.
        x = np.ones((1, 16), np.float32)
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        scrape_before = len(urllib.request.urlopen(metrics_url).read())
        rss_before = rss_kib(daemon.pid)
        bogus = build_request("mlp", {"x": x})
        for wave in range(0, 20_000, 100):
            futures = []
            for index in range(wave, wave + 100):
                bogus.model = f"bogus-{index}"
                futures.append(stub.Predict.future(bogus, timeout=60))
            for future in futures:
                future.exception()
        with edgeinfer.Client(address, timeout=60) as client:
            stats = client.get_stats()
        figures["bogus_names"] = {
            "calls": 20_000,
            "stats_entries": len(stats.models),
            "metrics_bytes_before": scrape_before,
            "metrics_bytes_after": len(urllib.request.urlopen(metrics_url).read()),
            "rss_kib_before": rss_before,
            "rss_kib_after": rss_kib(daemon.pid),
        }

        # 3. Another caller's latency while 200,000-tensor requests arrive.
        other = subprocess.Popen(
            [sys.executable, "-c", OTHER_CALLER, address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert other.stdin is not None and other.stdout is not None
        assert other.stdout.readline().strip() == "ready"
        other.stdin.write("go\n")
        other.stdin.flush()
        baseline = json.loads(other.stdout.readline())
        many = inference_pb2.PredictRequest(model="mlp")
        for index in range(200_000):
            many.inputs.add(name=f"x{index}", dtype=tensor_pb2.FLOAT32, shape=[1], data=b"\0" * 4)
        refused = []
        other.stdin.write("go\n")
        other.stdin.flush()
        for _ in range(5):
            started = time.perf_counter()
            try:
                stub.Predict(many, timeout=60)
            except grpc.RpcError as error:
                refused.append((error.code().name, round(time.perf_counter() - started, 3)))
        during = json.loads(other.stdout.readline())
        other.stdin.write("stop\n")
        other.stdin.flush()
        other.wait(30)
        figures["many_tensors"] = {
            "request_bytes": many.ByteSize(),
            "refusals_code_and_seconds": refused,
            "other_caller_worst_ms_baseline": baseline["worst_ms"],
            "other_caller_worst_ms_during": during["worst_ms"],
        }
        channel.close()
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
