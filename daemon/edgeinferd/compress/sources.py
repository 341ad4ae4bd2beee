"""Turning a recipe's ``module:function`` entry points and .npz files into models and data.

Entry-point modules are imported with the recipe's folder first on ``sys.path``, so an
example ships its model code next to its recipe without being installed.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeinferd.compress.recipe import DataSource, ModelSource, RecipeError


@dataclass(frozen=True)
class Split:
    """Features and integer class labels of one data split, as tensors."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def head(self, count: int) -> Split:
        return Split(self.x[:count], self.y[:count])


@dataclass(frozen=True)
class Data:
    """The splits a pipeline needs; calibration defaults to the start of the training split."""

    train: Split
    test: Split
    calibration: Split | None = None

    def calibration_set(self, count: int) -> Split:
        return (self.calibration or self.train).head(count)


def resolve_entry(entry: str, folder: Path) -> Callable[..., Any]:
    """Import ``module:function``, looking in ``folder`` first."""
    module_name, _, function_name = entry.partition(":")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise AttributeError(f"{entry}: {module_name} has no callable {function_name!r}")
    return function  # type: ignore[no-any-return]


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """Load a TorchScript file; the deprecation warning is for TorchScript as a whole, which is
    still the only container for eager int8 models (see docs/compression.md)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")
        return loaded


def build_model(source: ModelSource, folder: Path, file: str, field: str) -> nn.Module:
    """Build (and maybe load weights into) a model, naming the recipe field on failure."""
    if source.artifact is not None:
        return load_torchscript(source.artifact)
    assert source.entry is not None
    try:
        model = resolve_entry(source.entry, folder)()
    except (ImportError, AttributeError) as error:
        raise RecipeError(file, f"{field}.entry", str(error)) from error
    if not isinstance(model, nn.Module):
        raise RecipeError(file, f"{field}.entry", f"returned {type(model).__name__}, not a Module")
    if source.weights is not None:
        state = torch.load(source.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model


def _split(value: Any, where: str) -> Split:
    if isinstance(value, Mapping):
        x, y = value["x"], value["y"]
    else:
        x, y = value
    x_tensor = torch.as_tensor(np.asarray(x))
    if x_tensor.is_floating_point():
        x_tensor = x_tensor.float()  # models are trained and served in float32
    y_tensor = torch.as_tensor(np.asarray(y)).long()
    if x_tensor.shape[0] != y_tensor.shape[0] or y_tensor.ndim != 1:
        raise ValueError(f"{where}: x has {x_tensor.shape[0]} rows, y has shape {y_tensor.shape}")
    return Split(x_tensor, y_tensor)


def load_data(source: DataSource, folder: Path, file: str) -> Data:
    """Load the splits: an entry point returns ``{"train": (x, y), "test": (x, y)}`` (and
    optionally ``"calibration"``); .npz files hold arrays ``x`` and ``y``."""
    splits: dict[str, Split] = {}
    if source.entry is not None:
        try:
            result = resolve_entry(source.entry, folder)()
        except (ImportError, AttributeError) as error:
            raise RecipeError(file, "data.entry", str(error)) from error
        if not isinstance(result, Mapping) or not {"train", "test"} <= result.keys():
            raise RecipeError(file, "data.entry", "must return a mapping with 'train' and 'test'")
        for name in ("train", "test", "calibration"):
            if name in result:
                splits[name] = _split(result[name], f"{source.entry}[{name!r}]")
    for name, path in source.files.items():
        with np.load(path, allow_pickle=False) as arrays:
            splits[name] = _split({"x": arrays["x"], "y": arrays["y"]}, str(path))
    return Data(splits["train"], splits["test"], splits.get("calibration"))
