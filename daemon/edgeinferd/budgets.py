"""Byte budgets shared by the streams of one connection.

Each stream already bounds the request bytes it holds (``STREAM_PIPELINE_BYTES``
in ``protocol.streams``), but a caller that opens many streams on one
connection and never reads their answers could pin that much per stream. The
streams of one connection therefore also share one budget: a stream reads its
next message only while its connection holds less than the budget.

A connection is known by the peer address gRPC reports (``ipv4:1.2.3.4:5678``
names one TCP connection). On the Unix socket gRPC Python reports ``unix:`` for
every connection, which names none, so Unix-socket streams are bounded per
stream only; sharing one budget among all local callers would let one stalled
caller stall the others.

The bookkeeping is one entry per connection with a live stream, removed when
its last stream ends, so it grows with the streams open now, never with what
callers sent before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

__all__ = ["CONNECTION_STREAM_BYTES", "ByteBudget", "ConnectionBudgets", "connection_of"]

#: Request bytes the streams of one connection hold at once (two streams' worth).
CONNECTION_STREAM_BYTES = 32 << 20


def connection_of(peer: str) -> str | None:
    """The key of the connection a call came on, or None where the peer names none."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer
    return None


class ByteBudget:
    """Bytes held by one connection's streams, and the streams waiting for room.

    Taking never waits (the message is already read and must be counted);
    a stream waits for room before it reads the next one. So a connection holds
    at most its limit plus the one message each of its streams read while
    there was room.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        #: Streams of this connection that are open now.
        self.streams = 0
        self._waiters: list[asyncio.Future[None]] = []

    def has_room(self) -> bool:
        return self.held < self.limit

    def take(self, nbytes: int) -> None:
        self.held += nbytes

    def release(self, nbytes: int) -> None:
        self.held -= nbytes
        if self.has_room():
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_for_room(self) -> None:
        while not self.has_room():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)


class ConnectionBudgets:
    """One ``ByteBudget`` per connection with a live stream."""

    def __init__(self, limit: int = CONNECTION_STREAM_BYTES) -> None:
        self.limit = limit
        self._budgets: dict[str, ByteBudget] = {}

    @contextlib.contextmanager
    def stream(self, connection: str | None) -> Iterator[ByteBudget | None]:
        """The budget a stream on ``connection`` shares (None: no shared budget) while open."""
        if connection is None:
            yield None
            return
        budget = self._budgets.get(connection)
        if budget is None:
            budget = self._budgets[connection] = ByteBudget(self.limit)
        budget.streams += 1
        try:
            yield budget
        finally:
            budget.streams -= 1
            if budget.streams == 0:
                del self._budgets[connection]

    @property
    def connections(self) -> int:
        """Connections with a stream open now (entries kept)."""
        return len(self._budgets)

    @property
    def held(self) -> int:
        """Request bytes held by the streams of every connection."""
        return sum(budget.held for budget in list(self._budgets.values()))

    @property
    def most_held(self) -> int:
        """Request bytes held by the streams of the connection that holds the most."""
        return max((budget.held for budget in list(self._budgets.values())), default=0)
