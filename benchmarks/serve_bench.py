"""How fast edgeinferd serves, next to raw PyTorch and an empty gRPC server, in one run.

    python benchmarks/serve_bench.py            # the full run (about 5 minutes)
    python benchmarks/serve_bench.py --quick    # a smoke run (about 1.5 minutes)

The seed MLP (Linear 1000->500, ReLU, Linear 500->10, float32, TorchScript,
max_batch_size 32) and a 4 MiB-input model are written into a temporary model
repository. Then, on this machine and in this order:

1. raw PyTorch in this process: forward passes/s at batch 1, 8 and 32, on one
   thread and on torch's default thread count;
2. which load generator is strongest: ``edgeinfer bench`` with 1 and with 2
   processes against the echo server (benchmarks/echo_server.py); the better
   one is used, identically, for every server measurement;
3. the echo server and the daemon, each over its Unix socket and over TCP, all
   four running at once and measured back to back per scenario (and, in the
   full run, in three rounds keeping each one's best: the machine is shared,
   and interference only ever slows a cell down);
4. the daemon's costs taken apart: the echo server with a thread hop per call,
   and the daemon without a queue delay, next to the echo server and the daemon;
5. a 4 MiB input inline and through shared memory;
6. the daemon's start-up time (spawn to health SERVING) and idle RSS, with this
   repository and with the example repository (build/models) if it is built;
7. a py-spy profile of the daemon under unary c=32 load, and its CPU per call
   by thread;
8. grpc.aio server options on the echo server over TCP.

Writes benchmarks/results/serve_bench.{md,json,png} and profile.svg, and puts
the tables into benchmarks/README.md between its result markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
EXAMPLE_REPOSITORY = ROOT / "build" / "models"

MLP_CONFIG = """
max_batch_size = 32
[[inputs]]
name = "x"
dtype = "float32"
shape = [1000]
[[outputs]]
name = "y"
dtype = "float32"
shape = [10]
"""

#: 1024 x 1024 float32: 4 MiB in, 4 KiB out (the column sums).
BLOB_CONFIG = """
[[inputs]]
name = "x"
dtype = "float32"
shape = [1024, 1024]
[[outputs]]
name = "y"
dtype = "float32"
shape = [1024]
"""

#: Messages in flight on the one stream of the stream scenario.
STREAM_DEPTH = 16

B1 = "unary batch 1"
SCENARIOS = [
    ("c1", "unary, batch 1, 1 caller"),
    ("c8", "unary, batch 1, 8 callers"),
    ("c32", "unary, batch 1, 32 callers"),
    ("b32", "unary, batch 32, 1 caller"),
    ("stream", f"stream of batch-1 messages, {STREAM_DEPTH} in flight"),
]
TARGETS = ["echo unix", "daemon unix", "echo tcp", "daemon tcp"]


@dataclass(frozen=True)
class Settings:
    duration: float
    warmup: float
    rounds: int
    raw_seconds: float
    startup_repeats: int
    profile_seconds: float


FULL = Settings(
    duration=1.5, warmup=0.5, rounds=3, raw_seconds=1.0, startup_repeats=3, profile_seconds=4
)
QUICK = Settings(
    duration=0.8, warmup=0.2, rounds=1, raw_seconds=0.4, startup_repeats=1, profile_seconds=1.5
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models and raw PyTorch


def build_repository(repo: Path) -> None:
    import torch
    from torch import nn

    class ColumnSums(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(0)

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1000, 500), nn.ReLU(), nn.Linear(500, 10)).eval()
    for name, module, config in (
        ("mlp", mlp, MLP_CONFIG),
        ("blob", ColumnSums(), BLOB_CONFIG),
    ):
        folder = repo / name / "1"
        folder.mkdir(parents=True)
        torch.jit.script(module).save(str(folder / "model.pt"))
        (repo / name / "config.toml").write_text(config)


def measure_raw(repo: Path, seconds: float) -> dict[str, Any]:
    """Forward passes per second of the saved TorchScript models, in this process."""
    import torch

    default_threads = torch.get_num_threads()
    mlp = torch.jit.load(str(repo / "mlp" / "1" / "model.pt")).eval()
    blob = torch.jit.load(str(repo / "blob" / "1" / "model.pt")).eval()
    result: dict[str, Any] = {"default_threads": default_threads, "mlp": {}, "blob": {}}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for batch in (1, 8, 32):
            rate = _passes_per_second(mlp, torch.randn(batch, 1000), seconds)
            result["mlp"][f"{threads}t/b{batch}"] = {
                "threads": threads,
                "batch": batch,
                "passes_per_s": rate,
                "rows_per_s": rate * batch,
                "us_per_pass": 1e6 / rate,
            }
        rate = _passes_per_second(blob, torch.randn(1024, 1024), seconds)
        result["blob"][f"{threads}t"] = {"threads": threads, "passes_per_s": rate}
    torch.set_num_threads(default_threads)
    return result


def merge_raw(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """Keep each raw figure's better measurement (as for the servers), and both."""
    merged: dict[str, Any] = {"default_threads": start["default_threads"]}
    for model in ("mlp", "blob"):
        merged[model] = {}
        for key, first in start[model].items():
            second = end[model][key]
            best = dict(max(first, second, key=lambda item: item["passes_per_s"]))
            best["start_passes_per_s"] = first["passes_per_s"]
            best["end_passes_per_s"] = second["passes_per_s"]
            merged[model][key] = best
    return merged


def _passes_per_second(module: Any, x: Any, seconds: float) -> float:
    import torch

    with torch.inference_mode():
        for _ in range(20):
            module(x)
        count = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(10):
                module(x)
            count += 10
    return count / elapsed


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Process:
    """A server in a subprocess (daemon or echo), its log, and how to reach it."""

    def __init__(
        self,
        name: str,
        command: list[str],
        workdir: Path,
        unix: Path | None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.unix = unix
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.spawned = time.monotonic()
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, env=env
        )
        self.pid = self.process.pid

    def wait_ready(self, address: str, timeout: float = 120) -> float:
        """Seconds from spawn to health SERVING."""
        import edgeinfer

        deadline = self.spawned + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-2000:]}")
            if self.unix is None or self.unix.exists():
                # A fresh channel each try: a failed one would wait out its reconnect backoff.
                try:
                    with edgeinfer.Client(address, timeout=1) as client:
                        if client.health() == "SERVING":
                            return time.monotonic() - self.spawned
                except edgeinfer.EdgeInferError:
                    pass
            time.sleep(0.005)
        raise RuntimeError(f"{self.name} not ready after {timeout} s")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def daemon_command(repo: Path, unix: Path, tcp: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "edgeinferd", "--repository", str(repo), "--unix", str(unix)]
    return command + (["--tcp", tcp] if tcp else [])


def echo_command(unix: Path | None, tcp: str | None, extra: list[str] | None = None) -> list[str]:
    """The echo server for the seed MLP; ``extra``: more echo_server.py arguments."""
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "echo_server.py"),
        "--model",
        "mlp",
        "--input",
        "x:float32:1000",
        "--output",
        "y:float32:10",
        "--max-batch-size",
        "32",
    ]
    command += ["--unix", str(unix)] if unix else []
    command += ["--tcp", tcp] if tcp else []
    return command + (extra or [])


# ---------------------------------------------------------------- the load generator


def bench(
    address: str, model: str, pid: int, settings: Settings, *args: str, errors_ok: bool = False
) -> list[dict[str, Any]]:
    """One ``edgeinfer bench --json`` run; its cells (failed calls are an error unless ok)."""
    command = [sys.executable, "-m", "edgeinfer.cli", "-a", address, "--timeout", "60"]
    command += ["bench", model, "--json", "--server-pid", str(pid)]
    command += ["--duration", str(settings.duration), "--warmup", str(settings.warmup), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
    cells: list[dict[str, Any]] = json.loads(result.stdout)["results"]
    for cell in cells:
        if cell["errors"] and not errors_ok:
            raise RuntimeError(f"errors in {' '.join(command)}: {cell['errors']}")
    return cells


def keep_best(store: dict[str, dict[str, Any]], key: str, cell: dict[str, Any]) -> None:
    """Interference only slows a cell down: keep each cell's best round."""
    best = store.get(key)
    if best is None or cell["throughput"] > best["throughput"]:
        cell["rounds"] = (best or {}).get("rounds", 0) + 1
        store[key] = cell
    else:
        best["rounds"] += 1


# ---------------------------------------------------------------- the run


@contextmanager
def servers(repo: Path, workdir: Path) -> Iterator[dict[str, tuple[str, Process]]]:
    """Echo and daemon, each on a Unix socket and a TCP port: address and process by target."""
    started: list[Process] = []
    try:
        echo_tcp = f"127.0.0.1:{free_port()}"
        echo = Process("echo", echo_command(workdir / "echo.sock", echo_tcp), workdir, None)
        started.append(echo)
        daemon_tcp = f"127.0.0.1:{free_port()}"
        daemon = Process(
            "daemon", daemon_command(repo, workdir / "d.sock", daemon_tcp), workdir, None
        )
        started.append(daemon)
        targets = {
            "echo unix": (f"unix://{workdir / 'echo.sock'}", echo),
            "echo tcp": (echo_tcp, echo),
            "daemon unix": (f"unix://{workdir / 'd.sock'}", daemon),
            "daemon tcp": (daemon_tcp, daemon),
        }
        echo.wait_ready(targets["echo tcp"][0])
        daemon.wait_ready(targets["daemon tcp"][0])
        yield targets
    finally:
        for process in started:
            process.stop()


def choose_processes(target: tuple[str, Process], settings: Settings) -> tuple[int, dict[str, Any]]:
    address, process = target
    cells: dict[str, dict[str, Any]] = {}
    for _ in range(settings.rounds):
        for processes in (1, 2):
            cell = bench(
                address, "mlp", process.pid, settings, "-c", "32", "--processes", str(processes)
            )[0]
            keep_best(cells, str(processes), cell)
    chosen = max((1, 2), key=lambda p: cells[str(p)]["throughput"])
    return chosen, {"chosen": chosen, "cells": cells}


def run_scenarios(
    targets: dict[str, tuple[str, Process]], processes: int, settings: Settings
) -> dict[str, dict[str, Any]]:
    """Every scenario on every target, targets back to back per scenario."""
    table: dict[str, dict[str, Any]] = {t: {} for t in TARGETS}
    common = ("--processes", str(processes))
    for round_number in range(settings.rounds):
        log(f"round {round_number + 1}/{settings.rounds}")
        for target in TARGETS:
            address, process = targets[target]
            for key, cell in zip(
                ("c1", "c8", "c32"),
                bench(address, "mlp", process.pid, settings, "-c", "1,8,32", *common),
                strict=True,
            ):
                keep_best(table[target], key, cell)
        for target in TARGETS:
            address, process = targets[target]
            cell = bench(address, "mlp", process.pid, settings, "-b", "32", *common)[0]
            keep_best(table[target], "b32", cell)
        for target in TARGETS:
            address, process = targets[target]
            # One stream in one process: the stream cannot be split.
            args = ("--mode", "stream", "-c", str(STREAM_DEPTH), "--processes", "1")
            keep_best(
                table[target], "stream", bench(address, "mlp", process.pid, settings, *args)[0]
            )
    return table


#: The decomposition's rows: (label, what it isolates).
PARTS = [
    ("echo", "gRPC alone: decode nothing, answer cached bytes"),
    ("echo + thread hop", "the same, each call handed to a thread and back (no model)"),
    ("daemon, no queue delay", "the daemon with max_queue_delay_us = 0"),
    ("daemon (defaults)", "the daemon as shipped: adaptive 1 ms queue delay"),
]


def run_decomposition(
    targets: dict[str, tuple[str, Process]], repo: Path, workdir: Path, settings: Settings
) -> dict[str, dict[str, Any]]:
    """The daemon's costs taken apart, side by side over Unix sockets.

    The echo server with a thread hop costs what keeping work off the event
    loop costs with no model; the daemon without a queue delay shows what the
    adaptive delay buys. Every row runs each scenario back to back.
    """
    zero_repo = workdir / "repo-zero-delay"
    shutil.copytree(repo, zero_repo)
    config = zero_repo / "mlp" / "config.toml"
    config.write_text(config.read_text() + "\n[batching]\nmax_queue_delay_us = 0\n")
    hop_socket, zero_socket = workdir / "hop.sock", workdir / "zero.sock"
    hop = Process("echo-hop", echo_command(hop_socket, None, ["--thread-hop"]), workdir, hop_socket)
    zero = Process("daemon-zero", daemon_command(zero_repo, zero_socket), workdir, zero_socket)
    try:
        hop.wait_ready(f"unix://{hop_socket}")
        zero.wait_ready(f"unix://{zero_socket}")
        rows = {
            "echo": targets["echo unix"],
            "echo + thread hop": (f"unix://{hop_socket}", hop),
            "daemon, no queue delay": (f"unix://{zero_socket}", zero),
            "daemon (defaults)": targets["daemon unix"],
        }
        cells: dict[str, dict[str, Any]] = {label: {} for label in rows}
        stream = ("--mode", "stream", "-c", str(STREAM_DEPTH))
        for _ in range(settings.rounds):
            for key, args in (("c1", ("-c", "1")), ("c32", ("-c", "32")), ("stream", stream)):
                for label, (address, process) in rows.items():
                    if key == "stream" and label == "echo + thread hop":
                        continue  # its hop is for unary calls only
                    keep_best(
                        cells[label], key, bench(address, "mlp", process.pid, settings, *args)[0]
                    )
    finally:
        hop.stop()
        zero.stop()
    return cells


def run_large_input(
    targets: dict[str, tuple[str, Process]], settings: Settings
) -> dict[str, dict[str, Any]]:
    address, process = targets["daemon unix"]
    cells: dict[str, dict[str, Any]] = {}
    for _ in range(settings.rounds):
        keep_best(cells, "bytes", bench(address, "blob", process.pid, settings)[0])
        shm = bench(address, "blob", process.pid, settings, "--shared-memory")[0]
        keep_best(cells, "shared memory", shm)
    return cells


def run_startup(repo: Path, workdir: Path, settings: Settings) -> dict[str, Any]:
    repositories = {"benchmark repository (mlp, blob)": repo}
    if (EXAMPLE_REPOSITORY / "digits" / "config.toml").exists():
        names = sorted(p.name for p in EXAMPLE_REPOSITORY.iterdir() if p.is_dir())
        repositories[f"example repository ({', '.join(names)})"] = EXAMPLE_REPOSITORY
    result: dict[str, Any] = {}
    for label, path in repositories.items():
        startups, rss = [], []
        for number in range(settings.startup_repeats):
            sock = workdir / f"start{number}.sock"
            daemon = Process("startup", daemon_command(path, sock), workdir, sock)
            try:
                startups.append(daemon.wait_ready(f"unix://{sock}"))
                time.sleep(1.0)  # idle: let start-up garbage settle
                rss.append(daemon.rss_bytes())
            finally:
                daemon.stop()
        result[label] = {
            "startup_s": statistics.median(startups),
            "startup_all_s": startups,
            "idle_rss_bytes": statistics.median(rss),
        }
    if len(repositories) == 1:
        result["example repository"] = None  # not built: scripts/demo.sh builds it
    return result


_IMPORT_TORCH = """
import time
started = time.perf_counter()
import torch
seconds = time.perf_counter() - started
status = open("/proc/self/status").read().splitlines()
rss = next(int(ln.split()[1]) * 1024 for ln in status if ln.startswith("VmRSS:"))
print(seconds, rss)
"""


def import_torch_cost(repeats: int) -> dict[str, float]:
    """What importing torch alone takes: the floor under the daemon's start-up and memory."""
    seconds, rss = [], []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", _IMPORT_TORCH], capture_output=True, text=True, check=True
        ).stdout.split()
        seconds.append(float(out[0]))
        rss.append(int(out[1]))
    return {"import_s": statistics.median(seconds), "rss_bytes": statistics.median(rss)}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by thread (the main thread; other threads summed by name)."""
    tick = os.sysconf("SC_CLK_TCK")
    result: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if task.name == str(pid):
            name = "main thread (the event loop)"
        elif name == "python":
            name = "other Python threads (forward-pass workers)"
        else:
            name = (re.sub(r"[-_:]?\d+$", "", name) or name) + " (gRPC core)"
        result[name] += (int(fields[11]) + int(fields[12])) / tick
    return dict(result)


def run_profile(
    targets: dict[str, tuple[str, Process]], processes: int, settings: Settings
) -> dict[str, Any]:
    """py-spy on the daemon under unary c=32 load: stacks, a flame graph and CPU by thread."""
    address, daemon = targets["daemon unix"]
    py_spy = shutil.which("py-spy")
    seconds = settings.profile_seconds
    load_s = 2 * seconds + 2
    command = [sys.executable, "-m", "edgeinfer.cli", "-a", address, "bench", "mlp", "--json"]
    command += ["-c", "32", "--processes", str(processes), "--server-pid", str(daemon.pid)]
    command += ["--warmup", "0.5", "--duration", str(load_s)]
    load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(1.5)  # processes started and warmed up
    before = thread_cpu(daemon.pid)
    batches_before = batch_counts(address)
    started = time.monotonic()
    raw = RESULTS / "profile.txt"
    if py_spy is not None:
        spy = [py_spy, "record", "--pid", str(daemon.pid), "--nonblocking"]
        spy += ["--rate", str(SPY_RATE)]
        spy += ["--duration", str(int(seconds))]
        subprocess.run([*spy, "--format", "raw", "-o", str(raw)], capture_output=True, check=True)
    else:
        time.sleep(seconds)
    after = thread_cpu(daemon.pid)
    batches_after = batch_counts(address)
    elapsed = time.monotonic() - started
    if py_spy is not None:
        svg = RESULTS / "profile.svg"
        subprocess.run([*spy, "-o", str(svg)], capture_output=True, check=True)
    stdout, _ = load.communicate(timeout=120)
    cell = json.loads(stdout)["results"][0]
    by_thread = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    cpu_per_call_us = (cell["server_cpu_percent"] / 100) / cell["throughput"] * 1e6
    forward_passes = batches_after[0] - batches_before[0]
    result: dict[str, Any] = {
        "cell": cell,
        "forward_passes_per_s": forward_passes / elapsed,
        "rows_per_forward_pass": (batches_after[1] - batches_before[1]) / max(forward_passes, 1),
        "daemon_cpu_us_per_call": cpu_per_call_us,
        "thread_cpu_share": {
            k: v / elapsed for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1]) if v > 0
        },
        "py_spy": py_spy is not None,
    }
    calls = cell["throughput"] * elapsed
    python_s = sum(v for k, v in by_thread.items() if "(gRPC core)" not in k)
    result["python_threads_cpu_us_per_call"] = python_s / calls * 1e6
    result["grpc_core_threads_cpu_us_per_call"] = (sum(by_thread.values()) - python_s) / calls * 1e6
    if py_spy is not None:
        result.update(summarize_profile(raw, result["python_threads_cpu_us_per_call"]))
        result["sampled_cores"] = result["active_samples"] / (SPY_RATE * int(seconds))
        result["python_threads_cores"] = python_s / elapsed
    return result


def batch_counts(address: str) -> tuple[int, int]:
    """The daemon's forward passes of the mlp so far, and the rows they carried."""
    import edgeinfer

    with edgeinfer.Client(address, timeout=10) as client:
        for model in client.get_stats().models:
            if model.model == "mlp":
                return model.batches, model.batched_rows
    return 0, 0


SPY_RATE = 250

#: Where time spent in these frames' own code goes, by file.
_BUCKETS = [
    ("asyncio/events.py", "Handle._run", "gRPC core and C callbacks run by the event loop"),
    ("asyncio/selector_events.py", "", "waking the event loop from the worker thread"),
    ("asyncio/", "", "asyncio scheduling (Python)"),
    ("grpc/", "", "grpc Python layer"),
    ("google/protobuf", "", "protobuf"),
    ("torch/", "", "torch forward pass"),
    ("edgeinferd/batching.py", "", "batcher and worker hand-off"),
    ("edgeinferd/protocol/", "", "protocol layer (protobuf <-> numpy, status)"),
    ("edgeinfer/tensors.py", "", "protocol layer (protobuf <-> numpy, status)"),
    ("edgeinferd/dataplane.py", "", "data plane (validate, outputs)"),
    ("edgeinferd/metrics.py", "", "metrics"),
    ("structlog/", "", "logging"),
    ("numpy/", "", "numpy"),
    ("threading.py", "", "threads (queues, locks)"),
    ("queue.py", "", "threads (queues, locks)"),
]

#: A leaf frame on one of these source lines is waiting, not working: py-spy cannot tell
#: idle threads apart here, so blocked calls are recognised by their code.
_WAITING = re.compile(r"\.(get|select|wait|acquire|recv|accept|sleep|poll)\(|self\._target\(")


def _frame(text: str) -> tuple[str, str, int]:
    function, _, where = text.rpartition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    return function, path, int(line) if line.isdigit() else 0


def _source_line(path: str, line: int) -> str:
    """The code on a line of a frame py-spy names by its import path (``pkg/mod.py``)."""
    import importlib.util
    import linecache

    folders = [Path(folder or ".") for folder in sys.path]
    try:
        spec = importlib.util.find_spec(path.split("/")[0])
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p).parent for p in spec.submodule_search_locations]
    for folder in folders:
        candidate = folder / path
        if candidate.is_file():
            return linecache.getline(str(candidate), line)
    return ""


def summarize_profile(raw: Path, cpu_per_call_us: float) -> dict[str, Any]:
    """Own time by area and by line, inclusive time of the daemon's steps; waits left out."""
    leaf: Counter[str] = Counter()
    area: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    waiting: Counter[str] = Counter()
    active = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        function, path, number = frames[-1]
        if _WAITING.search(_source_line(path, number)):
            waiting[f"{function} ({path}:{number})"] += count
            continue
        active += count
        leaf[f"{function} ({path}:{number})"] += count
        for prefix, name, label in _BUCKETS:
            if prefix in path and (not name or name == function):
                area[label] += count
                break
        else:
            area[f"other ({path})"] += count
        seen = set()
        for function, path, _ in frames:
            if path.endswith(("cli.py", "__main__.py")):
                continue
            if "edgeinfer" in path and function not in seen:
                seen.add(function)
                inclusive[f"{function} ({path})"] += count
    # Python-thread samples, scaled to the CPU those threads used per call.
    scale = cpu_per_call_us / active if active else 0.0

    def top(counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"what": k, "samples": v, "share": v / active, "us_per_call": v * scale}
            for k, v in counter.most_common(n)
        ]

    return {
        "active_samples": active,
        "waiting_samples": sum(waiting.values()),
        "waiting": dict(waiting.most_common(6)),
        "by_area": top(area, 12),
        "by_leaf": top(leaf, 12),
        "inclusive": top(inclusive, 14),
    }


def run_variants(workdir: Path, processes: int, settings: Settings) -> list[dict[str, Any]]:
    """grpc.aio server options on the echo server over TCP, unary batch 1, 32 callers.

    The variants run one after another, one round fewer than the scenarios (at least one);
    each keeps its best round.
    """
    two = max(processes, 2)
    reuse = ["--reuseport"]
    variants: list[tuple[str, list[list[str]], int]] = [
        ("baseline (grpc.so_reuseport=0)", [[]], two),
        ("a no-op server interceptor", [["--noop-interceptor"]], two),
        ("grpc.max_concurrent_streams=8", [["--option", "grpc.max_concurrent_streams=8"]], two),
        (
            "grpc.max_concurrent_streams=1000",
            [["--option", "grpc.max_concurrent_streams=1000"]],
            two,
        ),
        (
            "grpc.optimization_target=throughput",
            [["--option", "grpc.optimization_target=throughput"]],
            two,
        ),
        ("2 echo processes, SO_REUSEPORT on one port", [reuse, reuse], two),
        ("baseline, 4 client processes", [[]], 4),
        ("2 echo processes, SO_REUSEPORT, 4 client processes", [reuse, reuse], 4),
    ]
    best: dict[str, dict[str, Any]] = {}
    for label, server_args, load_processes in variants * max(1, settings.rounds - 1):
        port = f"127.0.0.1:{free_port()}"
        started = [
            Process(f"variant{i}", echo_command(None, port, extra), workdir, None)
            for i, extra in enumerate(server_args)
        ]
        try:
            for process in started:
                process.wait_ready(port)
            pids = ",".join(str(p.pid) for p in started)
            args = ("-c", "32", "--processes", str(load_processes), "--server-pid", pids)
            cell = bench(port, "mlp", started[0].pid, settings, *args, errors_ok=True)[0]
        finally:
            for process in started:
                process.stop()
        row = {
            "variant": label,
            "processes": load_processes,
            "throughput": cell["throughput"],
            "p50_ms": cell["latency_ms"]["p50"],
            "p99_ms": cell["latency_ms"]["p99"],
            "errors": cell["errors"],
            "server_cpu_percent": cell["server_cpu_percent"],
            "client_cpu_percent": cell["client_cpu_percent"],
        }
        keep_best(best, label, row)
    return [best[label] for label, _, _ in variants]


def second_daemon_on_port(repo: Path, workdir: Path) -> dict[str, Any]:
    """Does a second daemon start on a TCP port another one serves? (so_reuseport is 0.)"""
    port = f"127.0.0.1:{free_port()}"
    first = Process("reuse1", daemon_command(repo, workdir / "r1.sock", port), workdir, None)
    try:
        first.wait_ready(port)
        second = subprocess.run(
            daemon_command(repo, workdir / "r2.sock", port),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        first.stop()
    lines = [ln for ln in second.stderr.splitlines() if ln.startswith("edgeinferd:")]
    return {"exit_code": second.returncode, "message": lines[-1] if lines else ""}


# ---------------------------------------------------------------- the report


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")
        )
    except (OSError, StopIteration):
        pass
    import grpc
    import torch

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
    }


def source_state() -> dict[str, Any]:
    """The commit measured, and whether the daemon or client had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = git("status", "--porcelain", "--", "daemon", "client")
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": changed.splitlines()}


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.0%}" if a / b < 10 else f"{a / b:.1f}x"


def _rate(cell: dict[str, Any] | None) -> str:
    return "n/a" if cell is None else f"{cell['throughput']:,.0f}"


def _lat(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "n/a"
    lat = cell["latency_ms"]
    return f"{lat['p50']:.2f} / {lat['p99']:.2f}"


def cpu_us(cell: dict[str, Any] | None) -> float | None:
    """The server's CPU per call, in µs."""
    if cell is None or cell.get("server_cpu_percent") is None or not cell["throughput"]:
        return None
    return float(cell["server_cpu_percent"]) / 100 / float(cell["throughput"]) * 1e6


def _cpu_per_call(cell: dict[str, Any] | None) -> str:
    value = cpu_us(cell)
    return "n/a" if value is None else f"{value:,.0f}"


def raw_reference(raw: dict[str, Any], key: str) -> float:
    """Raw passes/s on one thread (the daemon's default: [instances] threads = 1)."""
    batch = 32 if key == "b32" else 1
    return float(raw["mlp"][f"1t/b{batch}"]["passes_per_s"])


def render(data: dict[str, Any]) -> str:
    raw = data["raw"]
    table = data["scenarios"]
    lines = [
        f"Measured {data['date']} on {data['machine']['cpu']}, {data['machine']['cores']} cores"
        f" (Python {data['machine']['python']}, torch {data['machine']['torch']},"
        f" grpcio {data['machine']['grpcio']}); load average {data['loadavg_start']:.1f}"
        f" at the start, {data['loadavg_end']:.1f} at the end"
        f" ({'quick run' if data['quick'] else 'full run'}, cells of"
        f" {data['settings']['duration']:g} s after {data['settings']['warmup']:g} s warm-up,"
        f" best of {data['settings']['rounds']} round(s)); code at commit"
        f" {data.get('source', {}).get('commit', '?')}"
        + (
            f" with uncommitted changes to {len(data['source']['uncommitted'])} file(s) of the"
            " daemon or client."
            if data.get("source", {}).get("uncommitted")
            else "."
        ),
        "",
        "**Raw PyTorch** (in-process TorchScript forward passes of the seed MLP):",
        "",
        "| batch | threads | passes/s | rows/s | µs/pass | passes/s at start / at end |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for item in raw["mlp"].values():
        both = (
            f"{item['start_passes_per_s']:,.0f} / {item['end_passes_per_s']:,.0f}"
            if "end_passes_per_s" in item
            else "(measured once)"
        )
        lines.append(
            f"| {item['batch']} | {item['threads']} | {item['passes_per_s']:,.0f}"
            f" | {item['rows_per_s']:,.0f} | {item['us_per_pass']:.1f} | {both} |"
        )
    lines += [
        "",
        "Raw is measured at the start of the run and again at the end; the better of the two"
        " is the reference for every ratio (1 thread: the daemon's default).",
    ]
    chosen = data["load_generator"]
    lines += [
        "",
        f"**Load generator:** echo server, unary batch 1, 32 callers: 1 process"
        f" {_rate(chosen['cells']['1'])} calls/s, 2 processes {_rate(chosen['cells']['2'])}"
        f" calls/s; every server cell below uses **{chosen['chosen']}** process(es)"
        " (a single stream always runs in one).",
        "",
        "**Servers**: calls/s; latency p50 / p99 in ms; the server's CPU per call in µs"
        " (from /proc, over the measured window). *vs echo* and *vs raw* divide the daemon's"
        " calls/s by the echo server's on the same socket and by raw 1-thread forward passes"
        " of the same batch; *(CPU)* divides per-call CPU instead (echo's or raw's µs over the"
        " daemon's), which the other load on a shared machine disturbs much less.",
    ]
    for transport in ("unix", "tcp"):
        lines += [
            "",
            f"| {'Unix socket' if transport == 'unix' else 'TCP'} | echo calls/s | echo p50 / p99"
            " | echo CPU µs | daemon calls/s | daemon p50 / p99 | daemon CPU µs | vs echo"
            " | vs echo (CPU) | vs raw | vs raw (CPU) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, label in SCENARIOS:
            echo, daemon = (
                table[f"echo {transport}"].get(key),
                table[f"daemon {transport}"].get(key),
            )
            reference = raw_reference(raw, key)
            lines.append(
                f"| {label} | {_rate(echo)} | {_lat(echo)} | {_cpu_per_call(echo)}"
                f" | {_rate(daemon)} | {_lat(daemon)} | {_cpu_per_call(daemon)}"
                f" | {ratio(daemon and daemon['throughput'], echo and echo['throughput'])}"
                f" | {ratio(cpu_us(echo), cpu_us(daemon))}"
                f" | {ratio(daemon and daemon['throughput'], reference)}"
                f" | {ratio(1e6 / reference, cpu_us(daemon))} |"
            )
    big = data["large_input"]
    blob_raw = raw["blob"]["1t"]["passes_per_s"]
    lines += [
        "",
        "**4 MiB input** (1024x1024 float32 in, 4 KiB out; daemon over its Unix socket,"
        " one caller):",
        "",
        "| input travels | calls/s | p50 / p99 ms | CPU µs/call | vs raw |",
        "|---|---:|---:|---:|---:|",
    ]
    for how in ("bytes", "shared memory"):
        cell = big.get(how)
        lines.append(
            f"| {'in the message' if how == 'bytes' else 'shared memory'} | {_rate(cell)}"
            f" | {_lat(cell)} | {_cpu_per_call(cell)}"
            f" | {ratio(cell and cell['throughput'], blob_raw)} |"
        )
    lines += [
        f"| raw forward pass (1 thread) | {blob_raw:,.0f} | | | 100% |",
        "",
        "**Start-up and idle memory** (spawn to health SERVING; RSS after 1 s idle; median of"
        f" {data['settings']['startup_repeats']}):",
        "",
        "| repository | start-up s | idle RSS MiB |",
        "|---|---:|---:|",
    ]
    for label, item in data["startup"].items():
        if item is None:
            lines.append(f"| {label} | n/a (not built) | n/a |")
        else:
            lines.append(
                f"| {label} | {item['startup_s']:.2f} | {item['idle_rss_bytes'] / 2**20:.0f} |"
            )
    if "import_torch" in data:
        cost = data["import_torch"]
        lines.append(
            f"| (no daemon: `import torch` alone) | {cost['import_s']:.2f}"
            f" | {cost['rss_bytes'] / 2**20:.0f} |"
        )
    lines += ["", "**Targets** (ratios measured in this run):", "", render_targets(data)]
    return "\n".join(lines)


Target = tuple[str, str, bool | None, str]


def targets(data: dict[str, Any]) -> list[Target]:
    """Each target: what it asks, the figure, whether it is reached, and the CPU view."""
    raw = data["raw"]
    unix = data["scenarios"]["daemon unix"]
    echo = data["scenarios"]["echo unix"]
    big = data["large_input"]
    rows: list[Target] = []

    def add(label: str, key: str, reference: str, threshold: float) -> None:
        cell = unix[key]
        if reference == "echo":
            value = cell["throughput"] / echo[key]["throughput"]
            by_cpu = ratio(cpu_us(echo[key]), cpu_us(cell))
        else:
            value = cell["throughput"] / raw_reference(raw, key)
            by_cpu = ratio(1e6 / raw_reference(raw, key), cpu_us(cell))
        rows.append((label, f"{value:.0%}", value >= threshold, by_cpu))

    add("unary batch 1, 32 callers ≥ 85% of the echo server", "c32", "echo", 0.85)
    add("unary batch 1, 32 callers ≥ 25% of raw batch 1", "c32", "raw", 0.25)
    add("stream of batch-1 messages ≥ 80% of the echo stream", "stream", "echo", 0.80)
    add("stream of batch-1 messages ≥ 50% of raw batch 1", "stream", "raw", 0.50)
    add("unary batch 32, 1 caller ≥ 70% of raw batch 32", "b32", "raw", 0.70)
    p50 = unix["c1"]["latency_ms"]["p50"]
    echo_p50 = echo["c1"]["latency_ms"]["p50"]
    rows.append(
        (
            "1 caller, batch 1, p50 < 0.6 ms (Unix socket)",
            f"{p50:.3f} ms",
            p50 < 0.6,
            f"echo server: {echo_p50:.3f} ms",
        )
    )
    label = "4 MiB: shared memory ≥ 3x faster than bytes"
    if big.get("shared memory") and big.get("bytes"):
        value = big["shared memory"]["throughput"] / big["bytes"]["throughput"]
        by_cpu = ratio(cpu_us(big["bytes"]), cpu_us(big["shared memory"]))
        rows.append((label, f"{value:.1f}x", value >= 3.0, by_cpu))
    else:
        rows.append((label, "n/a", None, "n/a"))
    return rows


def render_targets(data: dict[str, Any]) -> str:
    lines = [
        "| target | measured (calls/s) | reached | the same ratio by CPU per call |",
        "|---|---:|---|---:|",
    ]
    for label, text, reached, by_cpu in targets(data):
        mark = "n/a" if reached is None else "yes" if reached else "**no**"
        lines.append(f"| {label} | {text} | {mark} | {by_cpu} |")
    return "\n".join(lines)


def render_profile(data: dict[str, Any]) -> str:
    profile = data["profile"]
    cell = profile["cell"]
    lines = [
        f"Daemon over its Unix socket, unary batch 1, 32 callers: {cell['throughput']:,.0f}"
        f" calls/s while profiled, daemon CPU {cell['server_cpu_percent']:.0f}% of a core ="
        f" **{profile['daemon_cpu_us_per_call']:.0f} µs of CPU per call**; the batcher ran"
        f" {profile['forward_passes_per_s']:,.0f} forward passes/s of"
        f" {profile['rows_per_forward_pass']:.2f} rows on average.",
        "",
        "CPU by daemon thread, from /proc (share of one core while profiled):",
        "",
        "| thread | share of a core |",
        "|---|---:|",
    ]
    for name, share in list(profile["thread_cpu_share"].items())[:8]:
        lines.append(f"| {name} | {share:.0%} |")
    if not profile.get("py_spy"):
        return "\n".join([*lines, "", "py-spy is not installed: no stack profile."])
    lines += [
        "",
        f"py-spy ({SPY_RATE} Hz, non-blocking, Python threads): {profile['active_samples']}"
        f" working samples ({profile['sampled_cores']:.2f} cores; /proc says the Python threads"
        f" used {profile['python_threads_cores']:.2f}) and {profile['waiting_samples']} samples"
        " of threads blocked in a queue, epoll or a C thread's body, left out. Own time of the"
        " working samples, scaled to the Python threads' CPU per call"
        f" ({profile['python_threads_cpu_us_per_call']:.0f} µs; the gRPC core's own C threads"
        f" add {profile['grpc_core_threads_cpu_us_per_call']:.0f} µs):",
        "",
        "| area | share | µs/call |",
        "|---|---:|---:|",
    ]
    for row in profile["by_area"]:
        lines.append(f"| {row['what']} | {row['share']:.0%} | {row['us_per_call']:.0f} |")
    lines += ["", "Hottest lines (own time):", "", "| line | share | µs/call |", "|---|---:|---:|"]
    for row in profile["by_leaf"][:8]:
        lines.append(f"| `{row['what']}` | {row['share']:.0%} | {row['us_per_call']:.0f} |")
    lines += [
        "",
        "Inclusive time of the daemon's own steps:",
        "",
        "| function | share | µs/call |",
        "|---|---:|---:|",
    ]
    for row in profile["inclusive"]:
        lines.append(f"| `{row['what']}` | {row['share']:.0%} | {row['us_per_call']:.0f} |")
    return "\n".join(lines)


def render_decomposition(data: dict[str, Any]) -> str:
    parts = data.get("decomposition")
    if not parts:
        return "(not measured in this run)"
    lines = [
        "Unix sockets, batch-1 calls; each scenario runs on every row back to back (best of"
        f" {data['settings']['rounds']} round(s)). CPU is the server's, per call.",
        "",
        "| server | what it isolates | 1 caller: p50 ms | CPU µs | 32 callers: calls/s | CPU µs"
        f" | stream ({STREAM_DEPTH} in flight): messages/s | CPU µs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, meaning in PARTS:
        row = parts.get(label, {})
        c1, c32, stream = row.get("c1"), row.get("c32"), row.get("stream")
        p50 = "n/a" if c1 is None else f"{c1['latency_ms']['p50']:.2f}"
        lines.append(
            f"| {label} | {meaning} | {p50} | {_cpu_per_call(c1)} | {_rate(c32)}"
            f" | {_cpu_per_call(c32)} | {_rate(stream) if stream else '-'}"
            f" | {_cpu_per_call(stream) if stream else '-'} |"
        )
    return "\n".join(lines)


def render_variants(data: dict[str, Any]) -> str:
    lines = [
        "Echo server over TCP, unary batch 1, 32 callers"
        f" ({data['variants'][0]['processes']} client processes unless said; best of"
        f" {max(1, data['settings']['rounds'] - 1)} round(s)):",
        "",
        "| server | calls/s | p50 / p99 ms | failed calls | server CPU | server CPU µs/call |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for row in data["variants"]:
        failed = ", ".join(f"{n} {code}" for code, n in row["errors"].items()) or "0"
        lines.append(
            f"| {row['variant']} | {row['throughput']:,.0f} | {row['p50_ms']:.2f} /"
            f" {row['p99_ms']:.2f} | {failed} | {row['server_cpu_percent']:.0f}%"
            f" | {_cpu_per_call(row)} |"
        )
    second = data["second_daemon"]
    lines += [
        "",
        f"A second daemon on the TCP port of a running one: exit code {second['exit_code']},"
        f" `{second['message']}`.",
    ]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = data["scenarios"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    keys = ["c1", "c8", "c32", "stream"]
    labels = ["unary c=1", "unary c=8", "unary c=32", f"stream ({STREAM_DEPTH} in flight)"]
    width = 0.2
    for index, target in enumerate(TARGETS):
        values = [table[target][k]["throughput"] for k in keys]
        left.bar([i + (index - 1.5) * width for i in range(len(keys))], values, width, label=target)
    raw1 = raw_reference(data["raw"], "c1")
    left.axhline(raw1, color="black", linestyle="--", linewidth=1)
    left.text(
        len(keys) - 0.5, raw1, f"raw batch 1, 1 thread: {raw1:,.0f}/s", ha="right", va="bottom"
    )
    left.set_xticks(range(len(keys)), labels)
    left.set_yscale("log")
    left.set_ylabel("calls/s (batch 1), log scale")
    left.set_title("batch-1 calls per second")
    left.legend(loc="upper left", fontsize=8, ncol=2)

    names = ["raw b32", "echo unix", "daemon unix", "daemon tcp"]
    rows = [
        data["raw"]["mlp"]["1t/b32"]["rows_per_s"],
        table["echo unix"]["b32"]["rows_per_s"],
        table["daemon unix"]["b32"]["rows_per_s"],
        table["daemon tcp"]["b32"]["rows_per_s"],
    ]
    big = data["large_input"]
    right.bar(names, rows, color=["black", "C0", "C1", "C3"])
    right.set_ylabel("rows/s, batch 32, 1 caller")
    right.set_title("batch 32, one caller")
    right.set_ylim(0, max(rows) * 1.25)
    for i, value in enumerate(rows):
        right.text(i, value, f"{value:,.0f}", ha="center", va="bottom", fontsize=8)
    if big.get("bytes") and big.get("shared memory"):
        right.text(
            0.02,
            0.97,
            f"4 MiB input: {big['bytes']['throughput']:,.0f} calls/s as bytes,"
            f" {big['shared memory']['throughput']:,.0f} via shared memory",
            transform=right.transAxes,
            va="top",
            fontsize=8,
        )
    fig.suptitle(
        f"edgeinferd, {data['machine']['cpu']}, {data['machine']['cores']} cores, {data['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(sections: dict[str, str]) -> None:
    if not README.exists():
        return
    text = README.read_text()
    for name, body in sections.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start in text and end in text:
            before, rest = text.split(start, 1)
            _, after = rest.split(end, 1)
            text = f"{before}{start}\n{body}\n{end}{after}"
    README.write_text(text)


def write_outputs(data: dict[str, Any], readme: bool) -> str:
    """The markdown, the plot and the README sections; returns the markdown."""
    results = render(data)
    profile = render_profile(data)
    variants = render_variants(data)
    parts = render_decomposition(data)
    text = (
        f"{results}\n\n## The daemon's costs, taken apart\n\n{parts}\n\n## Profile\n\n"
        f"{profile}\n\n## grpc.aio server options\n\n{variants}\n"
    )
    (RESULTS / "serve_bench.md").write_text(f"# serve_bench results\n\n{text}")
    plot(data, RESULTS / "serve_bench.png")
    if readme:
        update_readme(
            {"results": results, "parts": parts, "profile": profile, "variants": variants}
        )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 1.5 minutes")
    parser.add_argument(
        "--no-readme", action="store_true", help="leave benchmarks/README.md as it is"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: rewrite the tables, plot and README from results/serve_bench.json",
    )
    args = parser.parse_args(argv)
    if args.render:
        data = json.loads((RESULTS / "serve_bench.json").read_text())
        write_outputs(data, readme=not args.no_readme)
        return 0
    settings = QUICK if args.quick else FULL
    RESULTS.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "quick": args.quick,
        "settings": settings.__dict__,
        "loadavg_start": os.getloadavg()[0],
        "source": source_state(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="ei-bench-", dir="/tmp"))
    try:
        repo = workdir / "repo"
        build_repository(repo)
        log("raw PyTorch")
        data["raw"] = measure_raw(repo, settings.raw_seconds)
        with servers(repo, workdir) as targets_by_name:
            log("load generator: 1 or 2 processes")
            processes, data["load_generator"] = choose_processes(
                targets_by_name["echo unix"], settings
            )
            log(f"scenarios with {processes} load process(es)")
            data["scenarios"] = run_scenarios(targets_by_name, processes, settings)
            log("the daemon's costs, taken apart")
            data["decomposition"] = run_decomposition(targets_by_name, repo, workdir, settings)
            log("4 MiB input")
            data["large_input"] = run_large_input(targets_by_name, settings)
            log("profile")
            data["profile"] = run_profile(targets_by_name, processes, settings)
        log("start-up and idle memory")
        data["startup"] = run_startup(repo, workdir, settings)
        data["import_torch"] = import_torch_cost(settings.startup_repeats)
        log("transport variants")
        data["variants"] = run_variants(workdir, processes, settings)
        data["second_daemon"] = second_daemon_on_port(repo, workdir)
        if not args.quick:
            log("raw PyTorch again")
            data["raw"] = merge_raw(data["raw"], measure_raw(repo, settings.raw_seconds))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    data["loadavg_end"] = os.getloadavg()[0]
    data["elapsed_s"] = time.monotonic() - began
    (RESULTS / "serve_bench.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(write_outputs(data, readme=not args.no_readme))
    log(f"done in {data['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
