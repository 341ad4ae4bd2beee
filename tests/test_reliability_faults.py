"""Faults: version swaps under load, failing models, broken artifacts, aborted streams, kill -9."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import edgeinfer
from edgeinfer.client import Stats, build_request
from edgeinfer.v1 import inference_pb2 as pb
from edgeinfer.v1 import inference_pb2_grpc
from tests import models
from tests.conftest import Daemon, StartDaemon, daemon_config
from tests.gate import Gate, write_launcher
from tests.reliability_helpers import (
    add_counter,
    code_of_future,
    figure,
    rss_kib,
    thread_count,
    tree_digest,
    wait_for,
)

X = np.ones((1, 16), np.float32)


#: Messages the load's stream keeps unanswered at most (it sends the next on an answer).
STREAM_WINDOW = 4


class Load:
    """Threads calling Predict back to back (and one streaming) until stopped."""

    def __init__(self, daemon: Daemon, threads: int = 3) -> None:
        self.daemon = daemon
        self.stop = threading.Event()
        #: Room in the stream's window: taken per message sent, given back per answer.
        self._window = threading.Semaphore(STREAM_WINDOW)
        self.versions: list[list[str]] = [[] for _ in range(threads + 1)]
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._unary, args=(i,)) for i in range(threads)] + [
            threading.Thread(target=self._stream, args=(threads,))
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._window.release()  # a stream waiting for room sees the stop
        for thread in self.threads:
            thread.join(60)

    @property
    def calls(self) -> int:
        return sum(len(v) for v in self.versions) + len(self.errors)

    def _unary(self, index: int) -> None:
        with self.daemon.client(timeout=30) as client:
            stub = inference_pb2_grpc.InferenceStub(client._channel)
            request = build_request("mlp", {"x": X})
            while not self.stop.is_set():
                try:
                    self.versions[index].append(stub.Predict(request, timeout=30).version)
                except grpc.RpcError as error:
                    self.errors.append(f"{error.code().name}: {error.details()}")

    def _stream(self, index: int) -> None:
        def messages() -> Iterator[pb.PredictRequest]:
            # Paced by the answers, not by a pause: at most STREAM_WINDOW unanswered.
            while self._window.acquire() and not self.stop.is_set():
                yield build_request("mlp", {"x": X})

        with self.daemon.client(timeout=300) as client:
            stub = inference_pb2_grpc.InferenceStub(client._channel)
            try:
                for answer in stub.PredictStream(messages(), timeout=300):
                    if answer.HasField("error"):
                        self.errors.append(answer.error.message)
                    else:
                        self.versions[index].append(answer.response.version)
                    self._window.release()
            except grpc.RpcError as error:
                self.errors.append(f"stream {error.code().name}: {error.details()}")


@pytest.mark.parametrize("trigger", ["SIGHUP", "LoadModel"])
def test_new_version_under_load_fails_no_call(
    start_daemon: StartDaemon, tmp_path: Path, trigger: str
) -> None:
    """Swapping in version 2 under continuous unary and stream load fails no call."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo)
    with Load(daemon) as load:
        assert wait_for(lambda: all(len(v) > 20 for v in load.versions))
        models.add_mlp(repo, version="2", seed=5)
        if trigger == "SIGHUP":
            daemon.signal(signal.SIGHUP)
        else:
            with daemon.client(timeout=60) as client:
                assert client.load_model("mlp").serving_version == "2"
        assert wait_for(lambda: all(v and v[-1] == "2" for v in load.versions), timeout=60)
        swapped_at = [len(v) for v in load.versions]
        assert wait_for(
            lambda: all(len(v) > n + 100 for v, n in zip(load.versions, swapped_at, strict=True))
        )
    figure(
        f"faults.swap_{trigger}",
        calls=load.calls,
        failed=len(load.errors),
        version_1=sum(v.count("1") for v in load.versions),
        version_2=sum(v.count("2") for v in load.versions),
    )
    assert load.errors == []
    for versions in load.versions:  # each caller sees 1...1 then 2...2, never back
        assert versions == sorted(versions) and versions[0] == "1" and versions[-1] == "2"


def test_old_version_finishes_its_in_flight_calls(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Calls running or queued on version 1 complete on it after version 2 already serves."""
    repo = tmp_path / "repo"
    gate = Gate(tmp_path / "gate")
    add_counter(repo, gate)
    daemon = start_daemon(repo, launcher=write_launcher(tmp_path))
    with daemon.client(timeout=60) as client, grpc.insecure_channel(daemon.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        # Each call holds its forward pass at the gate, until the test opens it.
        spin = build_request("counter", {"x": np.ones((1, 1), np.float32)})
        client.predict("counter", {"x": np.zeros((1, 1), np.float32)})  # listed in GetStats now
        old = [stub.Predict.future(spin, timeout=120) for _ in range(3)]  # one runs, two queue
        assert wait_for(lambda: any(m.queued == 2 for m in client.get_stats().models))
        folder = repo / "counter" / "2"
        shutil.copytree(repo / "counter" / "1", folder)
        assert client.load_model("counter").serving_version == "2"
        quick = client.predict("counter", {"x": np.zeros((1, 1), np.float32)})
        new_serving_while_old_busy = not any(f.done() for f in old)
        gate.open()
        results = [f.result() for f in old]
    figure(
        "faults.old_version_drains",
        in_flight_on_v1=3,
        completed_on_v1=sum(r.version == "1" for r in results),
    )
    assert new_serving_while_old_busy
    assert quick["y"].shape == (1, 1)
    assert [r.version for r in results] == ["1", "1", "1"]


def test_failing_forward_pass_fails_only_its_batch(daemon: Daemon) -> None:
    """Batches holding a call the model raises on fail; other models and later batches don't."""
    mixed: Counter[str] = Counter()
    clean: Counter[str] = Counter()
    other_model: Counter[str] = Counter()
    negatives: list[str] = []
    with grpc.insecure_channel(daemon.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for wave in range(20):
            # A wave of 10 concurrent calls, 2 of them negative, while the MLP is called too ...
            calls = []
            for i in range(10):
                bad = i < 2
                value = -1.0 if bad else float(wave * 10 + i)
                request_id = f"picky-{wave}-{i}"
                request = build_request(
                    "picky", {"x": np.full((1, 2), value, np.float32)}, request_id=request_id
                )
                calls.append((bad, value, stub.Predict.future(request, timeout=60)))
                if bad:
                    negatives.append(request_id)
            mlp_request = build_request("mlp", {"x": X})
            mlp = [stub.Predict.future(mlp_request, timeout=60) for _ in range(8)]
            for bad, value, future in calls:
                code = code_of_future(future)
                if bad:
                    assert code == grpc.StatusCode.INTERNAL
                    continue
                mixed[code.name] += 1  # INTERNAL when batched with a negative one
                if code == grpc.StatusCode.OK:
                    expected = np.full((1, 2), 2 * value, np.float32).tobytes()
                    assert future.result().outputs[0].data == expected
            other_model.update(code_of_future(f).name for f in mlp)
            # ... then 8 concurrent good calls, batched together: all must succeed.
            values = np.arange(8, dtype=np.float32) + wave
            good = [
                (
                    v,
                    stub.Predict.future(
                        build_request("picky", {"x": np.full((1, 2), v, np.float32)})
                    ),
                )
                for v in values
            ]
            for value, future in good:
                code = code_of_future(future)
                clean[code.name] += 1
                if code == grpc.StatusCode.OK:
                    assert (
                        future.result().outputs[0].data
                        == np.full((1, 2), 2 * value).astype(np.float32).tobytes()
                    )
    log = daemon.log_text()
    figure(
        "faults.failing_forward",
        negative_calls=len(negatives),
        good_calls_in_mixed_waves=dict(mixed),
        good_waves_after=dict(clean),
        mlp_meanwhile=dict(other_model),
    )
    assert set(mixed) <= {"OK", "INTERNAL"}
    assert clean == {"OK": 160}
    assert other_model == {"OK": 160}
    assert all(request_id in log for request_id in negatives)


def write_manifest(folder: Path, digest: str | None) -> None:
    manifest = {"artifact": "model.pt", "format": "torchscript"}
    if digest is not None:
        manifest["sha256"] = digest
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_broken_artifacts_fail_alone_with_a_reason(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Corrupt, truncated, missing and tampered artifacts are FAILED with why; the rest serve."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    models.add_corrupt(repo)
    models.add_mlp(repo, "truncated")
    artifact = repo / "truncated" / "1" / "model.pt"
    artifact.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    models.add_mlp(repo, "no-artifact")
    (repo / "no-artifact" / "1" / "model.pt").unlink()
    models.write_model(repo, "no-version", models.MLP_CONFIG).rmdir()
    models.add_with_manifest(repo, "tampered", tamper=True)
    models.add_mlp(repo, "unsigned")
    write_manifest(repo / "unsigned" / "1", None)
    models.add_mlp(repo, "bad-manifest")
    (repo / "bad-manifest" / "1" / "manifest.json").write_text("{not json")
    expected = {
        "corrupt": "cannot load torchscript artifact",
        "truncated": "cannot load torchscript artifact",
        "no-artifact": "no artifact",
        "no-version": "no version folder",
        "tampered": "does not match its manifest",
        "unsigned": "sha256: missing",
        "bad-manifest": "manifest.json: unreadable",
    }
    daemon = start_daemon(repo)
    with daemon.client(timeout=30) as client:
        states = {m.name: m for m in client.list_models()}
        for name, words in expected.items():
            assert states[name].state == "FAILED", name
            assert words in states[name].reason, (name, states[name].reason)
            assert client.health(name) == "NOT_SERVING"
            with pytest.raises(edgeinfer.EdgeInferError) as caught:
                client.predict(name, {"x": X})
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert client.predict("mlp", {"x": X})["y"].shape == (1, 4)

        # A tampered new version of a serving model is refused; version 1 keeps serving.
        folder = repo / "mlp" / "2"
        shutil.copytree(repo / "mlp" / "1", folder)
        write_manifest(folder, hashlib.sha256(b"something else").hexdigest())
        daemon.signal(signal.SIGHUP)
        assert wait_for(lambda: "does not match" in client.get_model("mlp").reason)
        info = client.get_model("mlp")
        assert (info.state, info.serving_version) == ("READY", "1")
        assert client.predict("mlp", {"x": X})["y"].shape == (1, 4)
    figure("faults.broken_artifacts", injected=len(expected) + 1, still_serving="mlp v1")


STREAMS = 1000
#: Growth allowed after the aborted streams.
RSS_BOUND_KIB = 32 * 1024


async def aborted_streams(address: str, count: int, wave: int = 50) -> Counter[str]:
    """Open ``count`` streams ``wave`` at a time; each sends, maybe reads once, then cancels."""
    ways: Counter[str] = Counter()
    request = build_request("mlp", {"x": X})
    # Held at the counter's closed gate: every stream is cancelled with this call queued
    # (or, for one of them, running).
    spin = build_request("counter", {"x": np.ones((1, 1), np.float32)})
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(index: int) -> None:
            call = stub.PredictStream(timeout=60)
            for _ in range(3):
                await call.write(request)
            await call.write(spin)  # queued behind other streams' work when cancelled
            if index % 3:
                await call.read()
                ways["after an answer"] += 1
            else:
                ways["before any answer"] += 1
            call.cancel()

        for start in range(0, count, wave):
            await asyncio.gather(*(one(i) for i in range(start, min(count, start + wave))))
    return ways


def idle(stats: Stats) -> bool:
    return stats.in_flight == 0 and all(m.in_flight == 0 for m in stats.models)


def callers_gone(stats: Stats) -> bool:
    """No call counted in flight and none queued (a forward pass may still run)."""
    return stats.in_flight == 0 and all(m.queued == 0 for m in stats.models)


def test_aborted_streams_leave_nothing_behind(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """1,000 streams cancelled mid-flight leave no threads, calls in flight or memory behind."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    gate = Gate(tmp_path / "gate")
    add_counter(repo, gate)
    daemon = start_daemon(repo, launcher=write_launcher(tmp_path))
    pid = daemon.process.pid
    with daemon.client(timeout=30) as client:
        asyncio.run(aborted_streams(daemon.address, 100))  # warm-up: lazily made buffers, threads
        assert wait_for(lambda: callers_gone(client.get_stats()))
        threads_before, rss_before = thread_count(pid), rss_kib(pid)
        ways = asyncio.run(aborted_streams(daemon.address, STREAMS))
        # Callers are counted out when they go, although the one forward pass a cancelled
        # stream started still waits at the gate; opened, it runs to its end.
        assert wait_for(lambda: callers_gone(client.get_stats()))
        gate.open()
        assert wait_for(lambda: idle(client.get_stats()))
        stats = client.get_stats()
        threads_after, rss_after = thread_count(pid), rss_kib(pid)
        assert client.predict("mlp", {"x": X})["y"].shape == (1, 4)
    figure(
        "faults.aborted_streams",
        streams=STREAMS,
        ways=dict(ways),
        threads_before=threads_before,
        threads_after=threads_after,
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
        calls_in_flight_after=stats.in_flight,
        queued_after=sum(m.queued for m in stats.models),
    )
    assert sum(m.in_flight for m in stats.models) == 0
    assert threads_after <= threads_before
    assert rss_after - rss_before < RSS_BOUND_KIB


def test_kill_9_under_load_then_restart_serves(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """kill -9 under load, then a restart on the same config: it serves; nothing on disk changed."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    models.add_with_manifest(repo, "signed")
    before = tree_digest(repo)
    daemon = start_daemon(repo)
    with Load(daemon) as load:
        assert wait_for(lambda: all(len(v) > 20 for v in load.versions))
        daemon.process.kill()
        daemon.process.wait(30)
        calls_before_kill = load.calls
    assert daemon.socket.exists()  # left behind: the restart must cope with it
    restarted = Daemon(daemon_config(repo), daemon.workdir)
    try:
        restarted.wait_ready()
        with restarted.client(timeout=30) as client:
            assert client.predict("mlp", {"x": X})["y"].shape == (1, 4)
            assert client.predict("signed", {"x": X})["y"].shape == (1, 4)
        startup_log = restarted.log_text()
    finally:
        restarted.stop()
    problems = [line for line in startup_log.splitlines() if '"level": "info"' not in line]
    figure(
        "faults.kill_9",
        calls_before_kill=calls_before_kill,
        refused_while_down=len(load.errors),
        repository_files_changed=sum(before[k] != v for k, v in tree_digest(repo).items()),
        non_info_log_lines_on_restart=len(problems),
    )
    assert tree_digest(repo) == before
    assert problems == []
