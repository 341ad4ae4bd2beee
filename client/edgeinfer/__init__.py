"""edgeinfer: a small client for the edgeinferd inference daemon.

Imports grpcio, protobuf and numpy only; never torch.
"""

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
