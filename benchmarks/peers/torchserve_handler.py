"""TorchServe handler for load_bench.py: the seed TorchScript MLP, one torch thread.

Archived by load_bench.py with ``torch-model-archiver --handler torchserve_handler.py
--serialized-file model.pt`` (the same ``model.pt`` the daemon serves). Each request's
body is little-endian float32 rows of 1000 (4000 bytes a row), as TorchServe's REST
``/predictions/<model>`` API and ``perf_analyzer --service-kind torchserve`` send it; the
answer is the rows of ``y`` as raw float32 bytes (40 bytes a row). The requests of a
batch that TorchServe formed (``batchSize`` > 1) run as one forward pass.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

WIDTH = 1000


class MLPHandler:
    def __init__(self) -> None:
        self.module: Any = None

    def initialize(self, context: Any) -> None:
        torch.set_num_threads(1)
        model_dir = context.system_properties.get("model_dir")
        serialized = context.manifest["model"]["serializedFile"]
        self.module = torch.jit.load(os.path.join(model_dir, serialized))
        self.module.eval()

    def handle(self, requests: list[dict[str, Any]]) -> list[bytes]:
        parts = []
        for request in requests:
            body = request.get("data")
            if body is None:
                body = request.get("body")
            parts.append(np.frombuffer(body, dtype=np.float32).reshape(-1, WIDTH))
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        with torch.inference_mode():
            y = self.module(torch.from_numpy(x)).numpy()
        answers, start = [], 0
        for part in parts:
            answers.append(y[start : start + len(part)].tobytes())
            start += len(part)
        return answers


_service = MLPHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[bytes] | None:
    if _service.module is None:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data)
