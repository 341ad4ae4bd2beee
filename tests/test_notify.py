"""sd_notify and the watchdog, against a real datagram socket playing systemd's part."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeinferd.systemd import SystemdNotifier


class FakeManager:
    """The service manager's end of NOTIFY_SOCKET: records each datagram with its arrival time.

    A thread receives, so arrival times stay true even while the test blocks
    the event loop on purpose.
    """

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET spells it
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + address[1:] if address.startswith("@") else address)
        self.socket.settimeout(0.05)
        self.received: list[tuple[float, dict[str, str]]] = []
        #: Datagrams that broke the protocol. An assert in the receiving thread would
        #: only end that thread; these fail the test from messages() and close().
        self.malformed: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            arrived = time.monotonic()
            lines = data.decode(errors="replace").split("\n")
            if lines[-1] != "" or any("=" not in line for line in lines[:-1]):
                self.malformed.append(data)  # must be KEY=value lines, each ending in a newline
                continue
            self.received.append((arrived, dict(line.split("=", 1) for line in lines[:-1])))

    def messages(self, wait_for: int = 1, timeout: float = 2.0) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < wait_for and time.monotonic() < deadline:
            time.sleep(0.005)
        self.check()
        return [fields for _, fields in self.received]

    def check(self) -> None:
        assert not self.malformed, f"datagrams not in KEY=value newline form: {self.malformed!r}"

    def ping_times(self) -> list[float]:
        return [at for at, fields in self.received if fields.get("WATCHDOG") == "1"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()
        self.check()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn") as directory:
        yield Path(directory)


@pytest.fixture
def manager(short_dir: Path) -> Iterator[FakeManager]:
    fake = FakeManager(str(short_dir / "notify.sock"))
    yield fake
    fake.close()


def notifier_for(manager: FakeManager, **extra: str) -> SystemdNotifier:
    return SystemdNotifier.from_environment({"NOTIFY_SOCKET": manager.address, **extra})


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


async def watch_for(notifier: SystemdNotifier, seconds: float) -> None:
    task = asyncio.create_task(notifier.run_watchdog())
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_ready_sends_ready_and_status_in_one_datagram(manager: FakeManager) -> None:
    """ready() delivers READY=1 together with the STATUS line describing what is served."""
    notifier = notifier_for(manager)
    notifier.ready("serving 2 models: digits, iris")
    assert manager.messages() == [{"READY": "1", "STATUS": "serving 2 models: digits, iris"}]


def test_status_and_stopping_are_delivered_in_order(manager: FakeManager) -> None:
    """status() updates and stopping() arrive as their own datagrams, in call order."""
    notifier = notifier_for(manager)
    notifier.status("loading digits")
    notifier.status("unloaded iris")
    notifier.stopping()
    assert manager.messages(wait_for=3) == [
        {"STATUS": "loading digits"},
        {"STATUS": "unloaded iris"},
        {"STOPPING": "1"},
    ]


def test_reloading_carries_the_current_monotonic_time(manager: FakeManager) -> None:
    """reloading() sends RELOADING=1 with MONOTONIC_USEC read from CLOCK_MONOTONIC at the call."""
    notifier = notifier_for(manager)
    before = time.monotonic_ns() // 1000
    notifier.reloading()
    after = time.monotonic_ns() // 1000
    notifier.ready("reloaded")
    first, second = manager.messages(wait_for=2)
    assert set(first) == {"RELOADING", "MONOTONIC_USEC"}
    assert first["RELOADING"] == "1"
    assert before <= int(first["MONOTONIC_USEC"]) <= after
    assert second == {"READY": "1", "STATUS": "reloaded"}


def test_multiline_status_stays_one_field(manager: FakeManager) -> None:
    """A status with newlines cannot inject extra fields: it is folded onto one line."""
    notifier = notifier_for(manager)
    notifier.status("bad\nREADY=1")
    assert manager.messages() == [{"STATUS": "bad READY=1"}]


def test_abstract_socket_address_is_used() -> None:
    """NOTIFY_SOCKET starting with '@' reaches a socket in the abstract namespace."""
    fake = FakeManager(f"@edgeinfer-test-{uuid.uuid4().hex}")
    try:
        SystemdNotifier.from_environment({"NOTIFY_SOCKET": fake.address}).ready("up")
        assert fake.messages() == [{"READY": "1", "STATUS": "up"}]
    finally:
        fake.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    """Outside systemd nothing is sent, no watchdog runs and nothing raises."""
    notifier = SystemdNotifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.notify(READY=1) is False
    notifier.ready("x")
    notifier.reloading()
    notifier.stopping()
    assert notifier.watchdog_interval is None
    asyncio.run(asyncio.wait_for(notifier.run_watchdog(), timeout=1))


def test_watchdog_pings_at_half_the_timeout(manager: FakeManager) -> None:
    """With WATCHDOG_USEC=200ms, WATCHDOG=1 arrives about every 100ms."""
    notifier = notifier_for(manager, WATCHDOG_USEC="200000")
    assert notifier.watchdog_interval == pytest.approx(0.1)
    asyncio.run(watch_for(notifier, 0.65))
    times = manager.ping_times()
    assert 4 <= len(times) <= 8
    # Never early; typically on time (slack for a loaded test machine).
    assert min(gaps(times)) >= 0.09, gaps(times)
    assert statistics.median(gaps(times)) <= 0.15, gaps(times)


def test_watchdog_pings_when_watchdog_pid_is_ours(manager: FakeManager) -> None:
    """WATCHDOG_PID naming this process keeps the watchdog on."""
    notifier = notifier_for(manager, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid()))
    assert notifier.watchdog_interval == pytest.approx(0.1)
    asyncio.run(watch_for(notifier, 0.25))
    assert len(manager.ping_times()) >= 2


def test_no_pings_when_watchdog_pid_is_another_process(manager: FakeManager) -> None:
    """A WATCHDOG_PID of another process (inherited) means the watchdog is not ours."""
    notifier = notifier_for(manager, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid() + 1))
    assert notifier.watchdog_interval is None
    asyncio.run(asyncio.wait_for(notifier.run_watchdog(), timeout=1))
    notifier.ready("still notifies")  # only the watchdog is off
    assert manager.messages() == [{"READY": "1", "STATUS": "still notifies"}]


def test_pings_continue_while_a_forward_pass_blocks_a_thread(manager: FakeManager) -> None:
    """A forward pass stuck 1.5s in an executor thread does not interrupt the pings."""
    notifier = notifier_for(manager, WATCHDOG_USEC="200000")

    async def scenario() -> None:
        task = asyncio.create_task(notifier.run_watchdog())
        await asyncio.get_running_loop().run_in_executor(None, time.sleep, 1.5)
        task.cancel()

    asyncio.run(scenario())
    times = manager.ping_times()
    assert len(times) >= 10
    assert max(gaps(times)) < 0.5, gaps(times)


def test_pings_stop_while_the_event_loop_is_blocked(manager: FakeManager) -> None:
    """Blocking the event loop itself for 1s leaves a 1s hole in the pings: systemd would act."""
    notifier = notifier_for(manager, WATCHDOG_USEC="200000")

    async def scenario() -> None:
        task = asyncio.create_task(notifier.run_watchdog())
        await asyncio.sleep(0.35)
        time.sleep(1.0)  # noqa: ASYNC251 -- a wedged loop, on purpose
        await asyncio.sleep(0.35)
        task.cancel()

    asyncio.run(scenario())
    times = manager.ping_times()
    assert max(gaps(times)) >= 0.95
    # Before and after the block it pinged normally.
    assert sorted(gaps(times))[-2] < 0.5


def test_lost_socket_is_logged_once_and_never_raises(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sends to a vanished socket fail quietly after one warning, and resume when it returns."""
    path = short_dir / "gone.sock"
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(path)})
    with caplog.at_level(logging.WARNING, logger="edgeinferd.systemd"):
        assert notifier.notify(STATUS="one") is False
        notifier.status("two")
        notifier.stopping()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    fake = FakeManager(str(path))
    try:
        assert notifier.notify(STATUS="back") is True
        assert fake.messages() == [{"STATUS": "back"}]
    finally:
        fake.close()


def test_unset_environment_removes_the_variables() -> None:
    """unset_environment=True keeps children from notifying in the daemon's name."""
    environ = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "X": "y"}
    SystemdNotifier.from_environment(environ, unset_environment=True)
    assert environ == {"X": "y"}
