"""The real daemon speaks sd_notify to a real datagram socket playing systemd's part."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np

from tests import models
from tests.conftest import StartDaemon, short_tmpdir
from tests.gate import Gate, write_launcher
from tests.reliability_helpers import add_counter

#: The watchdog interval the stuck-pass test gives the daemon (WATCHDOG_USEC), in µs.
WATCHDOG_USEC = 2_000_000


class FakeManager:
    """A bound AF_UNIX datagram socket, as systemd's NOTIFY_SOCKET is; records arrivals."""

    def __init__(self) -> None:
        self.path = short_tmpdir() / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.01)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def poll(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str, after: int = 0, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            for index, (_, fields) in enumerate(self.messages[after:], after):
                if fields.get(key) == value:
                    return index
        raise AssertionError(f"no {key}={value} after message {after}: {self.messages}")


def connectable(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_ready_reload_and_stopping_messages(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """READY=1 comes only once the socket is connectable, with STATUS naming the models;
    STATUS= follows unload and load; SIGHUP gives RELOADING=1 + MONOTONIC_USEC then
    READY=1; SIGTERM gives STOPPING=1."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    manager = FakeManager()
    daemon = start_daemon(repo, wait=False, env={"NOTIFY_SOCKET": str(manager.path)})
    ready_at = None
    deadline = time.monotonic() + 60
    while ready_at is None and time.monotonic() < deadline:
        manager.poll()
        ready_at = next((t for t, f in manager.messages if f.get("READY") == "1"), None)
    assert ready_at is not None, manager.messages
    # Checked the moment READY is seen (the daemon never unbinds): a daemon that sent
    # READY before binding its socket would be caught here with nothing to connect to.
    assert connectable(daemon.socket)
    ready_fields = next(f for _, f in manager.messages if f.get("READY") == "1")
    assert "mlp" in ready_fields["STATUS"]

    with daemon.client(timeout=30) as client:
        client.unload_model("mlp")
    unloaded = manager.wait_for("STATUS", "serving 0 model(s)")
    assert "READY" not in manager.messages[unloaded][1]
    with daemon.client(timeout=30) as client:
        client.load_model("mlp")
    manager.wait_for("STATUS", "serving 1 model(s): mlp", after=unloaded + 1)

    daemon.signal(signal.SIGHUP)
    sent_at_usec = time.monotonic_ns() // 1000
    reloading = manager.wait_for("RELOADING", "1")
    usec = int(manager.messages[reloading][1]["MONOTONIC_USEC"])
    assert sent_at_usec - 5_000_000 < usec < sent_at_usec + 5_000_000
    manager.wait_for("READY", "1", after=reloading + 1)

    daemon.signal(signal.SIGTERM)
    manager.wait_for("STOPPING", "1")
    assert daemon.process.wait(30) == 0


def test_watchdog_pings_while_a_forward_pass_is_stuck(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """With WATCHDOG_USEC set, WATCHDOG=1 keeps arriving, never further apart than the
    interval (what systemd enforces), while a forward pass held at a gate occupies a
    worker thread."""
    repo = tmp_path / "repo"
    gate = Gate(tmp_path / "gate")
    add_counter(repo, gate)
    manager = FakeManager()
    daemon = start_daemon(
        repo,
        env={
            "NOTIFY_SOCKET": str(manager.path),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": "",
        },
        launcher=write_launcher(tmp_path),
    )
    client = daemon.client(timeout=60)
    thread = threading.Thread(
        target=client.predict, args=("counter", {"x": np.ones((1, 1), np.float32)})
    )
    thread.start()
    try:
        # Gates, not sleeps: the held call is in flight by the daemon's own count, then
        # pings are collected until four arrived; the pass ends only when the gate opens.
        with daemon.client(timeout=10) as probe:
            while probe.get_stats().in_flight < 1:
                pass
        manager.poll()
        start = len(manager.messages)

        def pings_so_far() -> list[float]:
            return [t for t, f in manager.messages[start:] if f.get("WATCHDOG") == "1"]

        deadline = time.monotonic() + 60  # only a daemon that stopped pinging gets here
        while len(pings_so_far()) < 4 and time.monotonic() < deadline:
            manager.poll()
        pings = pings_so_far()
        assert thread.is_alive(), "the forward pass should still be held"
    finally:
        gate.open()
    assert len(pings) >= 4, pings
    # The contract systemd enforces: no gap as long as WatchdogSec (the daemon pings at half).
    gaps = np.diff(pings)
    assert gaps.max() < WATCHDOG_USEC / 1e6, gaps
    thread.join(120)
    client.close()
