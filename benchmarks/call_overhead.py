"""The daemon's own Python per call, without gRPC: what the inline server does not pay.

One event loop, the benchmark MLP (``serve_bench``), batch 1 (``--rows`` for
more), one call at a time. Side by side in one run, alternating rounds:

- ``pass only``: the TorchScript module called on a tensor (what every server pays);
- ``inline server``: parse a KServe V2 request, run the module, build the answer
  (``benchmarks/inline_server.py``'s per-call work, without its gRPC);
- ``edgeinfer``: the same bytes through the daemon's KServe V2 adapter and data
  plane (parse, decode, validate, batcher, run inline, metrics, encode), as
  ``ModelInfer`` does once gRPC has handed it a request.

Prints microseconds per call (median of rounds) and, with ``--profile``, the
daemon path's cProfile by own time. Usage::

    python benchmarks/call_overhead.py [--calls 3000] [--rounds 5] [--profile]

Wall-clock medians on a shared 2-core machine move by tens of microseconds
between runs, more than most changes to the daemon's path. Instructions do not:
``--count N --only KIND`` runs exactly N calls of one kind (after a short
warm-up) and prints nothing, for valgrind to count. The instructions per call
are the difference between a run of N calls and a run of 0, divided by N::

    export PYTHONHASHSEED=0
    for n in 0 2000; do for kind in inline edgeinfer; do
      valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python benchmarks/call_overhead.py --count $n --only $kind 2>&1 | grep Collected
    done; done
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb

from edgeinfer.kserve.v2 import grpc_service_pb2 as pb
from edgeinferd.dataplane import DataPlane
from edgeinferd.logs import configure_logging
from edgeinferd.models import ModelManager
from edgeinferd.protocol.kserve import GRPCInferenceServicer
from edgeinferd.repository import Repository

#: The benchmark MLP's input width (serve_bench.MLP_CONFIG).
FEATURES = 1000


def request_bytes(rows: int) -> bytes:
    x = np.random.default_rng(0).standard_normal((rows, FEATURES), dtype=np.float32)
    message = pb.ModelInferRequest(model_name="mlp")
    message.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    message.raw_input_contents.append(x.tobytes())
    return message.SerializeToString()


class Context:
    """What the adapter asks of a grpc.aio context on this path."""

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "unix:"


async def main(
    calls: int, rounds: int, profile: bool, count: int | None, only: str, rows: int
) -> None:
    torch.set_num_threads(1)
    configure_logging("info", "json", io.StringIO())  # as the daemon runs by default
    work = Path(tempfile.mkdtemp())
    sb.build_repository(work / "repo")
    executor = ThreadPoolExecutor(2)
    models = ModelManager(Repository(work / "repo"), executor, lambda entry: None)
    await models.load_all()
    servicer = GRPCInferenceServicer(DataPlane(models))
    module = torch.jit.load(str(work / "repo" / "mlp" / "1" / "model.pt")).eval()
    data = request_bytes(rows)
    context: Any = Context()

    def pass_only() -> None:
        x = torch.from_numpy(np.ones((rows, FEATURES), np.float32))
        with torch.inference_mode():
            module(x)

    def inline() -> None:
        message = pb.ModelInferRequest.FromString(data)
        x = np.frombuffer(message.raw_input_contents[0], np.float32).reshape(
            tuple(message.inputs[0].shape)
        )
        with torch.inference_mode():
            y = module(torch.from_numpy(x)).numpy()
        answer = pb.ModelInferResponse(model_name=message.model_name, id=message.id)
        answer.outputs.add(name="y", datatype="FP32", shape=list(y.shape))
        answer.raw_output_contents.append(y.tobytes())
        answer.SerializeToString()

    async def daemon() -> None:
        message = pb.ModelInferRequest.FromString(data)
        answer = await servicer.ModelInfer(message, context)
        answer.SerializeToString()

    async def timed(kind: str) -> float:
        started = time.perf_counter()
        if kind == "edgeinfer":
            for _ in range(calls):
                await daemon()
        else:
            step = pass_only if kind == "pass only" else inline
            for _ in range(calls):
                step()
        return (time.perf_counter() - started) / calls * 1e6

    kinds = ["pass only", "inline server", "edgeinfer"]
    if count is not None:  # for an instruction count: N calls of one kind, then stop
        step = pass_only if only == "pass" else inline
        for _ in range(20):
            step()
            await daemon()
        for _ in range(count):
            if only == "edgeinfer":
                await daemon()
            else:
                step()
        os._exit(0)  # the same exit for every N: no teardown counted
    for kind in kinds:  # warm up
        await timed(kind)
    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    for index in range(rounds):
        order = kinds if index % 2 == 0 else kinds[::-1]
        for kind in order:
            results[kind].append(await timed(kind))
    medians = {kind: statistics.median(values) for kind, values in results.items()}
    print(f"{calls} calls x {rounds} rounds, batch {rows}, one call at a time", end=" ")
    print("(us per call, median):")
    for kind in kinds:
        spread = f"{min(results[kind]):.1f}-{max(results[kind]):.1f}"
        print(f"  {kind:14s} {medians[kind]:8.1f}   ({spread})")
    above = medians["edgeinfer"] - medians["inline server"]
    print(f"  edgeinfer above the inline server: {above:.1f}")
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            await daemon()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())
    executor.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--count", type=int, help="run exactly N calls of --only, print nothing")
    parser.add_argument("--only", choices=["pass", "inline", "edgeinfer"], default="edgeinfer")
    parser.add_argument("--rows", type=int, default=1, help="rows per call (the model takes 32)")
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rounds, args.profile, args.count, args.only, args.rows))
