"""Embedded mode runs the daemon's runtime in-process with the same checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeinferd.embedded import EmbeddedModel
from edgeinferd.errors import ConfigError, InvalidInput
from tests import models


def test_embedded_model_matches_torch(tmp_path: Path) -> None:
    """A model loaded in-process returns what the module computes."""
    module = models.add_mlp(tmp_path)
    model = EmbeddedModel.load(tmp_path, "mlp")
    x = np.random.default_rng(0).standard_normal((3, 16), dtype=np.float32)
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict({"x": x})["y"], expected, rtol=1e-5, atol=1e-6)


def test_embedded_model_validates_like_the_daemon(tmp_path: Path) -> None:
    """Wrong shapes raise InvalidInput with the daemon's message."""
    models.add_mlp(tmp_path)
    model = EmbeddedModel.load(tmp_path, "mlp")
    with pytest.raises(InvalidInput, match=r"\[2, 3\].*\[-1, 16\]"):
        model.predict({"x": np.zeros((2, 3), np.float32)})


def test_embedded_refuses_a_tampered_artifact(tmp_path: Path) -> None:
    """The manifest's SHA-256 is checked in-process too."""
    models.add_with_manifest(tmp_path, "m", tamper=True)
    with pytest.raises(ConfigError, match="does not match its manifest"):
        EmbeddedModel.load(tmp_path, "m")
