"""Models and data for the digits compression example (scikit-learn's 8x8 digits).

The recipe refers to these as ``digits_models:teacher`` etc.; the compression tool puts
the recipe's folder first on ``sys.path``, so this file needs no installing.
"""

from __future__ import annotations

import itertools

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

FEATURES = 64
CLASSES = 10
SEED = 0


def _mlp(widths: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def teacher() -> nn.Sequential:
    """A wide MLP (about 1.1 M parameters): accurate, and big enough that compressing it
    matters on an edge CPU."""
    return _mlp([FEATURES, 1024, 1024, CLASSES], dropout=0.2)


def student() -> nn.Sequential:
    """A narrow MLP (about 85 k parameters) that learns from the teacher."""
    return _mlp([FEATURES, 256, 256, CLASSES], dropout=0.1)


def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A fixed, stratified 75/25 split; pixels scaled from 0..16 to 0..1 (clients send the
    scaled values)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=SEED, stratify=y
    )
    return {"train": (x_train, y_train), "test": (x_test, y_test)}
