"""The shipped systemd unit: systemd accepts every line, and its sandbox stays tight."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edgeinferd.service"
EXEC_START = "/opt/edgeinfer/venv/bin/edgeinferd --config /etc/edgeinfer/edgeinferd.toml"
MAX_EXPOSURE = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (Debian: apt-get install systemd procps)",
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value assigned, in order (systemd keys repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `systemd-analyze verify` on a copy whose ExecStart binary exists.

    The real ExecStart lives in the installed virtual environment, which a test
    machine lacks; verify refuses a missing binary, which would hide every
    other finding. Only that path is swapped, for /bin/true.
    """
    assert SYSTEMD_ANALYZE is not None
    original = "ExecStart=" + EXEC_START
    assert original in unit_text
    copy = tmp_path / "edgeinferd.service"
    copy.write_text(unit_text.replace(original, "ExecStart=/bin/true --config /dev/null"))
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def verify_findings(result: subprocess.CompletedProcess[str]) -> str:
    """Everything verify complained about; systemd only warns on unknown keys, rc stays 0."""
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else " (rc!=0)")


def exposure(unit: Path) -> tuple[float, str]:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)\s*(.*)", result.stdout)
    assert match, f"no exposure line in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1)), match.group(0)


@needs_systemd_analyze
def test_verify_accepts_every_line(tmp_path: Path) -> None:
    """systemd-analyze verify reports nothing at all about the unit."""
    findings = verify_findings(verify(UNIT.read_text(), tmp_path))
    assert findings == ""


@needs_systemd_analyze
def test_verify_catches_a_misspelled_directive(tmp_path: Path) -> None:
    """A misspelled key in the unit would be reported, so the test above can fail."""
    broken = UNIT.read_text().replace("\nLockPersonality=yes", "\nLockPersonalty=yes")
    findings = verify_findings(verify(broken, tmp_path))
    assert "LockPersonalty" in findings


@needs_systemd_analyze
def test_verify_catches_a_bad_value(tmp_path: Path) -> None:
    """An unparsable value (a mode that is not octal) would be reported too."""
    broken = UNIT.read_text().replace("\nUMask=0007", "\nUMask=0o007")
    assert "0o007" in verify_findings(verify(broken, tmp_path))


@needs_systemd_analyze
def test_security_exposure_is_at_most_two() -> None:
    """systemd-analyze security rates the sandbox's overall exposure at 2.0 or lower."""
    level, line = exposure(UNIT)
    assert level <= MAX_EXPOSURE, line


@needs_systemd_analyze
def test_security_check_notices_a_weaker_sandbox(tmp_path: Path) -> None:
    """Dropping the sandbox raises the measured exposure, so the bound is not vacuous."""
    weak = tmp_path / "edgeinferd.service"
    kept = ("Type=", "ExecStart=", "ExecReload=", "User=", "Group=")
    lines = UNIT.read_text().splitlines()
    weak.write_text(
        "\n".join(
            line
            for line in lines
            if line.startswith("[") or line.startswith(kept) or not line or line[0] == "#"
        )
        + "\n"
    )
    assert exposure(weak)[0] > MAX_EXPOSURE


def test_unit_is_a_notify_service_with_watchdog_and_reload() -> None:
    """The unit declares the start-up, reload, watchdog and restart contract the daemon keeps."""
    service = parse_unit(UNIT.read_text())["Service"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == [EXEC_START]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["WatchdogSec"] == ["30s"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartSec"] == ["5s"]
    assert "PYTHONUNBUFFERED=1" in service["Environment"]
    assert service["LimitNOFILE"] == ["4096"]  # chosen on purpose (docs/operations.md)


def test_unit_makes_the_socket_reachable_by_group_only() -> None:
    """The socket directory and umask let group edgeinfer, and nobody else, connect."""
    service = parse_unit(UNIT.read_text())["Service"]
    assert service["User"] == ["edgeinfer"]
    assert service["Group"] == ["edgeinfer"]
    assert "DynamicUser" not in service
    assert service["RuntimeDirectory"] == ["edgeinfer"]
    assert service["RuntimeDirectoryMode"] == ["0750"]
    assert service["UMask"] == ["0007"]
    # It would mount /etc/edgeinfer read-write into the sandbox (seen under systemd 252).
    assert "ConfigurationDirectory" not in service
    assert service["ReadOnlyPaths"] == ["-/var/lib/edgeinfer/models"]


def test_unit_keeps_the_hardening_the_issue_asks_for() -> None:
    """Each requested sandboxing switch is present with its strict value."""
    service = parse_unit(UNIT.read_text())["Service"]
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "PrivateUsers": "yes",
        "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
        "IPAddressDeny": "any",
        "IPAddressAllow": "localhost",
        "ProcSubset": "pid",
        "ProtectProc": "invisible",
    }
    assert {key: service.get(key, ["<missing>"])[-1] for key in expected} == expected
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert "MemoryDenyWriteExecute" not in service
