"""The simplest fast server: KServe V2 over grpc.aio, the model run inline on the event loop.

The reference that the daemon's per-call costs are judged against: no validation,
no queue, no batching, no thread, no metrics; ``ModelInfer`` turns the raw input
bytes into a tensor, runs the TorchScript module on the loop, and answers. It
serves one batched float32 model, enough for ``perf_analyzer`` (which asks for
the model's metadata and config first) and for ``load_bench.py``.

    python benchmarks/inline_server.py --unix /tmp/inline.sock --model mlp \\
        --artifact repo/mlp/1/model.pt --input x:1000 --output y:10 --max-batch-size 32
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import numpy as np
import torch

from edgeinfer.kserve.v2 import grpc_service_pb2 as pb
from edgeinfer.kserve.v2 import grpc_service_pb2_grpc, model_config_pb2


class Inline(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, args: argparse.Namespace) -> None:
        torch.set_num_threads(1)
        self.module = torch.jit.load(args.artifact)
        self.module.eval()
        self.model = args.model
        self.input, width = args.input.split(":")
        self.output, out_width = args.output.split(":")
        self.width, self.out_width = int(width), int(out_width)
        self.max_batch_size = args.max_batch_size

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="inline", version="1")

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == self.model)

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.model,
            versions=["1"],
            platform="pytorch_libtorch",
            inputs=[tensor(name=self.input, datatype="FP32", shape=[-1, self.width])],
            outputs=[tensor(name=self.output, datatype="FP32", shape=[-1, self.out_width])],
        )

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        fp32 = model_config_pb2.TYPE_FP32
        return pb.ModelConfigResponse(
            config=model_config_pb2.ModelConfig(
                name=self.model,
                platform="pytorch_libtorch",
                max_batch_size=self.max_batch_size,
                input=[
                    model_config_pb2.ModelInput(name=self.input, data_type=fp32, dims=[self.width])
                ],
                output=[
                    model_config_pb2.ModelOutput(
                        name=self.output, data_type=fp32, dims=[self.out_width]
                    )
                ],
            )
        )

    def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        rows = request.inputs[0].shape[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(rows, self.width)
        with torch.inference_mode():
            y = self.module(torch.from_numpy(x)).numpy()
        response = pb.ModelInferResponse(model_name=self.model, model_version="1", id=request.id)
        response.outputs.add(name=self.output, datatype="FP32", shape=list(y.shape))
        response.raw_output_contents.append(y.tobytes())
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        return self._infer(request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=self._infer(request))


async def serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)]
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Inline(args), server)
    server.add_insecure_port(f"unix:{args.unix}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unix", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--artifact", required=True, help="a TorchScript file")
    parser.add_argument("--input", required=True, help="name:width (float32)")
    parser.add_argument("--output", required=True, help="name:width (float32)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
