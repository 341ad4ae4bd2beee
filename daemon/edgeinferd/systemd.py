"""Talk to systemd's service manager: readiness, status, reload, stop and the watchdog.

The unit runs with ``Type=notify``, so systemd considers the daemon started only
when it says ``READY=1``; clients ordered after it (``After=edgeinferd.service``)
then find the socket listening and the models warm.  The protocol is one
datagram of ``KEY=value`` lines to the ``AF_UNIX`` socket named by
``NOTIFY_SOCKET`` (see sd_notify(3)); it is small enough to speak directly,
which keeps libsystemd bindings out of the daemon's dependencies.

Outside systemd (``NOTIFY_SOCKET`` unset) every call is a cheap no-op, so the
daemon never needs to ask whether it runs under systemd.

Reload sequence (``ExecReload=/bin/kill -HUP $MAINPID``; systemd 252 has no
``Type=notify-reload``)::

    notifier.reloading()          # RELOADING=1 + MONOTONIC_USEC=...
    ...reload the config and models...
    notifier.ready("serving 3 models: ...")
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["SystemdNotifier"]

_log = logging.getLogger(__name__)

# The variables systemd passes to a Type=notify service.
_ENVIRONMENT_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# A send to the manager should be instant; if its queue is full, blocking the
# event loop longer than this would starve the watchdog anyway.
_SEND_TIMEOUT_S = 2.0


def _socket_address(value: str | None) -> str | None:
    """Turn NOTIFY_SOCKET into an address for sendto, or None if unusable."""
    if not value:
        return None
    if value.startswith("@"):
        # Linux abstract namespace: a leading NUL instead of a path.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # Other schemes (e.g. vsock: in newer systemd) are not needed on the
    # supported targets; refuse them loudly rather than guess.
    _log.warning(
        "NOTIFY_SOCKET=%r is not a Unix socket path; systemd notifications disabled", value
    )
    return None


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """The watchdog timeout meant for this process, or None if there is none."""
    raw_usec = environ.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None
    raw_pid = environ.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            watchdog_pid = int(raw_pid)
        except ValueError:
            _log.warning("WATCHDOG_PID=%r is not a pid; watchdog disabled", raw_pid)
            return None
        if watchdog_pid != pid:
            # Inherited from a parent that systemd supervises: not ours to ping.
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        _log.warning("WATCHDOG_USEC=%r is not an integer; watchdog disabled", raw_usec)
        return None
    return usec if usec > 0 else None


def _one_line(value: object) -> str:
    """Field values end at a newline in the protocol; keep them on one line."""
    return " ".join(str(value).splitlines())


class SystemdNotifier:
    """Sends sd_notify(3) messages; every method is a no-op when systemd is not listening.

    Sending never raises: a daemon that serves fine must not die because the
    manager's socket went away. The first failure is logged; later ones are
    not, until a send succeeds again.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address`` as in NOTIFY_SOCKET (``/path`` or ``@abstract``); None disables."""
        self._address = _socket_address(address)
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str] = os.environ,
        *,
        unset_environment: bool = False,
    ) -> SystemdNotifier:
        """Build from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID.

        ``unset_environment=True`` removes the three variables from ``environ``
        (which must then be mutable) so child processes do not notify or ping
        on our behalf.
        """
        notifier = cls(environ.get("NOTIFY_SOCKET"), _watchdog_usec(environ, os.getpid()))
        if unset_environment:
            if not isinstance(environ, MutableMapping):
                raise TypeError("unset_environment=True needs a mutable environ")
            for key in _ENVIRONMENT_KEYS:
                environ.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening (NOTIFY_SOCKET was usable)."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC), None if off.

        Half the timeout, as sd_watchdog_enabled(3) recommends, so one late
        ping is not fatal.
        """
        if self._watchdog_usec is None or self._address is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, **fields: object) -> bool:
        """Send one datagram of ``KEY=value`` lines, in argument order.

        Returns whether it was delivered (False when disabled or on error),
        for callers that care; most do not.
        """
        if self._address is None or not fields:
            return False
        message = "".join(f"{key}={_one_line(value)}\n" for key, value in fields.items())
        return self._send(message.encode())

    def ready(self, status: str) -> None:
        """Tell systemd start-up (or a reload) is complete and what is being served."""
        self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        """Update the line ``systemctl status`` shows, e.g. after a model loads or unloads."""
        self.notify(STATUS=status)

    def reloading(self, status: str | None = None) -> None:
        """Announce a reload; systemd waits for the next READY=1 before it finishes ``reload``.

        MONOTONIC_USEC lets systemd tell this reload apart from an earlier one.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if status is None:
            self.notify(RELOADING=1, MONOTONIC_USEC=usec)
        else:
            self.notify(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)

    def stopping(self, status: str | None = None) -> None:
        """Announce shutdown, so systemd shows ``deactivating`` rather than a crash."""
        if status is None:
            self.notify(STOPPING=1)
        else:
            self.notify(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more time to start, reload or stop (EXTEND_TIMEOUT_USEC).

        Useful while warming up a large model repository that would otherwise
        hit TimeoutStartSec.
        """
        self.notify(EXTEND_TIMEOUT_USEC=max(1, int(seconds * 1_000_000)))

    def watchdog_ping(self) -> None:
        """Send one WATCHDOG=1 keep-alive."""
        self.notify(WATCHDOG=1)

    async def run_watchdog(self) -> None:
        """Ping the watchdog from the event loop until cancelled.

        The pings ride on the loop on purpose: if the loop wedges, pings stop
        and systemd restarts the daemon. Forward passes run in executor
        threads and do not hold the loop, so a slow model does not trigger it.
        Returns at once when no watchdog is configured.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog_ping()
            await asyncio.sleep(interval)

    def close(self) -> None:
        """Release the socket; later calls reopen it."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _send(self, payload: bytes) -> bool:
        assert self._address is not None
        # Executor threads may report status too; one datagram per call keeps
        # messages whole, the lock keeps the lazily created socket single.
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._socket.settimeout(_SEND_TIMEOUT_S)
                self._socket.sendto(payload, self._address)
            except OSError as error:
                if not self._failing:
                    _log.warning(
                        "cannot notify systemd at %r: %s (further failures not logged)",
                        self._address.replace("\0", "@"),
                        error,
                    )
                    self._failing = True
                return False
            if self._failing:
                _log.info("notifying systemd works again")
                self._failing = False
            return True
