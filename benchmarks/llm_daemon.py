"""The daemon side of the LLM benchmark: import, serve, and measure through the real client.

Every speed figure is taken the way a caller sees it: the daemon runs as its own process
on a private Unix socket and is called with ``edgeinfer.AsyncClient``, so gRPC and the
daemon's scheduling are counted. Perplexity is the exception: it needs every position's
logits, which no RPC returns, so it is computed in this process through
``load_language_model`` on the same imported files the daemon serves.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import edgeinfer
from edgeinfer.client import Prompt

MODEL_NAME = "smollm2"
T = TypeVar("T")


def edgeinferd_command() -> list[str]:
    return [sys.executable, "-m", "edgeinferd"]


def import_model(
    gguf: Path, repository: Path, quantize: str, threads: int, max_sequences: int
) -> tuple[Path, float]:
    """``edgeinferd import``; returns (the version folder, seconds the import took)."""
    started = time.perf_counter()
    command = [*edgeinferd_command(), "import", str(gguf), "--repository", str(repository)]
    command += ["--name", MODEL_NAME, "--quantize", quantize]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    elapsed = time.perf_counter() - started
    configure_generation(repository / MODEL_NAME / "config.toml", threads, max_sequences)
    versions = sorted(
        (p for p in (repository / MODEL_NAME).iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    if not versions:
        raise SystemExit(f"edgeinferd import wrote no version folder under {repository}")
    return versions[-1], elapsed


def configure_generation(config: Path, threads: int, max_sequences: int) -> None:
    """Set ``threads`` and ``max_sequences`` in the ``[generation]`` table of config.toml.

    The importer writes its own defaults (threads: every core; a few slots); the benchmark
    needs a fixed thread count, the same as llama.cpp's, and a slot for each concurrent
    sequence it sends.
    """
    text = config.read_text()
    wanted = {"threads": threads, "max_sequences": max_sequences}
    section = re.search(r"^\[generation\][^\[]*", text, flags=re.MULTILINE)
    if section is None:
        text = text.rstrip("\n") + "\n\n[generation]\n"
        section = re.search(r"^\[generation\][^\[]*", text, flags=re.MULTILINE)
        assert section is not None
    body = section.group(0)
    for key, value in wanted.items():
        pattern = rf"^{key}\s*=.*$"
        if re.search(pattern, body, flags=re.MULTILINE):
            body = re.sub(pattern, f"{key} = {value}", body, flags=re.MULTILINE)
        else:
            body = body.replace("[generation]\n", f"[generation]\n{key} = {value}\n", 1)
    text = text[: section.start()] + body + text[section.end() :]
    config.write_text(text)
    written = tomllib.loads(text).get("generation", {})
    if any(written.get(key) != value for key, value in wanted.items()):
        raise SystemExit(f"{config}: could not set {wanted} in [generation]")


def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set size of a live process (VmHWM in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"/proc/{pid}/status has no VmHWM")


class Daemon:
    """``edgeinferd --repository DIR --unix SOCKET`` as a child process, until ``stop``."""

    def __init__(self, repository: Path, workdir: Path) -> None:
        self.socket = workdir / f"{repository.name}.sock"
        self.address = f"unix://{self.socket}"
        self.log_path = workdir / f"{repository.name}.log"
        command = [*edgeinferd_command(), "--repository", str(repository)]
        command += ["--unix", str(self.socket), "--log-level", "warning"]
        self._log = self.log_path.open("wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, model: str, timeout: float = 600) -> float:
        """Seconds from spawn until health says the model is SERVING (polled every 20 ms).

        Polling is the measurement itself here: its 20 ms step is the resolution of the
        figure, not a guess at how long anything takes.
        """
        deadline = self.started + timeout
        with edgeinfer.Client(self.address, timeout=5) as client:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise SystemExit(f"the daemon exited:\n{self.log_path.read_text()[-3000:]}")
                if self.socket.exists():
                    try:
                        if client.health(model) == "SERVING":
                            return time.perf_counter() - self.started
                    except edgeinfer.EdgeInferError:
                        pass
                time.sleep(0.02)
        raise SystemExit(f"{model} was not SERVING after {timeout} s:\n{self.log_path.read_text()}")

    def peak_rss_bytes(self) -> int:
        return vm_hwm_bytes(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@dataclass
class Stream:
    """One generation as the client saw it: when each chunk arrived and what it held."""

    sent: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    summary: edgeinfer.GenerateSummary | None = None
    #: When the first message (chunk or summary) arrived.
    first: float | None = None

    @property
    def ttft(self) -> float:
        assert self.first is not None
        return self.first - self.sent


async def _generate(
    client: edgeinfer.AsyncClient, model: str, prompt: Prompt, tokens: int
) -> Stream:
    stream = Stream(time.perf_counter())
    async for event in client.generate(model, prompt, max_new_tokens=tokens, temperature=0.0):
        now = time.perf_counter()
        if stream.first is None:
            stream.first = now
        if isinstance(event, edgeinfer.GenerateSummary):
            stream.summary = event
        else:
            stream.arrivals.append((now, len(event.token_ids)))
            stream.token_ids.extend(event.token_ids)
            stream.text += event.text
    if stream.summary is None:
        raise SystemExit("a generation ended without its summary")
    return stream


def decode_rate(streams: list[Stream]) -> tuple[float, int]:
    """Aggregate decode tokens/s while every sequence is decoding; (rate, tokens counted).

    The window opens when the last of the sequences has its first token (all prefills
    done) and closes when the first of them receives its last one, so it holds only steps
    that decode all N sequences together, as llama-batched-bench's TG phase does. Tokens
    arriving inside the window, over all sequences, divided by its length.
    """
    opens = max(s.arrivals[0][0] for s in streams)
    closes = min(s.arrivals[-1][0] for s in streams)
    counted = sum(n for s in streams for t, n in s.arrivals if opens < t <= closes)
    if closes <= opens or counted == 0:
        return 0.0, 0
    return counted / (closes - opens), counted


@dataclass(frozen=True)
class RoundResult:
    decode_tokens_per_s: float
    tokens_counted: int
    generated: list[int]
    ttfts: list[float]


class Caller:
    """Measurements through the asyncio client against one daemon."""

    def __init__(self, address: str, model: str = MODEL_NAME) -> None:
        self.address = address
        self.model = model

    def _run(self, work: Callable[[edgeinfer.AsyncClient], Awaitable[T]]) -> T:
        """One event loop and one channel per measurement, closed before the next."""

        async def main() -> T:
            async with edgeinfer.AsyncClient(self.address, timeout=1800) as client:
                return await work(client)

        return asyncio.run(main())

    def warm_up(self, prompt: list[int]) -> None:
        self._run(lambda client: _generate(client, self.model, prompt, 8))

    def prefill(self, prompt: list[int]) -> tuple[float, Stream]:
        """Prompt tokens/s for one prompt: its length over the time to the first message."""
        stream = self._run(lambda client: _generate(client, self.model, prompt, 1))
        return len(prompt) / stream.ttft, stream

    def decode(self, prompts: list[list[int]], tokens: int) -> RoundResult:
        """``len(prompts)`` generations at once, each ``tokens`` long unless it stops."""

        async def round_(client: edgeinfer.AsyncClient) -> list[Stream]:
            return list(
                await asyncio.gather(*(_generate(client, self.model, p, tokens) for p in prompts))
            )

        streams = self._run(round_)
        rate, counted = decode_rate(streams)
        return RoundResult(
            rate, counted, [len(s.token_ids) for s in streams], [s.ttft for s in streams]
        )

    def first_tokens(self, prompts: list[list[int]]) -> list[float]:
        """Time to first token of one request at a time, each with one new token."""

        async def serial(client: edgeinfer.AsyncClient) -> list[float]:
            return [(await _generate(client, self.model, p, 1)).ttft for p in prompts]

        return self._run(serial)

    def answer(self, system: str, question: str, tokens: int) -> Stream:
        """A chat answer: the messages go to the daemon, which applies the model's template."""
        messages = [
            edgeinfer.ChatMessage("system", system),
            edgeinfer.ChatMessage("user", question),
        ]
        return self._run(lambda client: _generate(client, self.model, messages, tokens))


def in_process_model(version: Path, threads: int) -> Any:
    """``load_language_model`` on the imported files, with torch on ``threads`` threads."""
    import torch

    from edgeinferd.generation.model import load_language_model

    torch.set_num_threads(threads)
    return load_language_model(version)
