"""Measuring a stage: what it costs (parameters, bytes on disk, latency) and what it keeps
(held-out accuracy).

Everything is measured on the serialized artifact, loaded back, because that is what the
daemon will run: a number taken from the eager module could differ from the shipped one.
Latency uses one intra-op thread (``torch.set_num_threads(1)``) for every stage, so
the comparison is between models, not between how well each one happens to parallelise;
the daemon's default ``[instances] threads = 1`` matches it.
"""

from __future__ import annotations

import io
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeinferd.compress import quantize
from edgeinferd.compress.progress import Progress
from edgeinferd.compress.sources import Split, load_torchscript


@dataclass(frozen=True)
class Measurement:
    """One stage's figures. Latencies are medians in microseconds."""

    parameters: int
    size_bytes: int
    sparsity: float
    layer_sparsity: dict[str, float]
    accuracy: float
    latency_b1_us: float
    latency_b32_us: float


def count_parameters(model: nn.Module) -> int:
    """Weights and biases of every layer, int8 ones included (they are not nn.Parameters)."""
    counted = 0
    layers = quantize.layer_weights(model)
    for weight, bias in layers.values():
        counted += weight.numel() + (bias.numel() if bias is not None else 0)
    seen = {f"{name}.{p}" for name in layers for p in ("weight", "bias")}
    for name, parameter in model.named_parameters():
        clean = name.replace("_orig", "")
        if clean not in seen:
            counted += parameter.numel()
    return counted


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights in each Linear/Conv layer (masks applied)."""
    return {
        name: float((weight == 0).float().mean())
        for name, (weight, _) in quantize.layer_weights(model).items()
    }


def total_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over all Linear/Conv layers."""
    zeros = total = 0
    for weight, _ in quantize.layer_weights(model).values():
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Logits for all of ``x``, in batches the size the daemon serves (max_batch_size 32).

    Dynamic int8 quantizes activations with each batch's own range, so its answers depend
    on how rows are batched: evaluating in the daemon's batch size keeps the reported
    accuracy equal to what callers get.
    """
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def accuracy(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy on ``split``."""
    return float((predict(model, split.x.float()).argmax(dim=1) == split.y).float().mean())


@torch.no_grad()
def latency_us(model: nn.Module, example: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward pass, after warm-up, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(max(3, repeats // 10)):
            model(example)
        times = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            model(example)
            times.append(time.perf_counter_ns() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times) / 1000.0


def load_artifact_bytes(artifact: bytes) -> nn.Module:
    """Load a serialized TorchScript artifact from memory."""
    with quantize.quiet():
        loaded: nn.Module = torch.jit.load(io.BytesIO(artifact), map_location="cpu")
        return loaded


def measure(
    eager: nn.Module,
    artifact: bytes,
    test: Split,
    repeats: int,
    *,
    label: str = "evaluate",
    show_progress: bool = True,
) -> Measurement:
    """All figures for one stage; accuracy and latency come from the loaded artifact."""
    loaded = load_artifact_bytes(artifact)
    loaded.eval()
    x = test.x.float()
    batch32 = x[torch.arange(32) % x.shape[0]]  # the first 32 rows, repeated if fewer
    with Progress(label, 3, enabled=show_progress) as progress:
        acc = accuracy(loaded, test)
        progress.advance(note="accuracy")
        b1 = latency_us(loaded, x[:1], repeats * 4)
        progress.advance(note="latency batch 1")
        b32 = latency_us(loaded, batch32, repeats)
        progress.advance(note="latency batch 32")
    per_layer = layer_sparsity(eager)
    return Measurement(
        parameters=count_parameters(eager),
        size_bytes=len(artifact),
        sparsity=total_sparsity(eager),
        layer_sparsity=per_layer,
        accuracy=acc,
        latency_b1_us=b1,
        latency_b32_us=b32,
    )


def evaluate_artifact(path: Path | str, test: Split | None = None) -> float:
    """Held-out accuracy of a written artifact, as offline evaluation sees it.

    ``path`` is the artifact file or its version folder. Without ``test``, the data comes
    from the recipe recorded in the version's manifest.json, so the daemon's answers can be
    checked against the same figure the report shows.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    manifest = json.loads((folder / "manifest.json").read_text())
    artifact = folder / manifest["artifact"]
    if test is None:
        from edgeinferd.compress.recipe import parse_recipe
        from edgeinferd.compress.sources import load_data

        recipe = parse_recipe(manifest["recipe"], Path(manifest["recipe_file"]))
        test = load_data(recipe.data, recipe.folder, str(recipe.path)).test
    if manifest["format"] == "exported_program":
        model: nn.Module = torch.export.load(str(artifact)).module()
    else:
        model = load_torchscript(artifact)
    model.eval()
    return accuracy(model, test)
