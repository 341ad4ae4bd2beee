"""Run the digits compression example and print its report; or compare int8 paths.

    python benchmarks/compress_example.py                 # the full example recipe
    python benchmarks/compress_example.py --int8-paths    # fp32 vs each int8 path

The second mode is the measurement behind the choice of quantization API recorded in
docs/compression.md: it trains the example's teacher and student architectures briefly,
then times each path on one thread. torchao is measured if it is importable; it is not a
dependency of edgeinfer.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "digits" / "recipe.toml"


def run_example(recipe: Path) -> int:
    """The whole recipe, as a user would run it; the CLI prints the report."""
    from edgeinferd.compress.cli import main

    started = time.monotonic()
    status = main([str(recipe)])
    print(f"example finished in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return status


def _paths(
    model: nn.Module, calibration: torch.Tensor, compile_torchao: bool
) -> dict[str, Callable[[], nn.Module]]:
    from edgeinferd.compress import quantize
    from edgeinferd.compress.evaluate import load_artifact_bytes
    from edgeinferd.compress.export import to_torchscript

    example = calibration[:2]

    def scripted(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        return lambda: load_artifact_bytes(to_torchscript(build(), example))

    def static(engine: str) -> Callable[[], nn.Module]:
        return scripted(lambda: quantize.quantize_static(model, calibration, engine))

    paths: dict[str, Callable[[], nn.Module]] = {
        "fp32 eager": lambda: model,
        "fp32 TorchScript": scripted(lambda: model),
        "eager int8 dynamic (x86), TorchScript": scripted(
            lambda: quantize.quantize_dynamic(model, "x86")
        ),
        "eager int8 static x86, TorchScript": static("x86"),
        "eager int8 static fbgemm, TorchScript": static("fbgemm"),
        "eager int8 static qnnpack, TorchScript": static("qnnpack"),
    }
    try:
        from torchao.quantization import (  # type: ignore[import-not-found]
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        print("torchao is not importable: skipping its paths", file=sys.stderr)
        return paths

    def torchao(config: object, compiled: bool) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            copied = copy.deepcopy(model)
            quantize_(copied, config)
            return torch.compile(copied) if compiled else copied  # type: ignore[return-value]

        return build

    paths["torchao int8 weight-only, eager"] = torchao(Int8WeightOnlyConfig(), False)
    paths["torchao int8 dyn-act/int8 weight, eager"] = torchao(
        Int8DynamicActivationInt8WeightConfig(), False
    )
    if compile_torchao:
        paths["torchao int8 dyn-act/int8 weight, torch.compile"] = torchao(
            Int8DynamicActivationInt8WeightConfig(), True
        )
        paths["fp32, torch.compile"] = lambda: torch.compile(copy.deepcopy(model))  # type: ignore[return-value]
    return paths


def compare_int8_paths(compile_torchao: bool, repeats: int) -> None:
    """Time fp32 and every int8 path on the example's architectures, one thread each."""
    from edgeinferd.compress.distill import train
    from edgeinferd.compress.evaluate import accuracy, latency_us
    from edgeinferd.compress.recipe import Training
    from edgeinferd.compress.sources import Split, resolve_entry

    folder = RECIPE.parent
    data = resolve_entry("digits_models:data", folder)()
    train_split = Split(torch.from_numpy(data["train"][0]), torch.from_numpy(data["train"][1]))
    test = Split(torch.from_numpy(data["test"][0]), torch.from_numpy(data["test"][1]))
    print(f"torch {torch.__version__}, one intra-op thread, median of {repeats} calls\n")
    print("| model | path | accuracy | batch 1 (µs) | batch 32 (µs) |")
    print("|---|---|---:|---:|---:|")
    for name in ("teacher", "student"):
        torch.manual_seed(0)
        model = resolve_entry(f"digits_models:{name}", folder)()
        train(model, train_split, Training(epochs=10, lr=2e-3), show_progress=False)
        model.eval()
        for label, build in _paths(model, train_split.x[:512], compile_torchao).items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                candidate = build()
                b1 = latency_us(candidate, test.x[:1], repeats * 4)
                b32 = latency_us(candidate, test.x[:32], repeats)
                acc = accuracy(candidate, test)
            print(f"| {name} | {label} | {100 * acc:.2f}% | {b1:.0f} | {b32:.0f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--int8-paths", action="store_true", help="compare quantization paths")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile paths")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    if args.int8_paths:
        compare_int8_paths(args.compile, args.repeats)
        return 0
    return run_example(args.recipe)


if __name__ == "__main__":
    raise SystemExit(main())
