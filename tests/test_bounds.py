"""Tables that outside input could grow stay bounded, each by its own cap.

Unit tests, no daemon: through a real daemon these caps are out of reach
(the data plane already folds unknown model names into one bucket before the
metrics see them, a test machine has a handful of uids, and an unknown method
leaves no trace a caller could see), so each table is filled directly, past
its cap.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from edgeinferd.metrics import MAX_KEYS, UNKNOWN_MODEL, Metrics
from edgeinferd.peers import PeerTokens
from edgeinferd.protocol.boundary import ErrorBoundary


def test_metrics_keys_stop_at_their_cap_and_the_rest_share_one_bucket() -> None:
    metrics = Metrics()
    for index in range(MAX_KEYS + 100):
        metrics.record(f"model-{index}", "1", None, 0.001)
    assert len(metrics.models) == MAX_KEYS + 1  # the cap, and the one bucket for the rest
    assert sum(metrics.models[(UNKNOWN_MODEL, "")].requests.values()) == 100


def test_peer_tokens_stop_at_their_cap() -> None:
    tokens = PeerTokens(max_uids=3)
    issued = [tokens.issue(uid) for uid in range(5)]
    assert all(token is not None for token in issued[:3])
    assert issued[3:] == [None, None]
    assert tokens.issue(1) == issued[1]  # a known uid keeps its token
    assert len(tokens) == 3


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method


def test_the_error_boundary_remembers_no_unknown_method() -> None:
    """10,000 made-up method names (gRPC answers them UNIMPLEMENTED): none is kept."""
    boundary = ErrorBoundary()

    async def unknown(_: grpc.HandlerCallDetails) -> Any:
        return None

    async def main() -> None:
        for index in range(10_000):
            details: Any = _Details(f"/made.Up/Method{index}")
            assert await boundary.intercept_service(unknown, details) is None

    asyncio.run(main())
    assert boundary._wrapped == {}
