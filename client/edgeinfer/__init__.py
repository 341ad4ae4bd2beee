"""edgeinfer: a small client for the edgeinferd inference daemon.

Imports grpcio, protobuf and numpy only; never torch. The clients (and so
grpcio) are imported on first use of a name below: ``edgeinfer.tensors``
alone needs only protobuf and numpy, which keeps the daemon's data plane,
which shares it, free of any transport.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeinfer.client import (
        AsyncClient,
        ChatMessage,
        Client,
        EdgeInferError,
        GenerateChunk,
        GenerateResult,
        GenerateSummary,
        ModelInfo,
        StreamResult,
    )

__version__ = "0.1.0"
__all__ = [
    "AsyncClient",
    "ChatMessage",
    "Client",
    "EdgeInferError",
    "GenerateChunk",
    "GenerateResult",
    "GenerateSummary",
    "ModelInfo",
    "StreamResult",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("edgeinfer.client"), name)
    if name in ("client", "shm", "bench", "cli", "tensors", "v1", "kserve"):
        return importlib.import_module(f"edgeinfer.{name}")
    raise AttributeError(f"module 'edgeinfer' has no attribute {name!r}")
