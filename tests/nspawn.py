"""A real systemd as PID 1 of a throwaway container, for tests of the unit under it.

``systemd-nspawn`` boots this machine's own ``/usr`` with a volatile root: ``/``
is a fresh tmpfs (so ``/etc``, ``/var``, ``/opt``, ``/tmp`` and ``/home`` start
empty and vanish with the container), ``/usr`` is an overlay whose writes land
in a temporary upper layer, the network is private, and only the folders the
tests name are bound in, read-only. Nothing the container's systemd does (its
tmpfiles clean-up, its journal, the units it starts) reaches this machine.

Commands run inside through ``nsenter`` into the container's namespaces, with
a clean environment. The container is stopped with SIGTERM to nspawn (its
systemd halts); if that does not end it, nspawn and then the container's
PID 1 are killed by their own PIDs.

The daemon's venv is built inside from the container's system Python, offline,
from wheels prepared here (:func:`wheelhouse`), the way a device without a
network is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Dependency wheels, kept between runs (EDGEINFER_WHEELHOUSE overrides).
WHEELHOUSE = Path(
    os.environ.get("EDGEINFER_WHEELHOUSE", Path.home() / ".cache" / "edgeinfer" / "wheelhouse")
)
#: The torch build installed into the container: the CPU one, as in development.
TORCH = "torch==2.13.0"
SYSTEM_PYTHON = Path("/usr/bin/python3")
_INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


def unavailable() -> str | None:
    """Why a container cannot boot here, or None if it can."""
    if sys.platform != "linux":
        return "systemd-nspawn needs Linux"
    if os.geteuid() != 0:
        return "booting a systemd container needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian packages systemd-container, util-linux)"
    if not SYSTEM_PYTHON.exists():
        return f"{SYSTEM_PYTHON} is missing: the container builds the daemon's venv from it"
    probe = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import ensurepip, venv"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return f"{SYSTEM_PYTHON} cannot create a venv (Debian package python3-venv)"
    namespaces = subprocess.run(
        ["unshare", "--mount", "--pid", "--net", "--uts", "--ipc", "--fork", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if namespaces.returncode != 0:
        return f"cannot create namespaces: {namespaces.stderr.strip()}"
    return None


def _pip(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *argv], capture_output=True, text=True, check=False
    )


def wheelhouse(dist: Path) -> tuple[Path, Path]:
    """Build this checkout's wheel into ``dist``; make sure WHEELHOUSE holds its dependencies.

    Returns (the project's wheel, the wheelhouse). The dependencies are fetched
    once (from the package index), for the container's Python, and reused
    while they still satisfy the project's requirements.
    """
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist), str(ROOT))
    if built.returncode != 0:
        raise RuntimeError(f"cannot build the project's wheel:\n{built.stderr}")
    (wheel,) = dist.glob("edgeinfer-*.whl")
    version = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    wanted = [f"{wheel}[daemon]", TORCH]
    target = ["--only-binary=:all:", "--python-version", version, "--dest", str(WHEELHOUSE)]
    cached = _pip("download", "--no-index", "--find-links", str(WHEELHOUSE), *target, *wanted)
    if cached.returncode != 0:
        fetched = _pip("download", *target, *wanted)
        if fetched.returncode != 0:
            raise RuntimeError(f"cannot fill the wheelhouse {WHEELHOUSE}:\n{fetched.stderr}")
    for copy in WHEELHOUSE.glob("edgeinfer-*.whl"):
        copy.unlink()  # pip download copies the project's wheel too; it lives in dist
    gpu = [p.name for p in WHEELHOUSE.glob("nvidia_*.whl")]
    if gpu:
        raise RuntimeError(f"the wheelhouse {WHEELHOUSE} holds GPU wheels ({gpu}); remove it")
    return wheel, WHEELHOUSE


class Container:
    """One booted container: run commands in it, reach its files, stop it."""

    def __init__(self, name: str, binds: Mapping[Path, str], log: Path) -> None:
        self.name = name
        self.binds = dict(binds)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self._leader_namespace: str | None = None

    def boot(self, timeout: float = 120) -> Container:
        argv = [
            "systemd-nspawn",
            "--quiet",
            "--directory=/",
            "--volatile=yes",
            "--overlay=/usr::/usr",
            "--private-network",
            "--register=no",
            "--keep-unit",
            "--console=passive",
            f"--machine={self.name}",
            *(f"--bind-ro={source}:{target}" for source, target in self.binds.items()),
            "--boot",
            # A machine-id is provided; the wizard would only wait for a keyboard.
            "systemd.firstboot=off",
        ]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        self.leader = self._wait_for_leader(deadline)
        self._leader_namespace = os.readlink(f"/proc/{self.leader}/ns/pid")
        private = self.path("/run/systemd/private")
        while not private.exists():
            self._check_alive(deadline)
            time.sleep(0.05)
        state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
        if state.stdout.strip() not in ("running", "degraded"):
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            raise RuntimeError(f"container did not boot: {state.stdout.strip()}\n{failed}")
        return self

    def _check_alive(self, deadline: float) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"systemd-nspawn exited with {self.process.returncode}:\n"
                + self.log.read_text(errors="replace")
            )
        if time.monotonic() > deadline:
            raise RuntimeError("the container did not boot in time:\n" + self.log.read_text())

    def _wait_for_leader(self, deadline: float) -> int:
        """nspawn's child, once it has become the container's systemd."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        while True:
            self._check_alive(deadline)
            for pid in children.read_text().split():
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
                except FileNotFoundError:
                    pass
            time.sleep(0.05)

    def path(self, inside: str) -> Path:
        """A path inside the container, as this machine reaches it (root only)."""
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 300,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (as its root) and capture its output."""
        inside_env = [f"{k}={v}" for k, v in {**_INSIDE_ENV, **(env or {})}.items()]
        result = subprocess.run(
            ["nsenter", f"--target={self.leader}", "--all", "env", "-i", *inside_env, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited with {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def host_pid(self, pid: int) -> int:
        """This machine's PID of the container's process ``pid``."""
        namespace = self._leader_namespace
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") != namespace:
                    continue
                status = (entry / "status").read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                    return int(entry.name)
        raise LookupError(f"no process {pid} in the container")

    def stop(self, timeout: float = 60) -> None:
        """Halt the container's systemd through nspawn; kill by PID only if that fails."""
        if self.process is None:
            return
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # A killed nspawn leaves the container's systemd running: end it by its PID,
        # once sure the PID is still that systemd (same PID namespace as at boot).
        if self.leader is None or self._leader_namespace is None:
            return
        try:
            if os.readlink(f"/proc/{self.leader}/ns/pid") == self._leader_namespace:
                os.kill(self.leader, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def journal(container: Container, *match: str, since_cursor: str | None = None) -> list[dict]:
    """The container's journal entries for the matches, as journalctl's JSON objects."""
    argv: Sequence[str] = ["journalctl", "--no-pager", "-o", "json", *match]
    if since_cursor is not None:
        argv = [*argv, f"--after-cursor={since_cursor}"]
    output = container.run(*argv, check=False).stdout
    return [json.loads(line) for line in output.splitlines() if line.strip()]
