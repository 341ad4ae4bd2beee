"""Start MLServer so that perf_analyzer can drive it over a Unix socket.

    MLSERVER_PA_UNIX=/tmp/mlserver.sock python mlserver_launch.py start <folder>

The arguments are ``mlserver``'s own (this calls ``mlserver.cli.main``). Before that, in
this process only, it wraps ``mlserver.grpc.server.GRPCServer._create_server`` to add two
things to the gRPC server MLServer builds; nothing in the installed package is changed,
and an ``mlserver start`` run elsewhere is not affected:

1. A handler for ``/inference.GRPCInferenceService/ModelConfig``. That RPC is a Triton
   extension of KServe V2 which MLServer 1.7.1 does not implement, and perf_analyzer asks
   for it before any load (it reads ``max_batch_size`` and the tensor shapes from it). The
   answer is built from the model's V2 metadata (each tensor's first, batch, dimension
   dropped) with ``max_batch_size = $MLSERVER_PA_MAX_BATCH`` (default 32). The protobuf is
   encoded by hand: importing tritonclient's ``*_pb2`` modules next to MLServer's own
   ``dataplane_pb2`` fails in one process (both define the ``inference`` package:
   "duplicate symbol 'inference.ServerLiveRequest'").
2. If ``$MLSERVER_PA_UNIX`` is set, a listening Unix socket at that path, beside the TCP
   port from settings.json: MLServer's settings only take a host and a port (and the host
   is shared with its REST server, which cannot be turned off), while the other servers
   of load_bench.py are all measured over a Unix socket.

Bidirectional streams stay MLServer's own: perf_analyzer's ``--streaming`` does not work
against it (its ``ModelStreamInfer`` differs from Triton's), so load_bench.py runs no
stream scenario on MLServer.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import grpc
from mlserver.cli import main
from mlserver.grpc import server as grpc_server

#: Triton model_config.proto DataType numbers.
DTYPES = {"UINT8": 2, "INT32": 8, "INT64": 9, "FP16": 10, "FP32": 11, "FP64": 12}
MAX_BATCH = int(os.environ.get("MLSERVER_PA_MAX_BATCH", "32"))


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 as protobuf encodes it (negative dims: ten bytes)
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _field(number: int, wire: int, payload: int | bytes) -> bytes:
    key = _varint((number << 3) | wire)
    if wire == 0:
        assert isinstance(payload, int)
        return key + _varint(payload)
    assert isinstance(payload, bytes)
    return key + _varint(len(payload)) + payload


def _tensor(tensor: Any, dims_field: int) -> bytes:
    """ModelInput (dims = 4) or ModelOutput (dims = 3): name = 1, data_type = 2."""
    dims = b"".join(_varint(d) for d in tensor.shape[1:])
    return (
        _field(1, 2, tensor.name.encode())
        + _field(2, 0, DTYPES[tensor.datatype])
        + _field(dims_field, 2, dims)
    )


def _parse_request(data: bytes) -> tuple[str, str]:
    """ModelConfigRequest: name = 1, version = 2 (both strings, lengths under 2**28)."""
    fields: dict[int, str] = {}
    i = 0
    while i < len(data):
        key = data[i]
        i += 1
        length = shift = 0
        while True:
            byte = data[i]
            i += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        fields[key >> 3] = data[i : i + length].decode()
        i += length
    return fields.get(1, ""), fields.get(2, "")


_create_server = grpc_server.GRPCServer._create_server


def _create_server_for_perf_analyzer(self: Any) -> Any:
    server = _create_server(self)
    data_plane = self._data_plane

    async def model_config(request: tuple[str, str], context: Any) -> bytes:
        name, version = request
        meta = await data_plane.model_metadata(name=name, version=version or None)
        config = (
            _field(1, 2, meta.name.encode())
            + _field(2, 2, (meta.platform or "").encode())
            + _field(4, 0, MAX_BATCH)
        )
        for tensor in meta.inputs or []:
            config += _field(5, 2, _tensor(tensor, 4))
        for tensor in meta.outputs or []:
            config += _field(6, 2, _tensor(tensor, 3))
        return _field(1, 2, config)  # ModelConfigResponse.config = 1

    rpc = grpc.unary_unary_rpc_method_handler(
        model_config, request_deserializer=_parse_request, response_serializer=None
    )
    service = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelConfig": rpc}
    )
    server.add_generic_rpc_handlers((service,))
    unix = os.environ.get("MLSERVER_PA_UNIX")
    if unix:
        server.add_insecure_port(f"unix:{unix}")
    return server


grpc_server.GRPCServer._create_server = _create_server_for_perf_analyzer

if __name__ == "__main__":
    sys.exit(main())
