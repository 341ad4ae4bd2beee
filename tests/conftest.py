"""Fixtures: real daemons in subprocesses, on real sockets, called through the real client."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

import edgeinfer
from tests import models

ROOT = Path(__file__).resolve().parent.parent

# CI replays the same generated inputs every run, so a landing is never decided by
# chance; locally each run explores new ones (and prints any failing batch).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``-n 2 --dist loadgroup`` (scripts/test.sh) each file runs on one worker, so its
    module fixtures start once; the language-model files share one worker and its
    session-scoped imports and reference model."""
    for item in items:
        module = item.path.stem
        group = "llm" if module.startswith("test_llm_") else module
        item.add_marker(pytest.mark.xdist_group(group))


def short_tmpdir() -> Path:
    """Unix socket paths must stay under 108 bytes; pytest's tmp paths can be longer."""
    return Path(tempfile.mkdtemp(prefix="ei-", dir="/tmp"))


class Daemon:
    """A running ``edgeinferd`` process and how to reach it."""

    def __init__(
        self,
        config_text: str,
        workdir: Path,
        env: dict[str, str] | None = None,
        launcher: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.socket = workdir / "edgeinfer.sock"
        self.config = workdir / "edgeinferd.toml"
        self.config.write_text(config_text.replace("@SOCKET@", str(self.socket)))
        self.log = workdir / "daemon.log"
        self._log_file = self.log.open("wb")
        # A launcher script stands in for ``-m edgeinferd`` when a test must change the
        # daemon's code before it runs (it then calls edgeinferd.cli.main itself).
        entry = [str(launcher)] if launcher is not None else ["-m", "edgeinferd"]
        self.process = subprocess.Popen(
            [sys.executable, *entry, "--config", str(self.config)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=workdir,
        )
        self.address = f"unix://{self.socket}"

    def wait_ready(self, timeout: float = 60.0) -> Daemon:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.process.returncode}:\n{self.log_text()}"
                )
            if self.socket.exists():
                try:
                    with edgeinfer.Client(self.address, timeout=2) as client:
                        if client.health() == "SERVING":
                            return self
                except edgeinfer.EdgeInferError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log_text()}")

    def client(self, **kwargs: object) -> edgeinfer.Client:
        return edgeinfer.Client(self.address, **kwargs)  # type: ignore[arg-type]

    def log_text(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode


def daemon_config(repository: Path, extra: str = "") -> str:
    return f'repository = "{repository}"\n[listen]\nunix = "@SOCKET@"\n{extra}'


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One repository with good and bad models, shared by the session."""
    repo = tmp_path_factory.mktemp("repo")
    models.add_mlp(repo)
    models.add_adder(repo)
    models.add_picky(repo)
    models.add_slow(repo)
    models.add_corrupt(repo)
    models.add_pickled(repo)
    models.add_with_manifest(repo, "signed")
    models.add_with_manifest(repo, "tampered", tamper=True)
    return repo


@pytest.fixture(scope="session")
def daemon(model_repo: Path) -> Iterator[Daemon]:
    """A daemon serving ``model_repo`` for the whole session (tests must not change it)."""
    workdir = short_tmpdir()
    process = Daemon(daemon_config(model_repo), workdir).wait_ready()
    yield process
    process.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def client(daemon: Daemon) -> Iterator[edgeinfer.Client]:
    with daemon.client(timeout=30) as c:
        yield c


StartDaemon = Callable[..., Daemon]


@pytest.fixture
def start_daemon() -> Iterator[StartDaemon]:
    """Start private daemons (for tests that load, unload, signal or kill)."""
    started: list[Daemon] = []

    def start(
        repository: Path,
        extra_config: str = "",
        wait: bool = True,
        env: dict[str, str] | None = None,
        launcher: Path | None = None,
    ) -> Daemon:
        process = Daemon(daemon_config(repository, extra_config), short_tmpdir(), env, launcher)
        started.append(process)
        return process.wait_ready() if wait else process

    yield start
    for process in started:
        process.stop()
        shutil.rmtree(process.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def llm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 imported by ``edgeinferd import`` in its default form and in fp32, plus
    two models sharing the int4 weights: a short context, and a tiny prefill chunk."""
    from tests import llm

    source = llm.require_gguf()
    repo = tmp_path_factory.mktemp("llm")
    for name, form in ((llm.NAME, "int4"), (llm.FP32, "none")):
        subprocess.run(
            [sys.executable, "-m", "edgeinferd", "import", str(source), "--repository",
             str(repo), "--name", name, "--quantize", form, "--max-sequences", "4"],
            check=True,
        )  # fmt: skip
    for name, table in (
        ("smollm2-short", "max_sequences = 2\ncontext = 48\n"),
        ("smollm2-chunked", "max_sequences = 4\ncontext = 2048\nprefill_chunk = 5\n"),
    ):
        (repo / name / "1").mkdir(parents=True)
        for file in (repo / llm.NAME / "1").iterdir():
            os.link(file, repo / name / "1" / file.name)
        (repo / name / "config.toml").write_text(f"[generation]\n{table}")
    return repo


@pytest.fixture(scope="session")
def llm_daemon(llm_repo: Path) -> Iterator[Daemon]:
    """One daemon serving the LLM repository for the session (tests must not change it)."""
    workdir = short_tmpdir()
    process = Daemon(daemon_config(llm_repo), workdir).wait_ready(timeout=300)
    yield process
    process.stop()
    shutil.rmtree(workdir, ignore_errors=True)
