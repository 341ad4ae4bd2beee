"""Requests whose bytes are not a valid protobuf message are the caller's mistake.

grpc.aio turns an exception from a request deserializer into UNKNOWN. The
error boundary (``edgeinferd.protocol.boundary``) makes every service's
deserializer the tolerant one here, which hands back a marker instead; the
boundary answers it with the status the one table gives ``InvalidInput``
(INVALID_ARGUMENT): bad wire bytes, truncated messages, invalid UTF-8 in a
string field. On a stream, the messages before the bad one are still answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.message import DecodeError

from edgeinferd.errors import InvalidInput


class MalformedMessage(InvalidInput):
    """The request bytes do not parse as the method's message type."""


class Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: MalformedMessage) -> None:
        self.error = error


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            reason = str(error).strip() or "cannot parse"
            return Undecodable(MalformedMessage(f"the request is not a valid message: {reason}"))

    return deserialize


async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The stream's messages; raises MalformedMessage at the first undecodable one."""
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error
        yield request
