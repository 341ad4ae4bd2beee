"""What a busy event loop does to forward passes in another thread of the same process.

The daemon runs forward passes in worker threads so that the event loop stays
free; both need the GIL to run Python, and a worker needs it before and after
each pass. This measures the seed MLP's batch-3 forward pass in a worker
thread, one pass after another, while the main thread

- sleeps (nothing competes),
- runs an event loop that mostly waits in epoll (like the daemon at low load),
- runs pure Python without pause (like the daemon's event loop at full load),

under CPython's default switch interval (5 ms) and a short one (0.5 ms).

    python benchmarks/gil_contention.py

Wall time per pass is what a caller waits; CPU time per pass (of the worker
thread only) is what the pass costs the machine.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

ROWS = 3
PASSES = 300


def _measure(module: torch.jit.ScriptModule, x: torch.Tensor) -> tuple[float, float]:
    """Wall and worker-thread CPU µs per pass, measured in a fresh worker thread."""
    result: list[float] = []

    def work() -> None:
        torch.set_num_threads(1)
        with torch.inference_mode():
            for _ in range(30):
                module(x)
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(PASSES):
                module(x)
            result.extend(
                [
                    (time.perf_counter() - wall) / PASSES * 1e6,
                    (time.thread_time() - cpu) / PASSES * 1e6,
                ]
            )

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return result[0], result[1]


def _with_main_thread(
    activity: str, measure: Callable[[], tuple[float, float]]
) -> tuple[float, float]:
    """Run ``measure`` in a thread while the main thread does ``activity``."""
    if activity == "sleeping":
        return measure()
    done: list[tuple[float, float]] = []
    runner = threading.Thread(target=lambda: done.append(measure()))
    if activity == "pure Python, no pause":
        runner.start()
        while runner.is_alive():
            sum(range(200))
        return done[0]

    async def idle_loop() -> None:  # wakes every 100 µs, does a little work, waits again
        runner.start()
        while runner.is_alive():
            await asyncio.sleep(0.0001)
            sum(range(200))

    asyncio.run(idle_loop())
    return done[0]


def main() -> int:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1000, 500), nn.ReLU(), nn.Linear(500, 10)).eval()
    module = torch.jit.script(mlp)
    x = torch.rand(ROWS, 1000)
    print(f"Seed MLP, batch {ROWS}, {PASSES} passes in a worker thread; µs per pass.\n")
    print("| main thread | switch interval | wall µs | worker CPU µs |")
    print("|---|---:|---:|---:|")
    default = sys.getswitchinterval()
    for interval in (default, 0.0005):
        sys.setswitchinterval(interval)
        for activity in ("sleeping", "an event loop, mostly waiting", "pure Python, no pause"):
            wall, cpu = _with_main_thread(activity, lambda: _measure(module, x))
            print(f"| {activity} | {interval * 1000:g} ms | {wall:,.0f} | {cpu:,.0f} |")
    sys.setswitchinterval(default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
