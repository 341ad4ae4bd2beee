"""Journal logging, against a real datagram socket playing journald."""

from __future__ import annotations

import array
import fcntl
import io
import os
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from edgeinferd.journal import (
    JournalLogger,
    JournalLoggerFactory,
    JournalRenderer,
    encode_entry,
    field_name,
    stderr_is_journal,
)


def parse_entry(data: bytes) -> dict[str, bytes]:
    """Decode the native protocol the way journald does (both field forms)."""
    fields: dict[str, bytes] = {}
    position = 0
    while position < len(data):
        newline = data.index(b"\n", position)
        line = data[position:newline]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            position = newline + 1
        else:
            name = line
            (length,) = struct.unpack("<Q", data[newline + 1 : newline + 9])
            value = data[newline + 9 : newline + 9 + length]
            assert data[newline + 9 + length : newline + 10 + length] == b"\n"
            position = newline + 10 + length
        fields[name.decode("ascii")] = value
    return fields


class FakeJournald:
    """A bound AF_UNIX datagram socket that reads entries, inline or passed as a memfd."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(2.0)
        self.seals: list[int] = []

    def entry(self) -> dict[str, str]:
        data, ancillary, _, _ = self.socket.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        for level, kind, payload in ancillary:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            (fd,) = array.array("i", payload[:4])
            try:
                self.seals.append(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
                # journald maps the file: read from the start, whatever the offset.
                data = os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        return {name: value.decode() for name, value in parse_entry(data).items()}

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def journald() -> Iterator[FakeJournald]:
    with tempfile.TemporaryDirectory(prefix="jnl") as directory:
        fake = FakeJournald(Path(directory) / "socket")
        yield fake
        fake.close()


def logger_for(socket_path: str, fallback: io.StringIO | None = None) -> Any:
    """A structlog logger wired as docs/operations.md tells the daemon to wire it."""
    return structlog.wrap_logger(
        JournalLoggerFactory(socket_path, fallback)(),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            JournalRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(0),
    )


def test_event_arrives_with_priority_identifier_and_fields(journald: FakeJournald) -> None:
    """An info event carries PRIORITY=6, the identifier, and each key as an uppercase field."""
    log = logger_for(journald.path)
    log.info("request served", model="digits", request_id="r-17", duration_ms=3.25)
    entry = journald.entry()
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "edgeinferd"
    assert entry["MODEL"] == "digits"
    assert entry["REQUEST_ID"] == "r-17"
    assert entry["DURATION_MS"] == "3.25"
    assert entry["MESSAGE"] == "request served model=digits request_id=r-17 duration_ms=3.25"
    assert "TIMESTAMP" not in entry  # the journal stamps entries itself
    assert "LEVEL" not in entry


@pytest.mark.parametrize(
    ("method", "priority"),
    [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")],
)
def test_levels_map_to_syslog_priorities(
    journald: FakeJournald, method: str, priority: str
) -> None:
    """Each structlog level becomes the matching syslog priority, so journalctl -p filters."""
    getattr(logger_for(journald.path), method)("event")
    assert journald.entry()["PRIORITY"] == priority


def test_exception_traceback_is_kept_in_the_message(journald: FakeJournald) -> None:
    """log.exception() sends PRIORITY=3 and the whole traceback, newlines intact."""
    log = logger_for(journald.path)
    try:
        raise ValueError("broken weights")
    except ValueError:
        log.exception("load failed", model="digits")
    entry = journald.entry()
    assert entry["PRIORITY"] == "3"
    lines = entry["MESSAGE"].splitlines()
    assert lines[0] == "load failed model=digits"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: broken weights"


def test_multiline_values_use_the_length_prefixed_form() -> None:
    """A value with newlines is framed by its length, not cut at the first newline."""
    data = encode_entry({"MESSAGE": "one\ntwo\n", "PRIORITY": "6"})
    assert data == b"MESSAGE\n" + struct.pack("<Q", 8) + b"one\ntwo\n\nPRIORITY=6\n"
    assert parse_entry(data) == {"MESSAGE": b"one\ntwo\n", "PRIORITY": b"6"}


def test_field_names_are_made_valid_for_the_journal() -> None:
    """Keys become [A-Z0-9_] names without a leading underscore or digit, at most 64 long."""
    assert field_name("request_id") == "REQUEST_ID"
    assert field_name("http.status-code") == "HTTP_STATUS_CODE"
    assert field_name("_pid") == "PID"
    assert field_name("2nd") == "ND"
    assert field_name("___") is None
    assert field_name("x" * 100) == "X" * 64


def test_event_keys_cannot_overwrite_the_priority(journald: FakeJournald) -> None:
    """A key named like a field the renderer owns is renamed rather than clobbering it."""
    logger_for(journald.path).warning("odd", priority="7", message="hi")
    entry = journald.entry()
    assert entry["PRIORITY"] == "4"
    assert entry["EVENT_PRIORITY"] == "7"
    assert entry["EVENT_MESSAGE"] == "hi"
    assert entry["MESSAGE"].startswith("odd ")


def test_oversized_entries_travel_in_a_sealed_memfd(journald: FakeJournald) -> None:
    """An entry larger than a datagram can carry is passed as a sealed memfd, as journald wants."""
    big = "x" * (16 * 1024 * 1024)
    logger_for(journald.path).info("big", blob=big)
    entry = journald.entry()
    assert entry["BLOB"] == big
    assert journald.seals, "the entry did not come as a file descriptor"
    required = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
    assert journald.seals[0] & required == required


def test_without_journal_socket_lines_get_sd_daemon_prefixes(tmp_path: Path) -> None:
    """With no journald socket, stderr gets '<N>' on every line, once warned why."""
    stream = io.StringIO()
    log = logger_for(str(tmp_path / "missing"), fallback=stream)
    log.warning("slow model", model="digits")
    log.error("two\nlines")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("<4>cannot write to the journal at ")
    assert lines[1:] == ["<4>slow model model=digits", "<3>two", "<3>lines"]


def test_the_journal_resumes_after_it_comes_back() -> None:
    """The same logger reaches journald once its socket appears (journald restarted)."""
    stream = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="jnl") as directory:
        path = Path(directory) / "socket"
        logger = JournalLogger(str(path), stream)
        logger.msg(MESSAGE="early", PRIORITY="6")
        assert stream.getvalue().endswith("<6>early\n")
        fake = FakeJournald(path)
        try:
            logger.msg(MESSAGE="late", PRIORITY="6")
            assert fake.entry() == {"MESSAGE": "late", "PRIORITY": "6"}
        finally:
            fake.close()


def test_stderr_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    """JOURNAL_STREAM counts only when it names the very file stderr is."""
    with (tmp_path / "a").open("w") as ours, (tmp_path / "b").open("w") as other:
        status = os.fstat(ours.fileno())
        environ = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        assert stderr_is_journal(environ, ours)
        assert not stderr_is_journal(environ, other)
        assert not stderr_is_journal({}, ours)
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, ours)
