"""Requests whose bytes are not a valid protobuf message are the caller's mistake.

grpc.aio turns an exception from a request deserializer into UNKNOWN. This
interceptor makes every service's deserializer hand back a marker instead, and
answers the marker with the status the one table gives ``InvalidInput``
(INVALID_ARGUMENT): bad wire bytes, truncated messages, invalid UTF-8 in a
string field. On a stream, the messages before the bad one are still answered.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from edgeinferd.errors import InvalidInput
from edgeinferd.protocol.status import abort_with

Context = Any  # grpc.aio.ServicerContext; the stubs type handlers for the sync server


class MalformedMessage(InvalidInput):
    """The request bytes do not parse as the method's message type."""


class _Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: MalformedMessage) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            reason = str(error).strip() or "cannot parse"
            return _Undecodable(MalformedMessage(f"the request is not a valid message: {reason}"))

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.error
        yield request


def _wrap(handler: Any) -> Any:
    """The same handler, with the tolerant deserializer and a check before the servicer."""
    deserialize = _tolerant(handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            if isinstance(request, _Undecodable):
                await abort_with(context, request.error)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
    if handler.unary_stream is not None:
        unary_in = handler.unary_stream

        if inspect.iscoroutinefunction(unary_in):  # writes with context.write

            async def unary_writer(request: Any, context: Context) -> None:
                if isinstance(request, _Undecodable):
                    await abort_with(context, request.error)
                await unary_in(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_writer, deserialize, serialize)

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await abort_with(context, request.error)
            async for answer in unary_in(request, context):
                yield answer

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
    if handler.stream_unary is not None:
        stream_in = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
            try:
                return await stream_in(_checked(requests), context)
            except MalformedMessage as error:
                await abort_with(context, error)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
    streaming = handler.stream_stream

    if inspect.iscoroutinefunction(streaming):  # writes with context.write

        async def stream_writer(requests: AsyncIterator[Any], context: Context) -> None:
            try:
                await streaming(_checked(requests), context)
            except MalformedMessage as error:
                await abort_with(context, error)

        return grpc.stream_stream_rpc_method_handler(stream_writer, deserialize, serialize)

    async def stream_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        try:
            async for answer in streaming(_checked(requests), context):
                yield answer
        except MalformedMessage as error:
            await abort_with(context, error)

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)


class RefuseMalformed(grpc.aio.ServerInterceptor):
    """Answer undecodable requests with INVALID_ARGUMENT instead of UNKNOWN."""

    def __init__(self) -> None:
        #: Wrapped once per method: the per-call cost is a dict lookup.
        self._wrapped: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        try:
            wrapped = self._wrapped[method]
        except KeyError:
            handler = await continuation(handler_call_details)
            wrapped = None if handler is None else _wrap(handler)
            if handler is not None:  # unknown methods are not remembered (callers choose them)
                self._wrapped[method] = wrapped
        return wrapped
