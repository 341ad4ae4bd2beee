"""Start-up, reload and shutdown of the real daemon process, driven by real signals."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import edgeinfer
from edgeinfer.client import build_request
from tests import models
from tests.conftest import Daemon, StartDaemon, short_tmpdir
from tests.gate import Gate, write_launcher
from tests.reliability_helpers import add_counter


def run_daemon(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeinferd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def gated_daemon(start_daemon: StartDaemon, tmp_path: Path) -> tuple[Daemon, Gate]:
    """A daemon serving the gated counter (its passes end when the test opens the gate)
    and the mlp (which answers at once), with a grace period no test reaches."""
    repo = tmp_path / "repo"
    gate = Gate(tmp_path / "gate")
    add_counter(repo, gate)
    models.add_mlp(repo)
    daemon = start_daemon(
        repo, "[shutdown]\ngrace_period_s = 120\n", launcher=write_launcher(tmp_path)
    )
    return daemon, gate


def refused_after_stop(client: edgeinfer.Client) -> list[str]:
    """Call the mlp until a call is refused (the stop has begun); the codes seen."""
    x = np.ones((1, 16), np.float32)
    codes: list[str] = []
    while (not codes or codes[-1] == "OK") and len(codes) < 10_000:
        try:
            client.predict("mlp", {"x": x})
            codes.append("OK")
        except edgeinfer.EdgeInferError as error:
            codes.append(error.code.name)
    return codes


def test_sigterm_lets_in_flight_calls_finish(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """SIGTERM with four calls in flight (held at a gate): the stop begins (new calls are
    refused), the gate opens only then, every call completes, and the daemon exits 0."""
    daemon, gate = gated_daemon(start_daemon, tmp_path)
    results: list[object] = []

    def call() -> None:
        with daemon.client(timeout=60) as client:
            try:
                results.append(client.predict("counter", {"x": np.ones((1, 1), np.float32)}))
            except edgeinfer.EdgeInferError as error:
                results.append(error)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        with daemon.client(timeout=60) as probe:
            while probe.get_stats().in_flight < 4:  # counted by the daemon, not timed
                pass
            assert results == []
            daemon.signal(signal.SIGTERM)
            assert refused_after_stop(probe)[-1] in ("UNAVAILABLE", "CANCELLED")
        assert results == [], "the held calls must still be running once the stop has begun"
    finally:
        gate.open()
    for thread in threads:
        thread.join(60)
    assert daemon.process.wait(60) == 0
    assert len(results) == 4
    assert all(isinstance(r, dict) for r in results), results


def test_new_calls_are_refused_after_sigterm(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """After SIGTERM a new call is UNAVAILABLE while the one in flight still completes.

    Ordered by counters and a gate, not sleeps: SIGTERM is sent once GetStats shows the held call
    in flight; new calls are then made until one is refused (the signal handler has run),
    and every later one must be refused too. Then the socket is removed and the exit is 0.
    """
    daemon, gate = gated_daemon(start_daemon, tmp_path)
    x = np.ones((1, 16), np.float32)
    with daemon.client(timeout=60) as client:
        running = client._stub.Predict.future(
            build_request("counter", {"x": np.ones((1, 1), np.float32)}), timeout=60
        )
        while client.get_stats().in_flight < 1 and not running.done():
            pass
        daemon.signal(signal.SIGTERM)
        codes = refused_after_stop(client)
        # Refused while the held call still runs: the stop began at once, not after it.
        still_running = not running.done()
        later = []
        for _ in range(5):
            with pytest.raises(edgeinfer.EdgeInferError) as caught:
                client.predict("mlp", {"x": x})
            later.append(caught.value.code.name)
        gate.open()
        assert running.result().outputs[0].name == "y"
    # A call that arrives just as the stop begins is CANCELLED by gRPC (accepted, never
    # given to a handler); after that the listener is closed: UNAVAILABLE.
    assert codes[-1] in ("UNAVAILABLE", "CANCELLED") and set(later) == {"UNAVAILABLE"}, (
        codes,
        later,
    )
    assert still_running, codes
    assert daemon.process.wait(60) == 0
    assert not daemon.socket.exists()
    assert not daemon.socket.with_name(daemon.socket.name + ".cred").exists()


def test_sighup_reloads_the_repository(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """SIGHUP loads new models, swaps changed ones and unloads removed ones."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    models.add_mlp(repo, "gone")
    daemon = start_daemon(repo)
    models.add_adder(repo, "new")
    models.add_mlp(repo, "mlp", version="2", seed=5)
    shutil.rmtree(repo / "gone")
    daemon.signal(signal.SIGHUP)
    x = np.ones((1, 16), np.float32)
    with daemon.client(timeout=30) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = {m.name: (m.state, m.serving_version) for m in client.list_models()}
            if (
                states.get("new", ("",))[0] == "READY"
                and states["mlp"][1] == "2"
                and "gone" not in states
            ):
                break
            time.sleep(0.1)
        assert states == {"mlp": ("READY", "2"), "new": ("READY", "1")}
        import torch

        with torch.inference_mode():
            expected = models.mlp_module(5)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(client.predict("mlp", {"x": x})["y"], expected, rtol=1e-5)


def test_reload_that_fails_keeps_the_old_version(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A new version that cannot load leaves the previous one serving, with the reason shown."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo)
    (repo / "mlp" / "2").mkdir()
    (repo / "mlp" / "2" / "model.pt").write_bytes(b"garbage")
    daemon.signal(signal.SIGHUP)
    with daemon.client(timeout=30) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not client.get_model("mlp").reason:
            time.sleep(0.1)
        info = client.get_model("mlp")
        assert info.state == "READY"
        assert info.serving_version == "1"
        assert "mlp/2/model.pt" in info.reason
        assert client.predict("mlp", {"x": np.ones((1, 16), np.float32)})["y"].shape == (1, 4)


def test_bad_config_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    """A config error exits 78 (EX_CONFIG, not retried by the unit) with one line naming the
    file and field."""
    config = tmp_path / "edgeinferd.toml"
    config.write_text('[listen]\nunix_mode = "rwx"\n')
    result = run_daemon("--config", str(config))
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "edgeinferd.toml: listen.unix_mode: expected an octal string" in lines[0]


def _startup_case(case: str, tmp_path: Path) -> tuple[list[str], str]:
    """Arguments that make start-up fail in one way, and the words that must name it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    socket_path = str(short_tmpdir() / "s.sock")
    config = tmp_path / "edgeinferd.toml"
    if case == "config not UTF-8":
        config.write_bytes(b'repository = "\xff\xfe"\n')
        return ["--config", str(config)], "is not UTF-8"
    if case == "socket folder cannot be created":
        args = ["--repository", str(repo), "--unix", str(a_file / "sub" / "s.sock")]
        return args, "cannot create the socket folder"
    if case == "socket parent is a file":
        args = ["--repository", str(repo), "--unix", str(a_file / "s.sock")]
        return args, "is not a folder"
    if case == "repository missing":
        args = ["--repository", str(tmp_path / "nope"), "--unix", socket_path]
        return args, "does not exist"
    if case == "repository is a file":
        return ["--repository", str(a_file), "--unix", socket_path], "is not a folder"
    if case in ("port 99999", "port -5"):
        port = case.split()[1]
        args = ["--repository", str(repo), "--unix", socket_path, "--tcp", f"127.0.0.1:{port}"]
        return args, "expected 'host:port' (port 0-65535)"
    assert case == "garbage TLS certificate"
    (tmp_path / "cert.pem").write_text("garbage")
    (tmp_path / "key.pem").write_text("garbage")
    config.write_text(
        f'repository = "{repo}"\n[listen]\nunix = "{socket_path}"\ntcp = "127.0.0.1:0"\n'
        'tls = {cert = "cert.pem", key = "key.pem"}\n'
    )
    return ["--config", str(config)], "do not load as a PEM certificate chain"


@pytest.mark.parametrize(
    "case",
    [
        "config not UTF-8",
        "socket folder cannot be created",
        "socket parent is a file",
        "repository missing",
        "repository is a file",
        "port 99999",
        "port -5",
        "garbage TLS certificate",
    ],
)
def test_start_up_errors_are_one_line_not_a_traceback(case: str, tmp_path: Path) -> None:
    """Each start-up mistake exits with one 'edgeinferd:' line naming it, no traceback: 78
    (EX_CONFIG, which the unit does not retry) for a configuration the daemon refuses as
    read, 1 for what fails while starting."""
    args, words = _startup_case(case, tmp_path)
    result = run_daemon(*args)
    config_errors = ("config not UTF-8", "port 99999", "port -5")
    assert result.returncode == (78 if case in config_errors else 1), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("edgeinferd: ")]
    assert len(lines) == 1, result.stderr
    assert words in lines[0], lines[0]


def test_socket_in_use_exits_non_zero(tmp_path: Path) -> None:
    """A socket another process serves on is not stolen: start-up fails with exit 1."""
    workdir = short_tmpdir()
    path = workdir / "busy.sock"
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(str(path))
    holder.listen()
    try:
        result = run_daemon("--repository", str(tmp_path), "--unix", str(path))
    finally:
        holder.close()
        shutil.rmtree(workdir, ignore_errors=True)
    assert result.returncode == 1
    assert "another process is serving on it" in result.stderr


def test_stale_socket_file_is_replaced(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A socket file left by a killed daemon does not stop the next start."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    first = start_daemon(repo)
    first.process.kill()
    first.process.wait()
    assert first.socket.exists()
    second = start_daemon(repo)
    assert second.socket.exists()


def test_socket_is_created_with_the_configured_mode(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The Unix socket gets mode 0660 by default (owner and group only)."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo)
    assert daemon.socket.stat().st_mode & 0o777 == 0o660


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_second_signal_exits_at_once(
    start_daemon: StartDaemon, tmp_path: Path, signum: int
) -> None:
    """A second stop signal during a long graceful stop ends the process immediately."""
    daemon, gate = gated_daemon(start_daemon, tmp_path)
    client = daemon.client(timeout=120)

    def call() -> None:
        with contextlib.suppress(edgeinfer.EdgeInferError):
            client.predict("counter", {"x": np.ones((1, 1), np.float32)})

    caller = threading.Thread(target=call)
    caller.start()
    try:
        while client.get_stats().in_flight < 1:  # held at the gate: the stop cannot finish
            pass
        daemon.signal(signum)
        refused_after_stop(client)  # the first signal has been handled
        daemon.signal(signum)
        # The held call keeps the graceful stop (120 s of grace) from ever finishing while
        # the gate stays shut: an exit now, by the signal, is the second signal's doing.
        assert daemon.process.wait(60) == 128 + signum
    finally:
        gate.open()
    caller.join(30)
    client.close()
