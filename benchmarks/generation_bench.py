"""Token streaming through the daemon vs the raw in-process loop, at several concurrencies.

    python benchmarks/generation_bench.py --repo REPO [--model charlm-int8]

REPO is a model repository with a generative model (examples/charlm/build.py
writes one). The script starts its own daemon on a private Unix socket, runs
``--rounds`` rounds of N concurrent greedy generations for each N of
``--concurrency`` over gRPC, then the plain one-sequence loop in this process
on the same artifact, and prints a Markdown table:

* tokens/s: all generated tokens over the wall time of the round;
* time to first token (p50, p99): from sending the request to receiving the
  first chunk, over every request of every round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import edgeinfer

PROMPT = "Lists are mutable sequences"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def start_daemon(repo: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    socket = workdir / "bench.sock"
    config = workdir / "edgeinferd.toml"
    config.write_text(
        f'repository = "{repo.resolve()}"\n[listen]\nunix = "{socket}"\n'
        '[logging]\nlevel = "warning"\n'
    )
    log = (workdir / "daemon.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeinferd", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"unix://{socket}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the daemon exited:\n{(workdir / 'daemon.log').read_text()}")
        if socket.exists():
            try:
                with edgeinfer.Client(address, timeout=2) as client:
                    if client.health() == "SERVING":
                        return process, address
            except edgeinfer.EdgeInferError:
                pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the daemon did not become ready")


async def round_over_grpc(
    address: str, model: str, concurrent: int, tokens: int
) -> tuple[float, list[float]]:
    """One round: (tokens per second overall, each request's time to first token)."""
    async with edgeinfer.AsyncClient(address, timeout=300) as client:

        async def one() -> tuple[int, float]:
            sent = time.perf_counter()
            first = None
            count = 0
            async for event in client.generate(model, PROMPT, max_new_tokens=tokens):
                if isinstance(event, edgeinfer.GenerateChunk):
                    first = first or time.perf_counter()
                    count += len(event.token_ids)
            assert first is not None
            return count, first - sent

        started = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(concurrent)))
        wall = time.perf_counter() - started
    return sum(c for c, _ in results) / wall, [t for _, t in results]


def raw_loop(repo: Path, model: str, tokens: int, rounds: int) -> tuple[float, list[float]]:
    """The one-sequence loop in this process: no daemon, no gRPC, no scheduler."""
    import torch

    from edgeinferd.generation import loop
    from edgeinferd.generation.model import GenerativeModel, load_generative
    from edgeinferd.generation.params import validate
    from edgeinferd.repository import Repository

    repository = Repository(repo)
    config = repository.read_config(model)
    loaded: GenerativeModel = load_generative(config, repository.version_files(config))
    torch.set_num_threads(config.threads)
    params = validate(loaded, PROMPT, max_new_tokens=tokens)
    loop.generate(loaded, params)
    speeds, firsts = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        loaded.prefill(list(params.prompt))
        firsts.append(time.perf_counter() - started)
        started = time.perf_counter()
        loop.generate(loaded, params)
        speeds.append(tokens / (time.perf_counter() - started))
    return statistics.median(speeds), firsts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--model", default="charlm-int8")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="ei-bench-", dir="/tmp"))
    process, address = start_daemon(args.repo, workdir)
    rows = []
    try:
        asyncio.run(round_over_grpc(address, args.model, 1, 8))  # warm-up
        for concurrent in args.concurrency:
            speeds, firsts = [], []
            for _ in range(args.rounds):
                speed, ttfts = asyncio.run(
                    round_over_grpc(address, args.model, concurrent, args.tokens)
                )
                speeds.append(speed)
                firsts += ttfts
            rows.append((f"daemon, {concurrent} concurrent", statistics.median(speeds), firsts))
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
    speed, firsts = raw_loop(args.repo, args.model, args.tokens, args.rounds)
    rows.append(("in-process loop, 1 sequence", speed, firsts))

    print(
        f"{args.model}, {args.tokens} new tokens per generation, greedy, {args.rounds} rounds;"
        f" {datetime.now(UTC):%Y-%m-%d}, {platform.machine()} CPU, {os.cpu_count()} cores\n"
    )
    print("| run | tokens/s (all sequences) | first token p50 | first token p99 |")
    print("|---|---:|---:|---:|")
    for label, speed, firsts in rows:
        p50, p99 = percentile(firsts, 50) * 1000, percentile(firsts, 99) * 1000
        print(f"| {label} | {speed:.0f} | {p50:.1f} ms | {p99:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
