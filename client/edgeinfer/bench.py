"""``edgeinfer bench``: a load generator for edgeinferd, in the spirit of perf_analyzer.

    edgeinfer bench MODEL [--mode unary|stream] [--concurrency 1,8,32 | --rate N]
                          [--batch-size B] [--duration S] [--warmup S] [--processes N]
                          [--shared-memory] [--server-pid PID] [--json]

Inputs are random (or zero) arrays of the shapes the model declares (GetModel):
the leading batch dimension of a batched model becomes ``--batch-size``, any
other variable dimension 1. Each cell of the sweep runs ``--warmup`` seconds
unmeasured, then ``--duration`` seconds whose completed calls are counted:
throughput, latency percentiles (send to answer; with ``--rate``, from the
scheduled send time, so a late generator shows as latency) and the CPU time
that the daemon and the generator used meanwhile.

Closed loop (``--concurrency``): that many calls in flight, each caller sending
its next call when the last one returns. In stream mode they are messages in
flight over ``--streams`` streams. Open loop (``--rate``): calls are sent at a
fixed rate whatever the answers do.

Many concurrent callers share one asyncio event loop; ``--processes N`` splits
them over N processes (a Python client on a small device can itself be the
bottleneck: the report shows the generator's CPU next to the daemon's).
The daemon's CPU is read from /proc/PID/stat: PID is ``--server-pid`` (several,
comma-separated, are summed), or the process listening on a local Unix socket
address (SO_PEERCRED).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import socket
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from edgeinfer.client import (
    AsyncClient,
    EdgeInferError,
    ModelInfo,
    TlsOptions,
)
from edgeinfer.shm import ALIGNMENT, SharedMemoryRegion
from edgeinfer.tensors import DTYPES_BY_NAME, NUMPY_DTYPES

ClientFactory = Callable[[], AsyncClient]

EXIT_FAILED = 1
EXIT_USAGE = 2
#: Seconds between the processes' readiness and the start of the load.
_START_LEAD_S = 0.2
#: Open loop: a call sent this much after its scheduled time counts as late.
_LATE_S = 0.002
#: Shared-memory regions per process in open-loop mode (calls beyond wait for one).
_OPEN_LOOP_REGIONS = 64


class BenchUsageError(Exception):
    """The command line does not fit the model or itself."""


def client_factory(address: str, timeout: float, tls: TlsOptions | None) -> ClientFactory:
    """A picklable factory: every load-generating process builds its own client."""
    return functools.partial(AsyncClient, address, timeout=timeout, tls=tls)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    bench = commands.add_parser(
        "bench", help="measure throughput and latency under load (a load generator)"
    )
    bench.add_argument("model")
    bench.add_argument("--version", default="")
    bench.add_argument("--mode", choices=["unary", "stream"], default="unary")
    load = bench.add_mutually_exclusive_group()
    load.add_argument(
        "-c",
        "--concurrency",
        type=_int_list,
        help="calls in flight, or a sweep: 1,8,32 (closed loop; default 1)",
    )
    load.add_argument("--rate", type=float, help="calls per second, whatever the answers do")
    bench.add_argument("-b", "--batch-size", type=int, default=1, help="rows per call (default 1)")
    bench.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    bench.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    bench.add_argument(
        "--processes", type=int, default=1, help="load-generating processes (default 1)"
    )
    bench.add_argument(
        "--streams", type=int, default=1, help="streams per process in stream mode (default 1)"
    )
    bench.add_argument(
        "--shared-memory",
        action="store_true",
        help="send inputs and receive outputs through shared memory (unary, local daemon)",
    )
    bench.add_argument("--input-data", choices=["random", "zeros"], default="random")
    bench.add_argument(
        "--server-pid",
        type=_int_list,
        help="the daemon's pid, to report its CPU (PID,PID,...: several processes, summed)",
    )
    bench.add_argument(
        "--json", dest="bench_json", action="store_true", help="one JSON document on stdout"
    )
    return bench  # type: ignore[no-any-return]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 8 or 1,8,32, not {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("the values must be positive")
    return values


# ---------------------------------------------------------------- what each process does


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """One load-generating process's share of a cell (picklable)."""

    model: str
    version: str
    mode: str
    inputs: tuple[InputSpec, ...]
    batch_size: int
    #: Calls (or stream messages) in flight; 0 in open loop.
    concurrency: int
    #: Calls per second of this process; 0 in closed loop.
    rate: float
    #: Open loop: this process's first call is this many seconds after the start.
    phase_s: float
    streams: int
    shared_memory: bool
    #: For shared memory: the outputs to receive there and the bytes each needs.
    outputs: tuple[str, ...]
    output_bytes: int
    input_data: str
    seed: int


@dataclass(frozen=True)
class Window:
    """time.monotonic() instants (one clock for every process on the machine)."""

    start: float
    measure_start: float
    end: float


@dataclass
class Tally:
    """What one process saw during the measured window."""

    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    #: CPU seconds this process used during the window.
    cpu_s: float = 0.0
    #: Open loop: calls sent more than 2 ms after their scheduled time.
    late: int = 0


def make_inputs(plan: Plan) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(plan.seed)
    arrays = {}
    for spec in plan.inputs:
        dtype = NUMPY_DTYPES[DTYPES_BY_NAME[spec.dtype]]
        if plan.input_data == "zeros":
            arrays[spec.name] = np.zeros(spec.shape, dtype)
        elif dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        else:  # small non-negative values: valid as indices, flags or counts
            arrays[spec.name] = rng.integers(0, 2, spec.shape).astype(dtype)
    return arrays


class _Recorder:
    def __init__(self, window: Window, tally: Tally, counters: Any, index: int) -> None:
        self.window = window
        self.tally = tally
        self.counters = counters
        self.index = index
        self.errors: Counter[str] = Counter()

    def record(self, sent: float, error: str | None) -> None:
        done = time.monotonic()
        self.counters[self.index] += 1
        if self.window.measure_start <= done < self.window.end:
            if error is None:
                self.tally.completed += 1
                self.tally.latencies.append(done - sent)
            else:
                self.errors[error] += 1


async def _sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _measure_cpu(window: Window, tally: Tally) -> None:
    await _sleep_until(window.measure_start)
    before = time.process_time()
    await _sleep_until(window.end)
    tally.cpu_s = time.process_time() - before


class _Caller:
    """Sends one unary call, inline or through a pool of shared-memory regions."""

    def __init__(self, client: AsyncClient, plan: Plan, inputs: dict[str, np.ndarray]) -> None:
        self.client = client
        self.plan = plan
        self.inputs = inputs
        self.regions: list[SharedMemoryRegion] = []
        self.pool: asyncio.Queue[SharedMemoryRegion] = asyncio.Queue()

    async def open(self, regions: int) -> None:
        if not self.plan.shared_memory:
            return
        input_bytes = sum(-(-a.nbytes // ALIGNMENT) * ALIGNMENT for a in self.inputs.values())
        per_output = -(-self.plan.output_bytes // ALIGNMENT) * ALIGNMENT
        size = input_bytes + len(self.plan.outputs) * (per_output + ALIGNMENT)
        for _ in range(regions):
            region = SharedMemoryRegion.create(size)
            self.regions.append(region)
            await self.client.register_shared_memory(region)
            self.pool.put_nowait(region)

    async def close(self) -> None:
        for region in self.regions:
            if region.registered:
                with contextlib.suppress(EdgeInferError):
                    await self.client.unregister_shared_memory(region)
            region.close()

    async def call(self) -> None:
        if not self.plan.shared_memory:
            await self.client.predict(self.plan.model, self.inputs, version=self.plan.version)
            return
        region = await self.pool.get()
        try:
            await self.client.predict(
                self.plan.model,
                self.inputs,
                version=self.plan.version,
                outputs=self.plan.outputs,
                shared_memory=region,
                outputs_in_shared_memory=True,
            )
        finally:
            self.pool.put_nowait(region)


async def _timed(caller: _Caller, sent: float, recorder: _Recorder) -> None:
    try:
        await caller.call()
    except EdgeInferError as error:
        recorder.record(sent, error.code.name)
    else:
        recorder.record(sent, None)


async def _closed_loop_caller(caller: _Caller, window: Window, recorder: _Recorder) -> None:
    while (sent := time.monotonic()) < window.end:
        await _timed(caller, sent, recorder)


async def _open_loop(caller: _Caller, plan: Plan, window: Window, recorder: _Recorder) -> None:
    interval = 1.0 / plan.rate
    running: set[asyncio.Task[None]] = set()
    number = 0
    while (scheduled := window.start + plan.phase_s + number * interval) < window.end:
        await _sleep_until(scheduled)
        if time.monotonic() - scheduled > _LATE_S and scheduled >= window.measure_start:
            recorder.tally.late += 1
        task = asyncio.create_task(_timed(caller, scheduled, recorder))
        running.add(task)
        task.add_done_callback(running.discard)
        number += 1
    if running:
        await asyncio.gather(*running)


async def _one_stream(
    client: AsyncClient,
    plan: Plan,
    inputs: dict[str, np.ndarray],
    depth: int,
    interval: float,
    phase: float,
    window: Window,
    recorder: _Recorder,
) -> None:
    """Messages over one stream: ``depth`` in flight (closed) or one per ``interval`` (open)."""
    window_slots = asyncio.Semaphore(depth) if depth else None
    sent_at: deque[float] = deque()

    async def messages() -> AsyncIterator[dict[str, np.ndarray]]:
        number = 0
        while True:
            if window_slots is not None:
                await window_slots.acquire()
                sent = time.monotonic()
            else:
                sent = window.start + phase + number * interval
                await _sleep_until(sent)
                if time.monotonic() - sent > _LATE_S and sent >= window.measure_start:
                    recorder.tally.late += 1
                number += 1
            if sent >= window.end:
                return
            sent_at.append(sent)
            yield inputs

    async for result in client.stream(plan.model, messages(), version=plan.version):
        sent = sent_at.popleft()
        recorder.record(sent, result.error.code.name if result.error is not None else None)
        if window_slots is not None:
            window_slots.release()


async def run_load(
    client: AsyncClient, plan: Plan, window: Window, counters: Any, index: int
) -> Tally:
    """Generate this process's share of the load between ``window.start`` and ``window.end``."""
    tally = Tally()
    recorder = _Recorder(window, tally, counters, index)
    inputs = make_inputs(plan)
    cpu = asyncio.create_task(_measure_cpu(window, tally))
    if plan.mode == "stream":
        streams = max(1, min(plan.streams, plan.concurrency or plan.streams))
        jobs = []
        for number in range(streams):
            if plan.concurrency:
                depth = plan.concurrency // streams + (number < plan.concurrency % streams)
                jobs.append(_one_stream(client, plan, inputs, depth, 0, 0, window, recorder))
            else:
                interval = streams / plan.rate
                phase = plan.phase_s + number / plan.rate
                jobs.append(_one_stream(client, plan, inputs, 0, interval, phase, window, recorder))
        await _sleep_until(window.start)
        await asyncio.gather(*jobs)
    else:
        caller = _Caller(client, plan, inputs)
        await caller.open(plan.concurrency or _OPEN_LOOP_REGIONS)
        try:
            await _sleep_until(window.start)
            if plan.concurrency:
                await asyncio.gather(
                    *(
                        _closed_loop_caller(caller, window, recorder)
                        for _ in range(plan.concurrency)
                    )
                )
            else:
                await _open_loop(caller, plan, window, recorder)
        finally:
            await caller.close()
    await cpu
    tally.errors = dict(recorder.errors)
    return tally


def _process_main(
    factory: ClientFactory, plan: Plan, conn: Connection, counters: Any, index: int
) -> None:
    """A load-generating process: get ready, wait for the window, run, report."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = factory()
        try:
            await client.health()
            conn.send(("ready", None))
            window = await loop.run_in_executor(None, conn.recv)
            tally = await run_load(client, plan, window, counters, index)
        finally:
            await client.close()
        # Latencies travel as float64 bytes: much cheaper to pickle than a list.
        tally_bytes = np.asarray(tally.latencies, np.float64).tobytes()
        tally.latencies = []
        conn.send(("done", (tally, tally_bytes)))

    try:
        asyncio.run(main())
    except BaseException as error:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from None


# ---------------------------------------------------------------- one cell, many processes


@dataclass
class CellResult:
    mode: str
    concurrency: int | None
    rate: float | None
    batch_size: int
    processes: int
    duration_s: float
    requests: int
    errors: dict[str, int]
    throughput: float
    rows_per_s: float
    latency_ms: dict[str, float]
    #: Of one core; over 100 when several cores were busy.
    server_cpu_percent: float | None
    client_cpu_percent: float
    #: Open loop: calls sent more than 2 ms late (the generator could not keep up).
    late: int
    server_rss_bytes: int | None = None


def split(total: int, parts: int) -> list[int]:
    """``total`` calls over at most ``parts`` processes, none of them idle."""
    shares = [total // parts + (i < total % parts) for i in range(parts)]
    return [share for share in shares if share]


class _CpuReader:
    """utime + stime of the server's processes (summed), from /proc/PID/stat."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.tick = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float | None:
        total = 0.0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                return None
            total += (int(fields[11]) + int(fields[12])) / self.tick
        return total

    def rss_bytes(self) -> int | None:
        total = 0
        for pid in self.pids:
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                return None
            total += next((int(ln.split()[1]) * 1024 for ln in lines if ln.startswith("VmRSS:")), 0)
        return total


def peer_pid(address: str) -> int | None:
    """The pid of the process listening on a Unix socket address (SO_PEERCRED)."""
    if not address.startswith("unix:"):
        return None
    path = address[len("unix:") :]
    if path.startswith("//"):
        path = path[2:]
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    finally:
        probe.close()
    pid = int(struct.unpack("3i", creds)[0])
    return pid if pid > 0 and Path(f"/proc/{pid}/stat").exists() else None


class _Progress:
    """A one-line live display on a terminal; a line per cell otherwise."""

    def __init__(self, enabled: bool, live: bool) -> None:
        self.enabled = enabled
        self.live = live

    def start(self, label: str, warmup: float, duration: float) -> None:
        if self.enabled and not self.live:
            print(f"bench: {label}: {warmup:g} s warm-up, {duration:g} s measured", file=sys.stderr)

    def update(self, label: str, window: Window, done: int) -> None:
        if not (self.enabled and self.live):
            return
        now = time.monotonic()
        if now < window.measure_start:
            phase, since, until = "warm-up", window.start, window.measure_start
        else:
            phase, since, until = "measuring", window.measure_start, window.end
        phase += f" {max(0.0, min(now, until) - since):4.1f}/{until - since:g} s"
        sys.stderr.write(f"\r\x1b[2Kbench {label}: {phase}, {done} calls")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled and self.live:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


async def run_cell(
    factory: ClientFactory,
    plan: Plan,
    *,
    processes: int,
    warmup: float,
    duration: float,
    server_pids: Sequence[int],
    progress: _Progress,
    label: str,
) -> CellResult:
    """Run one cell of the sweep; returns what the measured window saw."""
    plans = _split_plan(plan, processes)
    cpu = _CpuReader(server_pids) if server_pids else None
    progress.start(label, warmup, duration)
    if len(plans) == 1:
        counters: Any = [0]
        client = factory()
        try:
            await client.health()
            now = time.monotonic()
            window = Window(now + 0.05, now + 0.05 + warmup, now + 0.05 + warmup + duration)
            monitor = asyncio.create_task(_monitor(window, cpu, counters, progress, label))
            tallies = [await run_load(client, plans[0], window, counters, 0)]
            server = await monitor
        finally:
            await client.close()
    else:
        tallies, server, window = await _run_processes(
            factory, plans, warmup, duration, cpu, progress, label
        )
    progress.finish()
    latencies = np.concatenate([np.asarray(t.latencies, np.float64) for t in tallies])
    completed = sum(t.completed for t in tallies)
    errors: Counter[str] = Counter()
    for t in tallies:
        errors.update(t.errors)
    measured = window.end - window.measure_start
    server_cpu, server_rss = server
    rows = plan.batch_size
    return CellResult(
        mode=plan.mode,
        concurrency=plan.concurrency or None,
        rate=plan.rate or None,
        batch_size=rows,
        processes=len(plans),
        duration_s=measured,
        requests=completed,
        errors=dict(errors),
        throughput=completed / measured,
        rows_per_s=completed * rows / measured,
        latency_ms=_percentiles(latencies),
        server_cpu_percent=None if server_cpu is None else 100 * server_cpu / measured,
        client_cpu_percent=100 * sum(t.cpu_s for t in tallies) / measured,
        late=sum(t.late for t in tallies),
        server_rss_bytes=server_rss,
    )


def _split_plan(plan: Plan, processes: int) -> list[Plan]:
    from dataclasses import replace

    if plan.concurrency:
        return [
            replace(plan, concurrency=c, seed=plan.seed + i)
            for i, c in enumerate(split(plan.concurrency, processes))
        ]
    return [
        replace(plan, rate=plan.rate / processes, phase_s=i / plan.rate, seed=plan.seed + i)
        for i in range(processes)
    ]


def _percentiles(latencies: np.ndarray) -> dict[str, float]:
    if latencies.size == 0:
        return {}
    ms = latencies * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
        "max": float(ms.max()),
    }


async def _monitor(
    window: Window,
    cpu: _CpuReader | None,
    counters: Any,
    progress: _Progress,
    label: str,
) -> tuple[float | None, int | None]:
    """Sample the daemon's CPU at the window's edges; keep the display fresh."""
    before: float | None = None
    after: float | None = None
    while True:
        now = time.monotonic()
        if now >= window.measure_start and before is None and cpu is not None:
            before = cpu.seconds()
        if now >= window.end:
            after = cpu.seconds() if cpu is not None else None
            break
        progress.update(label, window, sum(counters[i] for i in range(len(counters))))
        edge = window.measure_start if now < window.measure_start else window.end
        await asyncio.sleep(max(0.0, min(0.25, edge - now)))
    used = None if before is None or after is None else after - before
    rss = cpu.rss_bytes() if cpu is not None else None
    return used, rss


async def _run_processes(
    factory: ClientFactory,
    plans: Sequence[Plan],
    warmup: float,
    duration: float,
    cpu: _CpuReader | None,
    progress: _Progress,
    label: str,
) -> tuple[list[Tally], tuple[float | None, int | None], Window]:
    context = multiprocessing.get_context("spawn")
    counters = context.Array("q", len(plans), lock=False)
    loop = asyncio.get_running_loop()
    pipes = []
    children = []
    for index, plan in enumerate(plans):
        parent_end, child_end = context.Pipe()
        child = context.Process(
            target=_process_main,
            args=(factory, plan, child_end, counters, index),
            name=f"edgeinfer-bench-{index}",
            daemon=True,
        )
        child.start()
        child_end.close()
        pipes.append(parent_end)
        children.append(child)

    async def receive(conn: Connection, expected: str) -> Any:
        try:
            kind, payload = await loop.run_in_executor(None, conn.recv)
        except EOFError:
            raise RuntimeError("a load-generating process exited early") from None
        if kind == "error":
            if isinstance(payload, str) and payload.startswith("EdgeInferError: "):
                raise RuntimeError(payload[len("EdgeInferError: ") :])
            raise RuntimeError(f"a load-generating process failed: {payload}")
        assert kind == expected, kind
        return payload

    try:
        await asyncio.gather(*(receive(conn, "ready") for conn in pipes))
        start = time.monotonic() + _START_LEAD_S
        window = Window(start, start + warmup, start + warmup + duration)
        for conn in pipes:
            conn.send(window)
        monitor = asyncio.create_task(_monitor(window, cpu, counters, progress, label))
        results = await asyncio.gather(*(receive(conn, "done") for conn in pipes))
        server = await monitor
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
        for conn in pipes:
            conn.close()
    tallies = []
    for tally, latency_bytes in results:
        tally.latencies = np.frombuffer(latency_bytes, np.float64).tolist()
        tallies.append(tally)
    return tallies, server, window


# ---------------------------------------------------------------- the command


def input_specs(info: ModelInfo, batch_size: int) -> tuple[InputSpec, ...]:
    """The model's inputs with the batch dimension and other variable dimensions filled in."""
    specs = []
    for tensor in info.inputs:
        shape = list(tensor.shape)
        if info.max_batch_size > 0 and shape:
            shape[0] = batch_size
        specs.append(InputSpec(tensor.name, tensor.dtype, tuple(1 if d < 0 else d for d in shape)))
    return tuple(specs)


def output_bytes(info: ModelInfo, batch_size: int) -> int:
    """The largest output's byte size for one call (variable dimensions but the batch: 1)."""
    largest = 0
    for tensor in info.outputs:
        shape = list(tensor.shape)
        if info.max_batch_size > 0 and shape:
            shape[0] = batch_size
        count = 1
        for dim in shape:
            count *= 1 if dim < 0 else dim
        largest = max(largest, count * NUMPY_DTYPES[DTYPES_BY_NAME[tensor.dtype]].itemsize)
    return largest


def _check(args: argparse.Namespace, info: ModelInfo) -> None:
    if info.generative:
        raise BenchUsageError(f"model {info.name!r} is generative; bench measures Predict")
    if args.batch_size < 1:
        raise BenchUsageError("--batch-size must be at least 1")
    if info.max_batch_size > 0 and args.batch_size > info.max_batch_size:
        raise BenchUsageError(
            f"--batch-size {args.batch_size} is more than model {info.name!r}'s"
            f" max_batch_size {info.max_batch_size}"
        )
    if info.max_batch_size == 0 and args.batch_size != 1:
        raise BenchUsageError(f"model {info.name!r} takes no batch dimension: leave --batch-size")
    if args.duration <= 0 or args.warmup < 0:
        raise BenchUsageError("--duration must be positive and --warmup not negative")
    if args.processes < 1 or args.streams < 1:
        raise BenchUsageError("--processes and --streams must be at least 1")
    if args.rate is not None and args.rate <= 0:
        raise BenchUsageError("--rate must be positive")
    if args.shared_memory and args.mode != "unary":
        raise BenchUsageError("--shared-memory is for --mode unary")


async def _bench(args: argparse.Namespace, factory: ClientFactory) -> list[CellResult]:
    client = factory()
    try:
        info = await client.get_model(args.model)
    finally:
        await client.close()
    _check(args, info)
    found = peer_pid(client.address)
    server_pids = args.server_pid or ([found] if found is not None else [])
    plan = Plan(
        model=args.model,
        version=args.version,
        mode=args.mode,
        inputs=input_specs(info, args.batch_size),
        batch_size=args.batch_size,
        concurrency=0,
        rate=0.0,
        phase_s=0.0,
        streams=args.streams,
        shared_memory=args.shared_memory,
        outputs=tuple(t.name for t in info.outputs),
        output_bytes=output_bytes(info, args.batch_size),
        input_data=args.input_data,
        seed=0,
    )
    from dataclasses import replace

    if args.rate is not None:
        cells = [(replace(plan, rate=args.rate), f"{args.mode} rate={args.rate:g}/s")]
    else:
        cells = [
            (replace(plan, concurrency=c), f"{args.mode} c={c}") for c in args.concurrency or [1]
        ]
    progress = _Progress(enabled=True, live=sys.stderr.isatty())
    results = []
    for cell_plan, label in cells:
        results.append(
            await run_cell(
                factory,
                cell_plan,
                processes=args.processes,
                warmup=args.warmup,
                duration=args.duration,
                server_pids=server_pids,
                progress=progress,
                label=label,
            )
        )
    return results


def main(args: argparse.Namespace, factory: ClientFactory) -> int:
    """Run ``edgeinfer bench``; ``factory`` builds each process's AsyncClient."""
    try:
        results = asyncio.run(_bench(args, factory))
    except BenchUsageError as error:
        print(f"edgeinfer: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as error:
        print(f"edgeinfer: bench: {error}", file=sys.stderr)
        return EXIT_FAILED
    as_json = bool(getattr(args, "json", False) or getattr(args, "bench_json", False))
    if as_json:
        document = {
            "model": args.model,
            "mode": args.mode,
            "batch_size": args.batch_size,
            "processes": args.processes,
            "shared_memory": args.shared_memory,
            "results": [asdict(r) for r in results],
        }
        print(json.dumps(document, indent=2))
    else:
        print_table(results)
    if all(r.requests == 0 for r in results):
        return EXIT_FAILED
    return 0


def print_table(results: Sequence[CellResult]) -> None:
    header = (
        f"{'load':>10} {'calls/s':>10} {'rows/s':>10} {'p50 ms':>8} {'p90 ms':>8}"
        f" {'p99 ms':>8} {'errors':>7} {'daemon CPU':>10} {'client CPU':>10}"
    )
    print(header)
    warn = []
    for r in results:
        load = f"c={r.concurrency}" if r.concurrency else f"{r.rate:g}/s"
        lat = r.latency_ms
        server = "-" if r.server_cpu_percent is None else f"{r.server_cpu_percent:.0f}%"
        print(
            f"{load:>10} {r.throughput:>10.1f} {r.rows_per_s:>10.1f}"
            f" {lat.get('p50', float('nan')):>8.3f} {lat.get('p90', float('nan')):>8.3f}"
            f" {lat.get('p99', float('nan')):>8.3f} {sum(r.errors.values()):>7}"
            f" {server:>10} {r.client_cpu_percent:>9.0f}%"
        )
        if r.client_cpu_percent / r.processes > 90:
            warn.append(load)
        for code, count in sorted(r.errors.items()):
            print(f"{'':>10} {count} x {code}")
        if r.late:
            print(f"{'':>10} {r.late} calls sent over 2 ms late: the generator fell behind")
    if warn:
        print(
            f"note: the generator used over 90% of a core per process at {', '.join(warn)};"
            " it may be the bottleneck (try --processes)",
            file=sys.stderr,
        )
