"""Data-parallel training across processes started by ``torchrun`` (gloo, so CPUs suffice).

``torchrun`` describes the job in ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``/``MASTER_PORT``;
without them everything runs in one process and no process group is created. Every rank
runs the whole pipeline (steps after training must see the same weights everywhere), but
only rank 0 evaluates and writes.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(world_size, rank)``, joining the process group on first use under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return size, rank


def is_main() -> bool:
    """Whether this process is the one that evaluates and writes outputs."""
    return world()[1] == 0


def barrier() -> None:
    """Wait for every rank, so no rank exits while rank 0 still writes."""
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if one was joined, once every rank is ready to.

    Without the barrier a rank could tear gloo down while its peer still
    talks to it, and the peer's gloo thread aborts the process (std::terminate,
    SIGABRT): seen in about 1 of 8 two-rank runs on a 2-core machine.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
