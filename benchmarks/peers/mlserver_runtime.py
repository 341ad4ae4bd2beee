"""MLServer custom runtime for load_bench.py: the seed TorchScript MLP, one torch thread.

Loaded by MLServer in its own process (``parallel_workers = 0``), from the model settings
that load_bench.py writes (``"implementation": "mlserver_runtime.TorchScriptMLP"``, with
this folder on ``PYTHONPATH``; ``parameters.uri`` is the same ``model.pt`` the daemon
serves). One input tensor ``[rows, 1000]`` float32 in, one ``y`` ``[rows, 10]`` out.
"""

from __future__ import annotations

import numpy as np
import torch
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import get_model_uri


class TorchScriptMLP(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        torch.set_num_threads(1)
        uri = await get_model_uri(self._settings)
        self._module = torch.jit.load(uri)
        self._module.eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        tensor = payload.inputs[0]
        # MLServer has already turned raw_input_contents into a Python list of floats
        # (mlserver/raw.py); numpy from that list is the cheapest way back.
        data = getattr(tensor.data, "root", tensor.data)
        x = np.asarray(data, dtype=np.float32).reshape(tensor.shape)
        with torch.inference_mode():
            y = self._module(torch.from_numpy(x)).numpy()
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                ResponseOutput(
                    name="y", datatype="FP32", shape=list(y.shape), data=y.ravel().tolist()
                )
            ],
        )
