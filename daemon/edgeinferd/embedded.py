"""Embedded mode: the daemon's runtime in your own process, no gRPC.

For programs that would rather link the model in than call a daemon. The
model is read from a repository exactly as the daemon reads it (config
validation, manifest check, warm-up), and inputs are validated the same way.

    from edgeinferd.embedded import EmbeddedModel

    model = EmbeddedModel.load("/var/lib/edgeinfer/models", "digits")
    outputs = model.predict({"input": pixels})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeinferd.dataplane import select_outputs, validate_inputs
from edgeinferd.repository import ModelConfig, Repository
from edgeinferd.runtime import Runner, load_runner


class EmbeddedModel:
    """One model version, loaded and warmed up, called synchronously."""

    def __init__(self, config: ModelConfig, version: str, runner: Runner) -> None:
        self.config = config
        self.version = version
        self._runner = runner

    @classmethod
    def load(cls, repository: str | Path, name: str, version: str | None = None) -> EmbeddedModel:
        """Load ``name`` from ``repository``; raises ConfigError/ModelNotFound like the daemon."""
        repo = Repository(Path(repository))
        config = repo.read_config(name)
        files = repo.version_files(config, version)
        return cls(config, files.version, load_runner(config, files))

    def predict(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """Validate and run one call; raises InvalidInput with the daemon's messages."""
        arrays = validate_inputs(self.config, inputs)
        wanted = select_outputs(self.config, outputs)
        results = self._runner.run(arrays)
        names = self.config.output_names
        if wanted is None:
            return dict(zip(names, results, strict=True))
        return {names[i]: results[i] for i in wanted}
