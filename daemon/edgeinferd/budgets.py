"""Byte budgets shared by streams: those of one TCP connection, and all local ones.

Each stream already bounds the request bytes it holds (``STREAM_PIPELINE_BYTES``
in ``protocol.streams``), but a caller that opens many streams and never reads
their answers could pin that much per stream, without end. So streams also
share a budget: a stream reads its next message only while its budget holds
less than its limit, or while the stream itself holds nothing there. That
exception keeps every stream moving, one message at a time, when others have
filled the budget and stopped reading their answers.

A TCP connection is known by the peer address gRPC reports
(``ipv4:1.2.3.4:5678`` names one connection), and its streams share one budget.
On the Unix socket gRPC Python reports ``unix:`` for every connection, which
names none, so every Unix-socket stream shares the one local budget
(``LOCAL_STREAM_BYTES``): what all local callers' streams hold together is
bounded, and a caller that stalls its streams costs the others their read-ahead,
never their progress.

The bookkeeping is one entry per budget with a live stream, removed when its
last stream ends, so it grows with the streams open now, never with what
callers sent before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

__all__ = [
    "CONNECTION_STREAM_BYTES",
    "LOCAL",
    "LOCAL_STREAM_BYTES",
    "ByteBudget",
    "ConnectionBudgets",
    "connection_of",
]

#: Request bytes the streams of one TCP connection hold at once (two streams' worth).
CONNECTION_STREAM_BYTES = 32 << 20
#: Request bytes all streams whose connection has no name (the Unix socket's) hold at once.
LOCAL_STREAM_BYTES = 64 << 20
#: The key of the budget shared by every stream whose peer names no connection.
LOCAL = "local"


def connection_of(peer: str) -> str:
    """The key of the budget a call's streams share: its TCP connection, or ``LOCAL``."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer
    return LOCAL


class ByteBudget:
    """Bytes held by the streams sharing a budget, and the streams waiting for room.

    Taking never waits (the message is already read and must be counted);
    a stream waits for room before it reads the next one, unless it holds
    nothing itself. So the streams hold at most the limit plus one message each.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        #: Streams sharing this budget that are open now.
        self.streams = 0
        #: The waiting streams, each under the key it waits with.
        self._waiters: dict[object, asyncio.Future[None]] = {}

    def has_room(self) -> bool:
        return self.held < self.limit

    def take(self, nbytes: int) -> None:
        self.held += nbytes

    def release(self, nbytes: int, owner: object = None) -> None:
        """Give back bytes ``owner`` held. With room again, every waiting stream looks;
        otherwise only ``owner``'s own reader does (it may now hold nothing), so a release
        costs one wake-up however many streams wait."""
        self.held -= nbytes
        if self.has_room():
            waiters, self._waiters = self._waiters, {}
        else:
            waiter = self._waiters.pop(owner, None)
            waiters = {} if waiter is None else {owner: waiter}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for_room(self, owner: object, holds_nothing: Callable[[], bool]) -> None:
        """Return once there is room, or once ``owner`` (the waiting stream) holds nothing."""
        while not (self.has_room() or holds_nothing()):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[owner] = waiter
            try:
                await waiter
            finally:
                if self._waiters.get(owner) is waiter:
                    del self._waiters[owner]


class ConnectionBudgets:
    """One ``ByteBudget`` per TCP connection with a live stream, and the local one."""

    def __init__(
        self, limit: int = CONNECTION_STREAM_BYTES, local_limit: int = LOCAL_STREAM_BYTES
    ) -> None:
        self.limit = limit
        self.local_limit = local_limit
        self._budgets: dict[str, ByteBudget] = {}

    @contextlib.contextmanager
    def stream(self, connection: str) -> Iterator[ByteBudget]:
        """The budget a stream on ``connection`` (``connection_of``) shares while open."""
        budget = self._budgets.get(connection)
        if budget is None:
            limit = self.local_limit if connection == LOCAL else self.limit
            budget = self._budgets[connection] = ByteBudget(limit)
        budget.streams += 1
        try:
            yield budget
        finally:
            budget.streams -= 1
            if budget.streams == 0:
                del self._budgets[connection]

    @property
    def connections(self) -> int:
        """Budgets with a stream open now (entries kept; the local one counts as one)."""
        return len(self._budgets)

    @property
    def held(self) -> int:
        """Request bytes held by every stream."""
        return sum(budget.held for budget in list(self._budgets.values()))

    @property
    def most_held(self) -> int:
        """Request bytes held by the streams of the budget that holds the most."""
        return max((budget.held for budget in list(self._budgets.values())), default=0)

    @property
    def local_held(self) -> int:
        """Request bytes held by the streams of the local budget (the Unix socket's)."""
        local = self._budgets.get(LOCAL)
        return 0 if local is None else local.held
