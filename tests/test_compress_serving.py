"""The compression tool's artifacts load in the real daemon and serve what was measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeinferd.compress import evaluate_artifact
from tests.conftest import StartDaemon
from tests.test_compress_pipeline import one_thread, recipe  # noqa: F401 - fixtures


def test_compressed_models_serve_with_the_offline_accuracy(
    recipe: Path,  # noqa: F811 - the fixture
    start_daemon: StartDaemon,
) -> None:
    """Served through Predict, the int8 model and the teacher reach exactly the accuracy
    the offline evaluation reported, and GetModel shows the manifest's compression facts."""
    repo = recipe.parent / "repo"
    with np.load(recipe.parent / "test.npz") as test:
        x, y = test["x"], test["y"]
    daemon = start_daemon(repo)
    with daemon.client(timeout=60) as client:
        for model in ("tiny", "tiny-teacher"):
            info = client.get_model(model)
            assert info.state == "READY", info.reason
            (input_spec,), (output_spec,) = info.inputs, info.outputs
            version = repo / model / info.serving_version
            predicted = []
            for start in range(0, len(x), info.max_batch_size):
                batch = x[start : start + info.max_batch_size]
                logits = client.predict(model, {input_spec.name: batch})[output_spec.name]
                predicted.append(logits.argmax(axis=1))
            served = float((np.concatenate(predicted) == y).mean())
            assert abs(served - evaluate_artifact(version)) < 1e-6
            manifest = json.loads((version / "manifest.json").read_text())
            (shown,) = [v for v in info.versions if v.version == info.serving_version]
            assert shown.manifest["sha256"] == manifest["sha256"]
            assert shown.manifest["stage"] == manifest["stage"]
