"""Log to the systemd journal with a priority and structured fields per event.

Under systemd, stderr is already connected to the journal (``JOURNAL_STREAM``
is set), but a plain stream loses both the level of each line and the
structure of the event. The journal's native protocol keeps both: each event
becomes one datagram of fields (``MESSAGE=``, ``PRIORITY=``, ``MODEL=``,
``REQUEST_ID=``, ``DURATION_MS=``...), so an operator can run
``journalctl -u edgeinferd -p warning`` or ``journalctl MODEL=digits``.

Two pieces, both plugged into ``structlog.configure``::

    from edgeinferd import journal

    if journal.stderr_is_journal():
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                journal.JournalRenderer(),          # last: event dict -> fields
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
            logger_factory=journal.JournalLoggerFactory(),  # fields -> journald
            cache_logger_on_first_use=True,
        )

When the journal socket is missing or refuses an entry, the logger falls back
to writing ``<N>message`` lines on stderr: journald reads that prefix
(sd-daemon(3)) from a stream it captures, so the priority survives even then.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

__all__ = [
    "DEFAULT_SOCKET",
    "JournalLogger",
    "JournalLoggerFactory",
    "JournalRenderer",
    "encode_entry",
    "field_name",
    "stderr_is_journal",
]

DEFAULT_SOCKET = "/run/systemd/journal/socket"

# syslog(3) priorities for structlog's level names.
PRIORITIES: Mapping[str, int] = {
    "critical": 2,
    "fatal": 2,
    "exception": 3,
    "error": 3,
    "err": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "msg": 6,
    "debug": 7,
    "trace": 7,
}
_DEFAULT_PRIORITY = 6

# Fields this module sets itself; an event key that maps onto one of them is
# renamed rather than allowed to overwrite it.
_OWN_FIELDS = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"})
_RENAMED_PREFIX = "EVENT_"
# Keys consumed while building MESSAGE and PRIORITY, not repeated as fields.
# The journal stamps every entry itself, so a rendered timestamp is noise.
_CONSUMED_KEYS = frozenset({"event", "level", "timestamp", "exc_info", "exception", "stack"})
_NOT_NAME = re.compile(r"[^A-Z0-9_]")
_MAX_NAME = 64


def field_name(key: str) -> str | None:
    """The journal field name for an event key, or None if nothing usable is left.

    Journal names are ``[A-Z0-9_]``, at most 64 long, and may not start with
    ``_`` (reserved for fields journald itself vouches for) or a digit.
    """
    name = _NOT_NAME.sub("_", key.upper()).lstrip("_0123456789")[:_MAX_NAME]
    return name or None


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _pair(key: str, value: object) -> str:
    rendered = _text(value)
    if not rendered or any(ch.isspace() for ch in rendered) or '"' in rendered:
        rendered = repr(rendered)
    return f"{key}={rendered}"


class JournalRenderer:
    """structlog's final processor: turns an event dict into journal fields.

    Returns a ``dict[str, str]`` of field names to values, which structlog
    passes as keyword arguments to :class:`JournalLogger`. ``MESSAGE`` is the
    event followed by its ``key=value`` pairs, so the plain ``journalctl``
    view still shows them; each pair is also a field of its own for
    filtering.
    """

    def __init__(
        self,
        identifier: str = "edgeinferd",
        *,
        pairs_in_message: bool = True,
    ) -> None:
        self.identifier = identifier
        self.pairs_in_message = pairs_in_message

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> dict[str, str]:
        level = str(event_dict.get("level", method_name)).lower()
        priority = PRIORITIES.get(level, _DEFAULT_PRIORITY)
        fields: dict[str, str] = {}
        pairs: list[str] = []
        for key, value in event_dict.items():
            if key in _CONSUMED_KEYS:
                continue
            name = field_name(key)
            if name is None:
                continue
            if name in _OWN_FIELDS:
                name = _RENAMED_PREFIX + name
            fields[name] = _text(value)
            pairs.append(_pair(key, value))
        message = _text(event_dict.get("event", ""))
        if self.pairs_in_message and pairs:
            message = f"{message} {' '.join(pairs)}" if message else " ".join(pairs)
        for extra in self._tracebacks(event_dict):
            message = f"{message}\n{extra}"
        return {
            "MESSAGE": message,
            "PRIORITY": str(priority),
            "SYSLOG_IDENTIFIER": self.identifier,
            **fields,
        }

    @staticmethod
    def _tracebacks(event_dict: Mapping[str, Any]) -> list[str]:
        """Traceback and stack texts, whichever earlier processors left behind."""
        texts: list[str] = []
        exc_info = event_dict.get("exc_info")
        if exc_info:
            if isinstance(exc_info, BaseException):
                texts.append("".join(traceback.format_exception(exc_info)).rstrip())
            else:
                current = sys.exc_info() if exc_info is True else exc_info
                if isinstance(current, tuple) and current[0] is not None:
                    texts.append("".join(traceback.format_exception(*current)).rstrip())
        elif "exception" in event_dict:
            # Already rendered by format_exc_info (a string) or dict_tracebacks.
            texts.append(_text(event_dict["exception"]).rstrip())
        if "stack" in event_dict:
            texts.append(_text(event_dict["stack"]).rstrip())
        return texts


def encode_entry(fields: Mapping[str, str | bytes]) -> bytes:
    """Serialize fields in the journal's native protocol.

    ``NAME=value\\n`` when the value has no newline; otherwise ``NAME\\n``, the
    value's length as 64-bit little-endian, the value, and ``\\n``.
    """
    parts: list[bytes] = []
    for name, value in fields.items():
        data = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
        key = name.encode("ascii")
        if b"\n" in data:
            parts.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key + b"=" + data + b"\n")
    return b"".join(parts)


class JournalLogger:
    """Sends each rendered entry to journald; safe to share between threads.

    Entries too large for one datagram travel in a sealed memfd, as
    sd_journal_sendv(3) does. Any failure falls back to ``<N>`` prefixed
    lines on ``fallback`` (stderr), with a one-time note saying why.
    """

    def __init__(self, socket_path: str = DEFAULT_SOCKET, fallback: TextIO | None = None) -> None:
        self.socket_path = socket_path
        self._fallback = fallback
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._reported_failure = False

    def msg(self, **fields: str) -> None:
        payload = encode_entry(fields)
        if not self._send(payload):
            self._write_fallback(fields)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg

    def _connect(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # Raise the per-datagram ceiling where the system allows, like
            # libsystemd; larger entries go by memfd anyway.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024 * 1024)
            sock.settimeout(1.0)
            self._socket = sock
        return self._socket

    def _send(self, payload: bytes) -> bool:
        try:
            with self._lock:
                sock = self._connect()
                try:
                    sock.sendto(payload, self.socket_path)
                except OSError as error:
                    if error.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                        raise
                    self._send_memfd(sock, payload)
        except OSError as error:
            self._report(f"cannot write to the journal at {self.socket_path}: {error}")
            return False
        return True

    def _send_memfd(self, sock: socket.socket, payload: bytes) -> None:
        # journald only accepts a memfd it can trust not to change: sealed.
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | fcntl.F_SEAL_SEAL)
            # (socket.send_fds ignores its address argument before 3.12.)
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())
            sock.sendmsg([], [rights], 0, self.socket_path)
        finally:
            os.close(fd)

    def _stream(self) -> TextIO:
        return self._fallback if self._fallback is not None else sys.stderr

    def _report(self, note: str) -> None:
        if self._reported_failure:
            return
        self._reported_failure = True
        with self._lock:
            self._stream().write(f"<4>{note}; logging to stderr instead\n")

    def _write_fallback(self, fields: Mapping[str, str]) -> None:
        prefix = f"<{fields.get('PRIORITY', _DEFAULT_PRIORITY)}>"
        # journald applies a prefix to its own line only: repeat it on each.
        lines = fields.get("MESSAGE", "").splitlines() or [""]
        text = "".join(f"{prefix}{line}\n" for line in lines)
        with self._lock:
            stream = self._stream()
            stream.write(text)
            stream.flush()


class JournalLoggerFactory:
    """structlog ``logger_factory``: one shared :class:`JournalLogger` for every name."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, fallback: TextIO | None = None) -> None:
        self._logger = JournalLogger(socket_path, fallback)

    def __call__(self, *args: Any) -> JournalLogger:
        return self._logger


def stderr_is_journal(
    environ: Mapping[str, str] = os.environ, stream: TextIO | None = None
) -> bool:
    """Whether ``stream`` (stderr) is the journal stream systemd connected.

    JOURNAL_STREAM is ``device:inode`` of that stream; comparing it with the
    actual file, as systemd.exec(5) advises, ignores a value inherited by a
    process whose stderr was redirected elsewhere.
    """
    value = environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        status = os.fstat((stream if stream is not None else sys.stderr).fileno())
        return status.st_dev == int(device) and status.st_ino == int(inode)
    except (OSError, ValueError, AttributeError):
        return False
