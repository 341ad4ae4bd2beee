"""Requests whose bytes are not a valid protobuf message are the caller's mistake.

grpc.aio turns an exception from a request deserializer into UNKNOWN. The
error boundary (``edgeinferd.protocol.boundary``) makes every service's
deserializer the tolerant one here, which hands back a marker instead; the
boundary answers it with the status the one table gives ``InvalidInput``
(INVALID_ARGUMENT): bad wire bytes, truncated messages, invalid UTF-8 in a
string field. So are requests with more protobuf fields than the daemon parses
(``protocol.wire``), refused before the parser runs on the event loop. On a
stream, the messages before the bad one are still answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.message import DecodeError

from edgeinferd.errors import InvalidInput
from edgeinferd.protocol.wire import WALK_ABOVE_BYTES, count_fields


class MalformedMessage(InvalidInput):
    """The request bytes do not parse as the method's message type."""


class TooManyFields(InvalidInput):
    """The request has more protobuf fields than the daemon parses."""


class Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: InvalidInput) -> None:
        self.error = error


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    # Generated deserializers are ``Message.FromString``, bound to the message class.
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def deserialize(data: bytes) -> Any:
        if descriptor is not None and len(data) > WALK_ABOVE_BYTES:
            refusal = count_fields(data, descriptor)
            if refusal is not None:
                return Undecodable(TooManyFields(str(refusal)))
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
