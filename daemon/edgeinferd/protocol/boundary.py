"""The one error boundary: every handler of every service raises, this answers.

A server interceptor wraps each method's handler once. Whatever a handler
raises is turned into a status by the one table (``protocol.status``): typed
errors get their precise code and message, anything else becomes INTERNAL
with a request id, logged with its traceback, never UNKNOWN and never a
traceback to the caller. Requests whose bytes do not parse reach handlers as
a marker (``protocol.malformed``) and are answered INVALID_ARGUMENT here too.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from edgeinferd.protocol.malformed import Undecodable, checked, tolerant
from edgeinferd.protocol.status import abort_with

Context = Any  # grpc.aio.ServicerContext; the stubs type handlers for the sync server


def _request_id(request: Any) -> str:
    """The caller's id for the call when its message has one (Predict, ModelInfer)."""
    value = getattr(request, "id", "")
    return value if isinstance(value, str) else ""


def _wrap(handler: Any) -> Any:
    """The same handler, with the tolerant deserializer and the boundary around it."""
    deserialize = tolerant(handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            try:
                if isinstance(request, Undecodable):
                    raise request.error
                return await unary(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await abort_with(context, error, _request_id(request))

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
    if handler.unary_stream is not None:
        unary_in = handler.unary_stream

        if inspect.iscoroutinefunction(unary_in):  # writes with context.write

            async def unary_writer(request: Any, context: Context) -> None:
                try:
                    if isinstance(request, Undecodable):
                        raise request.error
                    await unary_in(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await abort_with(context, error, _request_id(request))

            return grpc.unary_stream_rpc_method_handler(unary_writer, deserialize, serialize)

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                if isinstance(request, Undecodable):
                    raise request.error
                async for answer in unary_in(request, context):
                    yield answer
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await abort_with(context, error, _request_id(request))

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
    if handler.stream_unary is not None:
        stream_in = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
            try:
                return await stream_in(checked(requests), context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await abort_with(context, error)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
    streaming = handler.stream_stream

    if inspect.iscoroutinefunction(streaming):  # writes with context.write

        async def stream_writer(requests: AsyncIterator[Any], context: Context) -> None:
            try:
                await streaming(checked(requests), context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await abort_with(context, error)

        return grpc.stream_stream_rpc_method_handler(stream_writer, deserialize, serialize)

    async def stream_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        try:
            async for answer in streaming(checked(requests), context):
                yield answer
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await abort_with(context, error)

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)


class ErrorBoundary(grpc.aio.ServerInterceptor):
    """Map every handler's exceptions to a status in one place, bad bytes included."""

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
