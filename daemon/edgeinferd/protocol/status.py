"""The one table from data-plane errors to gRPC status codes.

Client mistakes map to precise codes; anything unexpected becomes INTERNAL
with the request id, logged with its traceback, never shown to the caller.
"""

from __future__ import annotations

import secrets
from typing import Any, Never

import grpc
import structlog

from edgeinferd import errors

log = structlog.get_logger("edgeinferd.protocol")

#: ``errors.STATUS_NAMES`` (the one table) with the names turned into gRPC codes.
GRPC_CODES: dict[type[Exception], grpc.StatusCode] = {
    kind: grpc.StatusCode[name] for kind, name in errors.STATUS_NAMES.items()
}


#: Longest caller-facing message, in characters. Messages quote what the caller
#: sent (names, versions); the status travels in a trailer that gRPC percent-encodes
#: (up to 12 bytes a character) and clients refuse beyond 8 KiB of metadata, so an
#: unbounded echo would turn the answer into RESOURCE_EXHAUSTED on the caller's side.
MAX_MESSAGE_CHARS = 480


def status_for(error: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for an exception."""
    for kind in type(error).__mro__:
        code = GRPC_CODES.get(kind)
        if code is not None:
            message = str(error)
            if len(message) > MAX_MESSAGE_CHARS:
                message = message[: MAX_MESSAGE_CHARS - 3] + "..."
            return code, message
    # A call without an id of its own gets one, so that the caller's message and
    # the log's traceback can be matched.
    request_id = request_id or "edgeinferd-" + secrets.token_hex(6)
    log.error("unexpected error", request_id=request_id[:128], exc_info=error)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error (request id {request_id[:128]!r}); the daemon's log has the details",
    )


async def abort_with(context: Any, error: BaseException, request_id: str = "") -> Never:
    """End the call with the status the table gives ``error`` (``context.abort`` raises)."""
    await context.abort(*status_for(error, request_id))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
