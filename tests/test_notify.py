"""sd_notify and the watchdog, against a real datagram socket playing systemd's part."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
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

    def messages(self, wait_for: int = 1, timeout: float = 30.0) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < wait_for and time.monotonic() < deadline:
            time.sleep(0.005)
        self.check()
        return [fields for _, fields in self.received]

    def wait_for_pings(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until ``count`` WATCHDOG=1 datagrams have arrived (a generous deadline)."""
        deadline = time.monotonic() + timeout
        while len(self.ping_times()) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return len(self.ping_times()) >= count

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


class CountingNotifier(SystemdNotifier):
    """Counts the pings it sends, so a test can tell when all of them have arrived."""

    sent = 0

    def watchdog_ping(self) -> None:
        self.sent += 1
        super().watchdog_ping()


async def watch_until_pings(notifier: SystemdNotifier, manager: FakeManager, count: int) -> bool:
    """Run the watchdog until ``count`` pings have arrived (or a generous deadline)."""
    task = asyncio.create_task(notifier.run_watchdog())
    arrived = await asyncio.to_thread(manager.wait_for_pings, count)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return arrived


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


def test_watchdog_pings_then_waits_half_the_timeout(
    manager: FakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With WATCHDOG_USEC=200ms, each WATCHDOG=1 is followed by a wait of 100ms, then the next.

    ``asyncio.sleep`` is replaced for this test by one that records how long it was
    asked to wait and returns only when the test lets it: what is checked is the
    order ping, wait(0.1), ping, ..., not how punctual this machine's timers are.
    """
    notifier = notifier_for(manager, WATCHDOG_USEC="200000")
    assert notifier.watchdog_interval == pytest.approx(0.1)

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        waits: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

        async def held_sleep(seconds: float) -> None:
            done = loop.create_future()
            waits.put_nowait((seconds, done))
            await done

        monkeypatch.setattr(asyncio, "sleep", held_sleep)
        task = asyncio.create_task(notifier.run_watchdog())
        asked = []
        for pings in range(1, 4):
            seconds, done = await waits.get()
            asked.append(seconds)
            # The ping before this wait has arrived, and no other: the watchdog is waiting.
            assert await asyncio.to_thread(manager.wait_for_pings, pings)
            assert len(manager.ping_times()) == pings
            done.set_result(None)
        await waits.get()
        task.cancel()
        return asked

    assert asyncio.run(scenario()) == [pytest.approx(0.1)] * 3


def test_watchdog_never_pings_early(manager: FakeManager) -> None:
    """On the real clock, pings are never closer than the interval (asyncio never wakes early)."""
    notifier = notifier_for(manager, WATCHDOG_USEC="200000")
    assert asyncio.run(watch_until_pings(notifier, manager, 3))
    assert min(gaps(manager.ping_times())) >= 0.09, gaps(manager.ping_times())


def test_watchdog_pings_when_watchdog_pid_is_ours(manager: FakeManager) -> None:
    """WATCHDOG_PID naming this process keeps the watchdog on."""
    notifier = notifier_for(manager, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid()))
    assert notifier.watchdog_interval == pytest.approx(0.1)
    assert asyncio.run(watch_until_pings(notifier, manager, 2))


def test_no_pings_when_watchdog_pid_is_another_process(manager: FakeManager) -> None:
    """A WATCHDOG_PID of another process (inherited) means the watchdog is not ours."""
    notifier = notifier_for(manager, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid() + 1))
    assert notifier.watchdog_interval is None
    asyncio.run(asyncio.wait_for(notifier.run_watchdog(), timeout=1))
    notifier.ready("still notifies")  # only the watchdog is off
    assert manager.messages() == [{"READY": "1", "STATUS": "still notifies"}]


def test_pings_continue_while_a_forward_pass_blocks_a_thread(manager: FakeManager) -> None:
    """Three pings arrive while an executor thread (a forward pass) is held on a gate."""
    notifier = notifier_for(manager, WATCHDOG_USEC="200000")

    async def scenario() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(notifier.run_watchdog())
        blocked, gate = threading.Event(), threading.Event()

        def forward_pass() -> None:
            blocked.set()
            gate.wait(60)

        running = loop.run_in_executor(None, forward_pass)
        assert await asyncio.to_thread(blocked.wait, 30)
        before = len(manager.ping_times())
        arrived = await asyncio.to_thread(manager.wait_for_pings, before + 3)
        still_blocked = not running.done()
        gate.set()
        await running
        task.cancel()
        return arrived, still_blocked

    assert asyncio.run(scenario()) == (True, True)


#: Watchdog intervals watched with the event loop blocked: a ping is due in each.
BLOCKED_INTERVALS = 3


def test_pings_stop_while_the_event_loop_is_blocked(manager: FakeManager) -> None:
    """While the event loop itself is blocked, no ping is sent: systemd would act. They resume.

    The loop blocks on a gate that a helper thread opens once every ping sent
    before the block has arrived and then BLOCKED_INTERVALS intervals have passed
    with none (the claim is about an absence, so it is watched for a span).
    """
    notifier = CountingNotifier(manager.address, 200_000)
    interval = notifier.watchdog_interval
    assert interval is not None
    blocking, gate = threading.Event(), threading.Event()
    during: list[int] = []

    def watch() -> None:
        # No assert here: one in this thread could not fail the test. The event is set
        # right after this thread starts; what it sees is checked below, through ``during``.
        blocking.wait()
        manager.wait_for_pings(notifier.sent)  # nothing sent before the block is in transit
        before = len(manager.ping_times())
        time.sleep(BLOCKED_INTERVALS * interval)
        during.append(len(manager.ping_times()) - before)
        gate.set()

    async def scenario() -> bool:
        task = asyncio.create_task(notifier.run_watchdog())
        assert await asyncio.to_thread(manager.wait_for_pings, 2)  # pinging normally
        watcher = threading.Thread(target=watch)
        watcher.start()
        blocking.set()
        gate.wait(60)  # a wedged loop, on purpose
        watcher.join()
        after = len(manager.ping_times())
        resumed = await asyncio.to_thread(manager.wait_for_pings, after + 1)
        task.cancel()
        return resumed

    assert asyncio.run(scenario())
    assert during == [0]


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
