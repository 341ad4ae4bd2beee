"""The daemon at every load, next to the inline reference server, raw PyTorch and peer servers.

    python benchmarks/load_bench.py             # 3 interleaved rounds, 3 s windows
    python benchmarks/load_bench.py --quick     # 1 round, 2 s windows
    python benchmarks/load_bench.py --quick --scenarios "1 x 1" --crossover-pairs 0
    python benchmarks/load_bench.py --render    # the tables again, from the JSON

The seed MLP (1000->500->10 float32, TorchScript, max_batch_size 32) is served
several ways at once, and every scenario runs on each of them back to back, round
after round (each cell keeps its best round: other load on a shared machine
only ever slows a cell down):

- ``edgeinfer``: the daemon as shipped (model ``mlp``);
- ``edgeinfer, always a thread``: the same daemon process and weights, model
  ``mlp-hop`` with ``inline_max_us = 0`` (every pass handed to a worker thread,
  the design before inline passes);
- ``inline server``: benchmarks/inline_server.py, a grpc.aio KServe V2 server
  running the model on its event loop with nothing else;
- the peers, when their venvs are there (``benchmarks/peers/setup_peers.sh``, then
  ``--peers DIR``; by default ``$EDGEINFER_CACHE/peers`` if it exists): Seldon
  MLServer (in-process runtime, and a second model with its adaptive batching,
  32 / 2 ms) over KServe V2 gRPC on a Unix socket, through
  benchmarks/peers/mlserver_launch.py; TorchServe (a batching model, 32 / 2 ms, and
  an unbatched one) over its REST API. Both serve the same TorchScript file; neither
  can be driven with perf_analyzer's streams, so the stream scenario skips them.

Then the crossover: for one caller at batch 1 and at batch 32, model
``mlp-loop`` (``inline_max_us`` so high that every lone pass runs on the loop)
against ``mlp-hop``, in alternating pairs of windows.

The load is Triton's ``perf_analyzer`` (KServe V2 ModelInfer over the Unix
socket; ``--streaming`` for the stream scenario; ``--service-kind torchserve``
over HTTP for TorchServe), a C++ client much lighter than any Python one, so
that more of the 2 cores is left to the servers. It ships in the tritonclient
wheel; on a CPU-only machine it still needs ``libcudart.so.12`` (``pip install
nvidia-cuda-runtime-cu12``) and libb64 (Debian: ``libb64-0d``). Raw PyTorch (the
same TorchScript file, one thread, in this process) is measured at the start and
at the end. A server's CPU is that of its whole process tree (for TorchServe: the
Java frontend and its Python workers).

Writes benchmarks/results/load_bench.json and the table between the ``load``
markers of benchmarks/README.md (a run restricted with ``--scenarios`` writes
neither, unless given ``--json``, and never the README).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb  # the repository, raw passes, processes, README

ROOT = sb.ROOT
RESULTS = sb.RESULTS

#: (label, perf_analyzer arguments, batch rows)
SCENARIOS = [
    ("1 x 1", ["--concurrency-range", "1", "-b", "1"], 1),
    ("8 x 1", ["--concurrency-range", "8", "-b", "1"], 1),
    ("32 x 1", ["--concurrency-range", "32", "-b", "1"], 1),
    ("1 x 32", ["--concurrency-range", "1", "-b", "32"], 32),
    # The unary rate at the stream's concurrency, which the stream is compared with.
    ("16 x 1", ["--concurrency-range", "16", "-b", "1"], 1),
    ("stream, 16 in flight x 1", ["--streaming", "--concurrency-range", "16", "-b", "1"], 1),
]

#: The unary scenario at the stream's concurrency (no peer streams; the stream goal compares).
STREAM_UNARY = "16 x 1"

#: Inferences/s quoted from the issue that set these goals (a run on the same kind of
#: 2-core machine, with its own KServe V2 load generator); not measured here.
QUOTED_PEERS = {
    "1 x 1": ("MLServer, in-process", "507-574"),
    "8 x 1": ("TorchServe, batching 32 / 2 ms", "1,261-1,509"),
    "32 x 1": ("TorchServe, batching 32 / 2 ms", "2,812-3,858"),
    "1 x 32": ("TorchServe", "8,310-10,733"),
}
QUOTED_BEST = {"1 x 1": 574, "8 x 1": 1509, "32 x 1": 3858, "1 x 32": 10733}


#: The peers' servers in the cells: name -> (column, variant). See start_peers.
PEER_VARIANTS = {
    "MLServer": ("MLServer", "no batching"),
    "MLServer, adaptive batching": ("MLServer", "adaptive batching 32 / 2 ms"),
    "TorchServe, batching": ("TorchServe (REST)", "batching 32 / 2 ms"),
    "TorchServe, unbatched": ("TorchServe (REST)", "unbatched"),
}
PEERS_CODE = ROOT / "benchmarks" / "peers"
WIDTH, OUT_WIDTH = 1000, 10


def default_peers() -> Path:
    """Where benchmarks/peers/setup_peers.sh puts the peers' venvs by default."""
    cache = os.environ.get("EDGEINFER_CACHE") or str(Path.home() / ".cache" / "edgeinfer")
    return Path(cache) / "peers"


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer's environment: where libcudart.so.12 is, if pip installed it."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime  # type: ignore[import-not-found]

        lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
        env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}"
    except ImportError:
        pass
    return env


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: [1] ppid, [11] utime, [12] stime, [19] start."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat(int(entry.name))
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            starts[int(entry.name)] = int(fields[19])
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current in starts:
            tree.append((current, starts[current]))
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants (TorchServe: Java and its workers)."""
    ticks = 0
    for member, _ in process_tree(pid):
        with contextlib.suppress(OSError, IndexError):
            fields = _stat(member)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    """One model on one server, as perf_analyzer reaches it."""

    model: str
    pid: int  # the process (tree) whose CPU is the server's
    address: str  # unix:PATH for KServe V2 gRPC, HOST:PORT for TorchServe's REST API
    kind: str = "kserve"  # or "torchserve"
    streams: bool = True
    inputs: Path | None = None  # torchserve: where ts-input-{rows}.json lie
    daemon: bool = False  # edgeinfer's own: its passes are counted (GetStats)


def run_perf_analyzer(
    target: Target, args: list[str], rows: int, seconds: float, workdir: Path
) -> dict[str, float]:
    """One perf_analyzer measurement: inferences/s, p50/p99 µs, server CPU in % of a core."""
    out = workdir / f"pa-{target.model}-{time.monotonic_ns()}.csv"
    if target.kind == "torchserve":
        # One request of `rows` rows per call (the body is the input file); perf_analyzer
        # counts one inference per request whatever its rows, hence the `* rows` below.
        assert target.inputs is not None
        concurrency = args[args.index("--concurrency-range") + 1]
        load = [
            "--service-kind", "torchserve", "-i", "http", "-u", target.address,
            "--input-data", str(target.inputs / f"ts-input-{rows}.json"),
            "--concurrency-range", concurrency,
        ]  # fmt: skip
        per_inference = rows
    else:
        load = ["-i", "grpc", "-u", target.address, *args]
        per_inference = 1
    command = [
        "perf_analyzer", "-m", target.model, *load,
        "--measurement-interval", str(int(seconds * 1000)), "--max-trials", "3",
        "--stability-percentage", "999", "--percentile", "50", "-f", str(out),
    ]  # fmt: skip
    cpu_before, wall_before = cpu_seconds(target.pid), time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=perf_analyzer_env())
    cpu = cpu_seconds(target.pid) - cpu_before
    wall = time.monotonic() - wall_before
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr}")
    with out.open() as handle:
        row = next(csv.DictReader(handle))
    rate = float(row["Inferences/Second"]) * per_inference
    return {
        "inferences_per_s": rate,
        "p50_us": float(row["p50 latency"]),
        "p99_us": float(row["p99 latency"]),
        # CPU over the whole perf_analyzer run (its warm-up windows included), per inference
        # at the measured rate: a steadier view than inferences/s on a shared machine.
        "server_cpu_percent": 100 * cpu / wall,
    }


def daemon_passes(target: Target) -> tuple[int, int, int] | None:
    """The daemon's forward passes of ``target``'s model so far: (passes, inline, rows).
    None for another server (GetStats is edgeinfer's own RPC)."""
    if not target.daemon:
        return None
    import edgeinfer

    with edgeinfer.Client(target.address, timeout=10) as client:
        for model in client.get_stats().models:
            if model.model == target.model and model.state == "READY":
                return model.batches, model.inline_passes, model.batched_rows
    return 0, 0, 0  # not called yet


def passes_between(
    before: tuple[int, int, int] | None, after: tuple[int, int, int] | None
) -> dict[str, float]:
    """What the daemon's passes were during one perf_analyzer run (its warm-up included)."""
    if before is None or after is None:
        return {}
    passes, inline, rows = (b - a for a, b in zip(before, after, strict=True))
    return {"passes": passes, "inline_passes": inline, "pass_rows": rows} if passes else {}


def start_servers(repo: Path, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Target]:
    daemon_socket = workdir / "daemon.sock"
    daemon = sb.Process("daemon", sb.daemon_command(repo, daemon_socket), workdir, daemon_socket)
    stack.callback(daemon.stop)
    inline_socket = workdir / "inline.sock"
    inline = sb.Process(
        "inline",
        [sys.executable, str(ROOT / "benchmarks" / "inline_server.py"),
         "--unix", str(inline_socket),
         "--model", "mlp", "--artifact", str(repo / "mlp" / "1" / "model.pt"),
         "--input", "x:1000", "--output", "y:10", "--max-batch-size", "32"],
        workdir, inline_socket,
    )  # fmt: skip
    stack.callback(inline.stop)
    daemon.wait_ready(f"unix:{daemon_socket}")
    deadline = time.monotonic() + 60
    while not inline_socket.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {
        "edgeinfer": Target("mlp", daemon.pid, f"unix:{daemon_socket}", daemon=True),
        "edgeinfer, always a thread": Target(
            "mlp-hop", daemon.pid, f"unix:{daemon_socket}", daemon=True
        ),
        "inline server": Target("mlp", inline.pid, f"unix:{inline_socket}"),
    }


# ---------------------------------------------------------------- peers


def _http(url: str, body: bytes | None = None, timeout: float = 5) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    if body is not None:  # urllib would say form data, which TorchServe then parses
        json_body = body[:1] == b"{"
        request.add_header(
            "Content-Type", "application/json" if json_body else "application/octet-stream"
        )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return bytes(response.read())


def _reference(model_file: Path, rows: int) -> tuple[Any, Any]:
    """Fixed input rows and the TorchScript file's own answer for them, in this process."""
    import numpy as np
    import torch

    x = np.random.default_rng(rows).standard_normal((rows, WIDTH), dtype=np.float32)
    module = torch.jit.load(str(model_file)).eval()
    with torch.inference_mode():
        return x, module(torch.from_numpy(x)).numpy()


def _until_answered(name: str, process: sb.Process, check: Any, timeout: float = 180) -> None:
    """Call check() until it returns without an error (or the process dies)."""
    deadline = time.monotonic() + timeout
    while True:
        if process.process.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{process.log_path.read_text()[-3000:]}")
        try:
            check()
            return
        except (OSError, ValueError, KeyError) as error:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} not answering after {timeout:g} s ({error}):\n"
                    f"{process.log_path.read_text()[-3000:]}"
                ) from error
            time.sleep(0.2)


def _version(python: Path, package: str) -> str:
    done = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def start_mlserver(
    peers: Path, model_file: Path, workdir: Path, stack: contextlib.ExitStack
) -> dict[str, Target]:
    """MLServer, in-process runtime (parallel_workers 0): model ``mlp`` unbatched and
    ``mlp-batched`` with its adaptive batching; KServe V2 gRPC on a Unix socket."""
    import numpy as np

    folder = workdir / "mlserver"
    tensors = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, OUT_WIDTH]}],
    }
    batching: dict[str, dict[str, Any]] = {
        "mlp": {},
        "mlp-batched": {"max_batch_size": 32, "max_batch_time": 0.002},
    }
    for name, extra in batching.items():
        (folder / name).mkdir(parents=True)
        settings = {
            "name": name,
            "implementation": "mlserver_runtime.TorchScriptMLP",
            "platform": "pytorch_libtorch",
            **tensors,
            **extra,
            "parameters": {"uri": str(model_file), "version": "1"},
        }
        (folder / name / "model-settings.json").write_text(json.dumps(settings, indent=2))
    http_port = sb.free_port()
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "debug": False,
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": sb.free_port(),
                "metrics_endpoint": None,
                "parallel_workers": 0,
                "gzip_enabled": False,
            },
            indent=2,
        )
    )
    socket_path = workdir / "mlserver.sock"
    env = {
        **os.environ,
        "PYTHONPATH": str(PEERS_CODE),
        "MLSERVER_PA_UNIX": str(socket_path),
        "MLSERVER_PA_MAX_BATCH": "32",
    }
    python = peers / "mlserver-venv" / "bin" / "python"
    command = [str(python), str(PEERS_CODE / "mlserver_launch.py"), "start", str(folder)]
    process = sb.Process("mlserver", command, workdir, socket_path, env)
    stack.callback(process.stop)
    x, y = _reference(model_file, 1)

    def answers(name: str) -> None:
        body = {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32",
                            "data": x.ravel().tolist()}]}  # fmt: skip
        reply = json.loads(
            _http(f"http://127.0.0.1:{http_port}/v2/models/{name}/infer", json.dumps(body).encode())
        )
        got = np.asarray(reply["outputs"][0]["data"], dtype=np.float32).reshape(y.shape)
        if not np.allclose(got, y, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"MLServer {name}: not the daemon's weights")
        if not socket_path.exists():
            raise OSError("no Unix socket yet")

    for name in batching:
        _until_answered("mlserver", process, lambda name=name: answers(name))
    address = f"unix:{socket_path}"
    return {
        "MLServer": Target("mlp", process.pid, address, streams=False),
        "MLServer, adaptive batching": Target("mlp-batched", process.pid, address, streams=False),
    }


TORCHSERVE_LOG_CONFIG = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


def start_torchserve(
    peers: Path, model_file: Path, workdir: Path, stack: contextlib.ExitStack
) -> dict[str, Target]:
    """TorchServe over its REST API: ``mlp`` (batchSize 32, maxBatchDelay 2 ms) and
    ``mlp-unbatched`` (batchSize 1), one worker each; perf_analyzer cannot drive its gRPC."""
    import numpy as np

    venv = peers / "torchserve-venv" / "bin"
    folder = workdir / "torchserve"
    store = folder / "model-store"
    tmp = folder / "tmp"  # its pid file (tempfile.gettempdir()), kept apart from others
    store.mkdir(parents=True)
    tmp.mkdir()
    for name in ("mlp", "mlp-unbatched"):
        subprocess.run(
            [str(venv / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
             "--serialized-file", str(model_file),
             "--handler", str(PEERS_CODE / "torchserve_handler.py"),
             "--export-path", str(store), "--force"],
            check=True, capture_output=True,
        )  # fmt: skip
    models = {
        name: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{name}.mar",
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": batch,
                "maxBatchDelay": delay,
                "responseTimeout": 120,
            }
        }
        for name, batch, delay in (("mlp", 32, 2), ("mlp-unbatched", 1, 0))
    }
    port = sb.free_port()
    config = folder / "config.properties"
    config.write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{port}",
                f"management_address=http://127.0.0.1:{sb.free_port()}",
                f"metrics_address=http://127.0.0.1:{sb.free_port()}",
                "grpc_inference_address=127.0.0.1",
                f"grpc_inference_port={sb.free_port()}",
                "grpc_management_address=127.0.0.1",
                f"grpc_management_port={sb.free_port()}",
                "disable_token_authorization=true",
                "default_workers_per_model=1",
                "job_queue_size=1000",
                "enable_metrics_api=false",
                "disable_system_metrics=true",
                "async_logging=true",
                f"model_store={store}",
                "load_models=mlp.mar,mlp-unbatched.mar",
                f"models={json.dumps(models)}",
                "",
            ]
        )
    )
    inputs = {}
    for rows in sorted({rows for _, _, rows in SCENARIOS}):
        x, y = _reference(model_file, rows)
        (folder / f"x{rows}.bin").write_bytes(x.tobytes())
        data = {"data": [{"TORCHSERVE_INPUT": [str(folder / f"x{rows}.bin")]}]}
        (folder / f"ts-input-{rows}.json").write_text(json.dumps(data))
        inputs[rows] = (x, y)
    env = {
        **os.environ,
        "PATH": f"{venv}:{os.environ.get('PATH', '')}",
        "TMPDIR": str(tmp),
        "TEMP": str(tmp),
        "LOG_LOCATION": str(folder / "logs"),
        "METRICS_LOCATION": str(folder / "logs"),
    }
    # Its shipped logging writes some twenty lines a request (DEBUG, access log, metrics):
    # production settings log warnings only, asynchronously (async_logging above).
    log_config = folder / "log4j2.xml"
    log_config.write_text(TORCHSERVE_LOG_CONFIG)
    cli = [str(venv / "torchserve")]
    command = [*cli, "--start", "--foreground", "--ncs", "--disable-token-auth",
               "--ts-config", str(config), "--model-store", str(store),
               "--log-config", str(log_config)]  # fmt: skip
    process = sb.Process("torchserve", command, folder, None, env)

    def stop() -> None:
        tree = process_tree(process.pid)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [*cli, "--stop", "--foreground"],
                env=env, cwd=folder, capture_output=True, timeout=90,
            )  # fmt: skip
        process.stop()
        for pid, started in tree[1:]:  # whatever --stop left: by pid, if still the same one
            with contextlib.suppress(OSError, IndexError):
                if int(_stat(pid)[19]) == started:
                    os.kill(pid, signal.SIGKILL)

    stack.callback(stop)

    def answers(name: str) -> None:
        for x, y in inputs.values():
            reply = _http(f"http://127.0.0.1:{port}/predictions/{name}", x.tobytes())
            got = np.frombuffer(reply, dtype=np.float32).reshape(y.shape)
            if not np.allclose(got, y, rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"TorchServe {name}: not the daemon's weights")

    for name in models:
        _until_answered("torchserve", process, lambda name=name: answers(name))
    address = f"127.0.0.1:{port}"
    return {
        "TorchServe, batching": Target("mlp", process.pid, address, "torchserve", False, folder),
        "TorchServe, unbatched": Target(
            "mlp-unbatched", process.pid, address, "torchserve", False, folder
        ),
    }


def start_peers(
    peers: Path, repo: Path, workdir: Path, stack: contextlib.ExitStack
) -> tuple[dict[str, Target], dict[str, Any]]:
    """Both peers, started and checked against the TorchScript file's own answers."""
    model_file = repo / "mlp" / "1" / "model.pt"
    servers = start_mlserver(peers, model_file, workdir, stack)
    servers.update(start_torchserve(peers, model_file, workdir, stack))
    # What the idle peers cost while the others are measured (they run all along).
    pids = {"MLServer": servers["MLServer"].pid, "TorchServe": servers["TorchServe, batching"].pid}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(3)
    idle = {name: 100 * (cpu_seconds(pid) - before[name]) / 3 for name, pid in pids.items()}
    info = {
        "versions": {
            "mlserver": _version(peers / "mlserver-venv" / "bin" / "python", "mlserver"),
            "torchserve": _version(peers / "torchserve-venv" / "bin" / "python", "torchserve"),
        },
        "variants": {name: list(column) for name, column in PEER_VARIANTS.items()},
        "idle_cpu_percent": idle,
    }
    sb.log(f"peers up: {info['versions']}; idle CPU % {idle}")
    return servers, info


def build(repo: Path) -> None:
    sb.build_repository(repo)
    hop = repo / "mlp-hop"
    (hop / "1").mkdir(parents=True)
    shutil.copy(repo / "mlp" / "1" / "model.pt", hop / "1" / "model.pt")
    (hop / "config.toml").write_text(sb.MLP_CONFIG + "[instances]\ninline_max_us = 0\n")
    # Every lone pass on the loop, whatever its length: for the crossover measurement.
    loop = repo / "mlp-loop"
    (loop / "1").mkdir(parents=True)
    shutil.copy(repo / "mlp" / "1" / "model.pt", loop / "1" / "model.pt")
    (loop / "config.toml").write_text(sb.MLP_CONFIG + "[instances]\ninline_max_us = 1000000\n")


#: Lone-caller scenarios of the crossover: a short pass and a long one.
CROSSOVER = [(label, args, rows) for label, args, rows in SCENARIOS if label in ("1 x 1", "1 x 32")]


def measure_crossover(
    servers: dict[str, Target], labels: list[str], pairs: int, seconds: float, workdir: Path
) -> dict[str, Any]:
    """A lone caller's passes on the loop (mlp-loop) against in a thread (mlp-hop), in
    alternating pairs: where inlining stops paying (the default inline_max_us)."""
    daemon = servers["edgeinfer"]
    result: dict[str, Any] = {}
    for label, args, rows in CROSSOVER:
        if label not in labels or pairs <= 0:
            continue
        rates: dict[str, list[float]] = {"mlp-loop": [], "mlp-hop": []}
        for i in range(pairs):
            order = ("mlp-loop", "mlp-hop") if i % 2 == 0 else ("mlp-hop", "mlp-loop")
            for model in order:
                sb.log(f"crossover {label}: pair {i + 1} on {model}")
                target = Target(model, daemon.pid, daemon.address)
                cell = run_perf_analyzer(target, args, rows, seconds, workdir)
                rates[model].append(cell["inferences_per_s"])
        result[label] = rates
    return result


def measure(
    rounds: int,
    seconds: float,
    raw_seconds: float,
    pairs: int,
    labels: list[str],
    peers: Path | None,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="ei-load-"))
    repo = workdir / "repo"
    build(repo)
    raw_start = sb.measure_raw(repo, raw_seconds)
    cells: dict[str, dict[str, dict[str, float]]] = {}
    peer_info: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        servers = start_servers(repo, workdir, stack)
        if peers is not None:
            peer_servers, peer_info = start_peers(peers, repo, workdir, stack)
            servers.update(peer_servers)
        for round_ in range(rounds):
            for label, args, rows in SCENARIOS:
                if label not in labels:
                    continue
                for server, target in servers.items():
                    if "--streaming" in args and not target.streams:
                        continue
                    sb.log(f"round {round_ + 1}: {label} on {server}")
                    before = daemon_passes(target)
                    cell = run_perf_analyzer(target, args, rows, seconds, workdir)
                    cell.update(passes_between(before, daemon_passes(target)))
                    cell["rows"] = rows
                    best = cells.setdefault(label, {}).get(server)
                    if best is None or cell["inferences_per_s"] > best["inferences_per_s"]:
                        cells[label][server] = cell
        crossover = measure_crossover(servers, labels, pairs, seconds, workdir)
    raw = sb.merge_raw(raw_start, sb.measure_raw(repo, raw_seconds))
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": sb.machine(),
        "source": sb.source_state(),
        "date": datetime.date.today().isoformat(),
        "rounds": rounds,
        "window_s": seconds,
        "python": platform.python_version(),
        "cells": cells,
        "raw": raw,
        "crossover": crossover,
        "peers": peer_info,
    }


Cell = dict[str, float]


def _best_peer(cells: dict[str, Cell], column: str) -> tuple[str, Cell] | None:
    """The best measured variant of one peer in one scenario: (variant, cell)."""
    found = [
        (variant, cells[name])
        for name, (peer, variant) in PEER_VARIANTS.items()
        if peer == column and name in cells
    ]
    return max(found, key=lambda item: item[1]["inferences_per_s"], default=None)


def render(data: dict[str, Any]) -> str:
    raw = data["raw"]["mlp"]
    machine = data["machine"]
    peers = data.get("peers")
    columns = sorted({peer for peer, _ in PEER_VARIANTS.values()})  # MLServer, TorchServe
    if peers:
        versions = peers["versions"]
        how = (
            " Inferences/s from perf_analyzer over each server's Unix socket (KServe V2 gRPC),"
            f" MLServer {versions['mlserver']} included (through benchmarks/peers/"
            f"mlserver_launch.py); TorchServe {versions['torchserve']} over its REST API on"
            " 127.0.0.1 (`--service-kind torchserve`, one request of all the rows per call)."
            " Each peer's column is its best variant in that scenario, named in brackets;"
            " every variant is in the table below. The server's CPU in % of one core."
        )
        peer_head = " | ".join(columns) + " | edgeinfer / best peer |"
        peer_rule = "--:|" * (len(columns) + 1)
    else:
        how = (
            " Inferences/s from perf_analyzer over each server's Unix socket (KServe V2);"
            " the server's CPU in % of one core."
        )
        peer_head = "best peer (quoted) | edgeinfer / quoted best |"
        peer_rule = "---|--:|"
    lines = [
        f"Measured {data['date']} on {machine['cpu']}, {machine['cores']} cores"
        f" ({data['rounds']} round(s) of {data['window_s']:g} s windows, best round per cell;"
        f" code at commit {data['source'].get('commit', '?')})." + how,
        "",
        "| scenario (callers x batch) | edgeinfer | p50 / p99 ms | CPU % | its passes: rows"
        " each, on the loop | always a thread | inline server | edgeinfer / inline"
        " | raw PyTorch, 1 thread | " + peer_head,
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|" + peer_rule,
    ]
    for label, args, rows in SCENARIOS:
        if label not in data["cells"]:
            continue
        cells = data["cells"][label]
        ours = cells["edgeinfer"]
        hop = cells["edgeinfer, always a thread"]
        inline = cells["inline server"]
        raw_cell = raw.get(f"1t/b{rows}")
        rate = ours["inferences_per_s"]
        row = [
            f"| {label}",
            f"{rate:,.0f}",
            f"{ours['p50_us'] / 1000:.2f} / {ours['p99_us'] / 1000:.2f}",
            f"{ours['server_cpu_percent']:.0f}",
            _passes(ours),
            f"{hop['inferences_per_s']:,.0f}",
            f"{inline['inferences_per_s']:,.0f}",
            f"{rate / inline['inferences_per_s']:.2f}x",
            f"{raw_cell['rows_per_s']:,.0f}" if raw_cell else "-",
        ]
        if peers:
            best_rate = 0.0
            for column in columns:
                best = _best_peer(cells, column)
                if best is None:
                    row.append("no streams" if "--streaming" in args else "-")
                else:
                    variant, cell = best
                    row.append(f"{cell['inferences_per_s']:,.0f} ({variant})")
                    best_rate = max(best_rate, cell["inferences_per_s"])
            if not best_rate and "--streaming" in args:
                # No peer streams: the stream against the best unary rate at its concurrency.
                unary = [_best_peer(data["cells"].get(STREAM_UNARY, {}), c) for c in columns]
                best_rate = max((c["inferences_per_s"] for _, c in filter(None, unary)), default=0)
                row.append(f"{rate / best_rate:.2f}x of {STREAM_UNARY} unary" if best_rate else "-")
            else:
                row.append(f"{rate / best_rate:.2f}x" if best_rate else "-")
        else:
            peer, figure = QUOTED_PEERS.get(label, ("none has bidirectional streams", "-"))
            quoted = QUOTED_BEST.get(label)
            row += [f"{peer}: {figure}", f"{rate / quoted:.2f}x" if quoted else "-"]
        lines.append(" | ".join(row) + " |")
    if peers:
        lines += ["", render_peers(data)]
    return "\n".join(lines)


def _passes(cell: Cell) -> str:
    """Rows a forward pass and the share of passes run on the event loop, as "5.2, 0%"."""
    if not cell.get("passes"):
        return "-"  # a results file from before these were counted
    rows, inline = cell["pass_rows"] / cell["passes"], cell["inline_passes"] / cell["passes"]
    return f"{rows:.1f}, {inline:.0%}"


def render_peers(data: dict[str, Any]) -> str:
    """Every peer variant in every scenario it ran: inferences/s, p50 / p99, CPU."""
    labels = [label for label, _, _ in SCENARIOS if label in data["cells"]]
    labels = [label for label in labels if any(n in data["cells"][label] for n in PEER_VARIANTS)]
    idle = data["peers"].get("idle_cpu_percent", {})
    lines = [
        "**The peers, every variant** (inferences/s; p50 / p99 ms; the server's CPU %, for"
        " TorchServe its Java frontend and Python workers together). Neither peer can be"
        " driven with perf_analyzer's streams: MLServer's `ModelStreamInfer` differs from"
        " Triton's, and TorchServe is measured over REST. Idle (3 s just after start-up),"
        " they used "
        + ", ".join(f"{name} {percent:.1f}%" for name, percent in sorted(idle.items()))
        + " of a core.",
        "",
        "| peer | variant | " + " | ".join(labels) + " |",
        "|---|---|" + "--:|" * len(labels),
    ]
    for name, (peer, variant) in PEER_VARIANTS.items():
        row = [f"| {peer}", variant]
        for label in labels:
            cell = data["cells"][label].get(name)
            row.append(
                f"{cell['inferences_per_s']:,.0f}; {cell['p50_us'] / 1000:.2f} /"
                f" {cell['p99_us'] / 1000:.2f}; {cell['server_cpu_percent']:.0f}%"
                if cell
                else "-"
            )
        lines.append(" | ".join(row) + " |")
    return "\n".join(lines)


def render_crossover(data: dict[str, Any]) -> str:
    import statistics

    lines = [
        "**Where inlining stops paying** (one caller; the same daemon, alternating pairs of"
        " windows: `mlp-loop` runs every lone pass on the event loop, `mlp-hop` every pass"
        " in a thread):",
        "",
        "| scenario | on the loop: median inf/s | in a thread: median inf/s | loop / thread"
        " | pairs the loop won |",
        "|---|--:|--:|--:|--:|",
    ]
    for label, rates in data.get("crossover", {}).items():
        loop, hop = rates["mlp-loop"], rates["mlp-hop"]
        won = sum(a > b for a, b in zip(loop, hop, strict=True))
        lines.append(
            f"| {label} | {statistics.median(loop):,.0f} | {statistics.median(hop):,.0f}"
            f" | {statistics.median(loop) / statistics.median(hop):.2f}x | {won} of {len(loop)} |"
        )
    return "\n".join(lines)


def resolve_peers(args: argparse.Namespace) -> Path | None:
    """--peers DIR, else the default folder if it exists; its two venvs must be there."""
    if args.no_peers:
        return None
    peers = args.peers or default_peers()
    if args.peers is None and not peers.is_dir():
        sb.log(f"no peers: {peers} does not exist (benchmarks/peers/setup_peers.sh makes it)")
        return None
    missing = [
        str(path)
        for path in (
            peers / "mlserver-venv" / "bin" / "python",
            peers / "torchserve-venv" / "bin" / "torchserve",
            peers / "torchserve-venv" / "bin" / "torch-model-archiver",
        )
        if not path.exists()
    ]
    if missing:
        raise SystemExit(
            f"peers folder {peers} is incomplete (missing {', '.join(missing)}): run"
            f" benchmarks/peers/setup_peers.sh {peers}, or pass --no-peers"
        )
    return peers.resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of 2 s windows")
    parser.add_argument("--render", action="store_true", help="rewrite the table from the JSON")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        metavar="LABEL",
        choices=[label for label, _, _ in SCENARIOS],
        help="run only these scenarios (a smoke run: writes no README table, and the JSON"
        " only if --json is given)",
    )
    parser.add_argument(
        "--crossover-pairs", type=int, help="pairs of windows per crossover scenario (0: none)"
    )
    parser.add_argument(
        "--peers",
        type=Path,
        help="the folder setup_peers.sh made (default: $EDGEINFER_CACHE/peers, or"
        " ~/.cache/edgeinfer/peers, if it exists)",
    )
    parser.add_argument("--no-peers", action="store_true", help="measure no peer server")
    parser.add_argument(
        "--json",
        type=Path,
        help="the results file to write (or, with --render, read); only the default one,"
        " results/load_bench.json, rewrites the README table",
    )
    parser.add_argument("--no-readme", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    default_path = RESULTS / "load_bench.json"
    path = args.json or default_path
    readme = not args.no_readme and path.resolve() == default_path.resolve()
    if args.render:
        data = json.loads(path.read_text())
    else:
        if shutil.which("perf_analyzer") is None:
            print(
                "perf_analyzer is not on PATH (it ships in the tritonclient wheel)", file=sys.stderr
            )
            return 2
        peers = resolve_peers(args)
        # A SIGTERM unwinds like Ctrl-C, so that every server started is stopped.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        quick = args.quick
        labels = args.scenarios or [label for label, _, _ in SCENARIOS]
        pairs = args.crossover_pairs
        data = measure(
            1 if quick else 3,
            2.0 if quick else 3.0,
            1.0 if quick else 2.0,
            (2 if quick else 6) if pairs is None else pairs,
            labels,
            peers,
        )
        if args.scenarios:
            readme = False
        if args.json or not args.scenarios:
            path.write_text(json.dumps(data, indent=2))
    table = render(data)
    if data.get("crossover"):
        table += "\n\n" + render_crossover(data)
    if readme:
        sb.update_readme({"load": table})
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
