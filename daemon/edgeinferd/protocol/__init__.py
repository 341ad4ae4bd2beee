"""Protocol adapters: convert protobuf to data-plane calls and back, nothing more.

Every gRPC service the daemon serves is registered here, over one data plane.
"""

from __future__ import annotations

import grpc

from edgeinfer.v1 import inference_pb2, inference_pb2_grpc
from edgeinferd.dataplane import DataPlane


def add_services(server: grpc.aio.Server, dataplane: DataPlane) -> list[str]:
    """Register every protocol's servicer; returns their full names (for reflection)."""
    from edgeinferd.protocol import kserve
    from edgeinferd.protocol.v1 import InferenceServicer

    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(dataplane), server)
    kserve.add_to_server(server, dataplane)
    return [
        inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
        kserve.SERVICE_NAME,
    ]
