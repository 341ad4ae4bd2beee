"""An empty edgeinfer.v1 server: the gRPC transport's limit, with no model behind it.

It speaks the same messages as edgeinferd for one model: ``GetModel`` describes
it (so ``edgeinfer bench`` can build its inputs), ``Predict`` accepts a
PredictRequest and answers a PredictResponse carrying an output tensor of the
size the model would return (zeros, built from cached bytes), and
``PredictStream`` does the same per message. Health answers SERVING.

    python benchmarks/echo_server.py --unix /tmp/echo.sock \\
        --model mlp --input x:float32:1000 --output y:float32:10 --max-batch-size 32

``--option grpc.so_reuseport=1`` (repeatable) passes server options through, to
compare transport settings; with ``--reuseport`` several echo processes can
share one TCP port; ``--noop-interceptor`` adds a server interceptor that does
nothing, to see what interception alone costs; ``--thread-hop`` sends each
unary call to a worker thread and back, doing nothing there, to see what
keeping work off the event loop costs by itself (the daemon's forward passes
run in such a thread).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import queue
import signal
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from edgeinfer.tensors import DTYPES_BY_NAME, NUMPY_DTYPES
from edgeinfer.v1 import health_pb2, inference_pb2, inference_pb2_grpc, tensor_pb2

_HEALTH = "/grpc.health.v1.Health/Check"


def _spec(text: str) -> tuple[str, str, tuple[int, ...]]:
    """``name:dtype:d1,d2`` (dims after the batch dimension; empty for a scalar row)."""
    name, dtype, dims = [*text.split(":"), ""][:3]
    if dtype not in DTYPES_BY_NAME:
        raise argparse.ArgumentTypeError(f"unknown dtype {dtype!r}")
    return name, dtype, tuple(int(d) for d in dims.split(",") if d)


class Echo(inference_pb2_grpc.InferenceServicer):  # type: ignore[misc]
    def __init__(
        self,
        model: str,
        inputs: list[tuple[str, str, tuple[int, ...]]],
        outputs: list[tuple[str, str, tuple[int, ...]]],
        max_batch_size: int,
        hop: ThreadHop | None = None,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.outputs = outputs
        self.max_batch_size = max_batch_size
        self._zeros: dict[tuple[int, int], bytes] = {}
        self._hop = hop

    def _output_tensors(self, rows: int) -> list[tensor_pb2.Tensor]:
        tensors = []
        for index, (name, dtype, dims) in enumerate(self.outputs):
            key = (index, rows)
            shape = ((rows,) if self.max_batch_size else ()) + dims
            data = self._zeros.get(key)
            if data is None:
                size = math.prod(shape) * NUMPY_DTYPES[DTYPES_BY_NAME[dtype]].itemsize
                data = self._zeros[key] = bytes(size)
            tensors.append(
                tensor_pb2.Tensor(name=name, dtype=DTYPES_BY_NAME[dtype], shape=shape, data=data)
            )
        return tensors

    def _respond(self, request: inference_pb2.PredictRequest) -> inference_pb2.PredictResponse:
        first = request.inputs[0] if request.inputs else None
        rows = first.shape[0] if first is not None and first.shape and self.max_batch_size else 1
        return inference_pb2.PredictResponse(
            model=request.model, version="1", id=request.id, outputs=self._output_tensors(rows)
        )

    async def Predict(
        self, request: inference_pb2.PredictRequest, context: Any
    ) -> inference_pb2.PredictResponse:
        if self._hop is not None:
            await self._hop.run()
        return self._respond(request)

    async def PredictStream(
        self, request_iterator: AsyncIterator[inference_pb2.PredictRequest], context: Any
    ) -> AsyncIterator[inference_pb2.PredictStreamResponse]:
        async for request in request_iterator:
            yield inference_pb2.PredictStreamResponse(
                id=request.id, response=self._respond(request)
            )

    async def GetModel(
        self, request: inference_pb2.GetModelRequest, context: Any
    ) -> inference_pb2.ModelInfo:
        if request.name != self.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        batch = (-1,) if self.max_batch_size else ()
        info = inference_pb2.ModelInfo(
            name=self.model,
            state=inference_pb2.READY,
            serving_version="1",
            max_batch_size=self.max_batch_size,
        )
        for specs, field in ((self.inputs, info.inputs), (self.outputs, info.outputs)):
            for name, dtype, dims in specs:
                field.add(name=name, dtype=DTYPES_BY_NAME[dtype], shape=batch + dims)
        return info


class ThreadHop:
    """To a worker thread and back, as the daemon hands a call to its forward-pass thread."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]
        self._jobs = queue.SimpleQueue()
        threading.Thread(target=self._serve, daemon=True).start()

    def run(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future))
        return future

    def _serve(self) -> None:
        while True:
            loop, future = self._jobs.get()
            loop.call_soon_threadsafe(future.set_result, None)


class NoopInterceptor(grpc.aio.ServerInterceptor):
    """Passes every call through unchanged: what any grpc.aio server interceptor costs."""

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        return await continuation(handler_call_details)


async def _health(request: health_pb2.HealthCheckRequest, context: Any) -> Any:
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def serve(args: argparse.Namespace) -> None:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.so_reuseport", 1 if args.reuseport else 0),
    ]
    for option in args.option:
        key, _, value = option.partition("=")
        options.append((key, int(value) if value.lstrip("-").isdigit() else value))
    interceptors = [NoopInterceptor()] if args.noop_interceptor else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    hop = ThreadHop() if args.thread_hop else None
    echo = Echo(args.model, args.input, args.output, args.max_batch_size, hop)
    inference_pb2_grpc.add_InferenceServicer_to_server(echo, server)
    health = grpc.unary_unary_rpc_method_handler(
        _health,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": health}),)
    )
    if args.unix:
        server.add_insecure_port(f"unix:{args.unix}")
    if args.tcp and server.add_insecure_port(args.tcp) == 0:
        raise SystemExit(f"echo_server: cannot listen on {args.tcp}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unix", help="Unix socket path")
    parser.add_argument("--tcp", help="HOST:PORT")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--input", type=_spec, action="append", required=True)
    parser.add_argument("--output", type=_spec, action="append", required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--reuseport", action="store_true", help="grpc.so_reuseport=1")
    parser.add_argument("--option", action="append", default=[], help="KEY=VALUE server option")
    parser.add_argument(
        "--noop-interceptor", action="store_true", help="a server interceptor that does nothing"
    )
    parser.add_argument(
        "--thread-hop", action="store_true", help="each unary call goes to a thread and back"
    )
    args = parser.parse_args(argv)
    if not (args.unix or args.tcp):
        parser.error("give --unix or --tcp")
    if args.unix:
        Path(args.unix).unlink(missing_ok=True)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
