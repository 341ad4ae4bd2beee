"""Runs a recipe: builds the teacher, applies the steps in order, measures every stage,
writes the artifacts and the report.

Each step takes the previous stage's model and returns a new one, so every stage stays
available for the report and for side-by-side export.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeinferd.compress import distributed, export, prune, quantize, report
from edgeinferd.compress.distill import distill, train
from edgeinferd.compress.evaluate import load_artifact_bytes, measure
from edgeinferd.compress.progress import Progress
from edgeinferd.compress.recipe import Recipe, Step
from edgeinferd.compress.sources import Data, build_model, load_data


@dataclass
class Stage:
    """A model after one step, with its serialized artifact and facts about the step."""

    name: str
    kind: str
    model: nn.Module
    artifact: bytes
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What a run produced (on rank 0; other ranks get an empty outcome)."""

    versions: dict[str, Path]
    report: dict[str, Any]
    markdown: str


def seed_everything(seed: int) -> None:
    """Fix every random source a recipe touches, so a rerun gives the same model."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def architecture(model: nn.Module) -> str:
    """Layer widths, e.g. ``64→256→256→10``, read from the weights (int8 ones too)."""
    shapes = [w.shape for w, _ in quantize.layer_weights(model).values()]
    if not shapes:
        return type(model).__name__
    return "→".join([str(shapes[0][1])] + [str(s[0]) for s in shapes])


def _run_step(
    step: Step,
    current: nn.Module,
    teacher: nn.Module,
    recipe: Recipe,
    data: Data,
    seed: int,
    show_progress: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    training = step.training
    guide = teacher if training.alpha > 0 else None
    label = f"{step.name} ({step.kind})"
    notes: dict[str, Any] = {}
    if step.kind == "distill":
        assert recipe.student is not None
        torch.manual_seed(seed)
        student = build_model(recipe.student, recipe.folder, str(recipe.path), "student")
        model = distill(
            teacher,
            student,
            data.train,
            training,
            seed=seed,
            label=label,
            show_progress=show_progress,
        )
        notes = {
            "temperature": training.temperature,
            "alpha": training.alpha,
            "epochs": training.epochs,
        }
    elif step.kind == "prune":
        model = prune.prune_unstructured(copy.deepcopy(current), step.amount, step.scope)
        train(
            model,
            data.train,
            training,
            teacher=guide,
            seed=seed,
            label=label,
            show_progress=show_progress,
        )
        model = prune.make_permanent(model)
        notes = {"scope": step.scope, "amount": step.amount, "finetune_epochs": training.epochs}
    elif step.kind == "prune_structured":
        model = prune.prune_structured(current, step.amount, step.norm)
        train(
            model,
            data.train,
            training,
            teacher=guide,
            seed=seed,
            label=label,
            show_progress=show_progress,
        )
        notes = {"amount": step.amount, "norm": step.norm, "finetune_epochs": training.epochs}
    elif step.kind == "quantize_dynamic":
        model = quantize.quantize_dynamic(current, step.engine)
        notes = {"api": quantize.API, "engine": torch.backends.quantized.engine}
    elif step.kind == "quantize_static":
        calibration = data.calibration_set(step.calibration_samples).x
        batches = -(-calibration.shape[0] // 64)
        with Progress(f"{label} calibration", batches, enabled=show_progress) as progress:
            model = quantize.quantize_static(
                current, calibration, step.engine, on_batch=progress.advance
            )
        notes = {
            "api": quantize.API,
            "engine": torch.backends.quantized.engine,
            "calibration_samples": int(calibration.shape[0]),
        }
    else:
        prepared = quantize.prepare_qat(current, step.engine)
        train(
            prepared,
            data.train,
            training,
            teacher=guide,
            seed=seed,
            label=label,
            show_progress=show_progress,
        )
        model = quantize.convert_qat(prepared)
        notes = {
            "api": quantize.API,
            "engine": torch.backends.quantized.engine,
            "epochs": training.epochs,
        }
    model.eval()
    notes["layers"] = architecture(model)
    return model, notes


def build_stages(recipe: Recipe, data: Data, *, show_progress: bool = True) -> list[Stage]:
    """Run the teacher and every step; every rank does this, in lockstep for training."""
    seed_everything(recipe.seed)
    example = data.test.x[:2]
    teacher = build_model(recipe.teacher, recipe.folder, str(recipe.path), "teacher")
    if recipe.teacher.train is not None:
        train(
            teacher,
            data.train,
            recipe.teacher.train,
            seed=recipe.seed,
            label="teacher (train)",
            show_progress=show_progress,
        )
    teacher.eval()
    notes = {"layers": architecture(teacher)}
    stages = [Stage("teacher", "teacher", teacher, export.to_torchscript(teacher, example), notes)]
    current = teacher
    for index, step in enumerate(recipe.steps):
        current, notes = _run_step(
            step, current, teacher, recipe, data, recipe.seed + index + 1, show_progress
        )
        stages.append(
            Stage(step.name, step.kind, current, export.to_torchscript(current, example), notes)
        )
    return stages


def _signature(recipe: Recipe, data: Data, artifact: bytes) -> tuple[list[Any], list[Any]]:
    """config.toml inputs/outputs, from the data and a trial forward pass of the artifact."""
    batched = recipe.output.max_batch_size > 0
    x = data.test.x[:2] if batched else data.test.x[0]
    with torch.no_grad():
        y = load_artifact_bytes(artifact)(x)
    if not isinstance(y, torch.Tensor):
        raise ValueError("the model must return one tensor (its logits)")
    return (
        [export.tensor_spec(recipe.output.input_name, x, batched)],
        [export.tensor_spec(recipe.output.output_name, y, batched)],
    )


def run(recipe: Recipe, *, show_progress: bool = True) -> Outcome:
    """Run the whole recipe; rank 0 measures and writes, others only train."""
    data = load_data(recipe.data, recipe.folder, str(recipe.path))
    show_progress = show_progress and distributed.is_main()  # one progress display per job
    stages = build_stages(recipe, data, show_progress=show_progress)
    if not distributed.is_main():
        distributed.barrier()
        return Outcome({}, {}, "")
    results = [
        report.StageResult(
            s.name,
            s.kind,
            measure(
                s.model,
                s.artifact,
                data.test,
                recipe.latency_repeats,
                label=f"{s.name} (evaluate)",
                show_progress=show_progress,
            ),
            s.notes,
        )
        for s in stages
    ]
    report_json, markdown, png = report.render(results)
    rows = {row["name"]: row for row in report_json["stages"]}
    out = recipe.output
    versions: dict[str, Path] = {}
    final = stages[-1]
    wanted = [(f"{out.model}-{name}", name) for name in out.export_stages]
    wanted.append((out.model, final.name))
    by_name = {s.name: s for s in stages}
    for model_name, stage_name in wanted:
        stage = by_name[stage_name]
        inputs, outputs = _signature(recipe, data, stage.artifact)
        manifest = {
            "recipe": recipe.raw,
            "recipe_file": str(recipe.path.resolve()),
            "stage": stage_name,
            "measurements": rows[stage_name],
            "stages": report_json["stages"],
        }
        extra = {}
        if model_name == out.model:
            extra = {
                "report.md": markdown.encode(),
                "report.json": report.dumps(report_json).encode(),
                "report.png": png,
            }
        description = out.description or f"compressed by {recipe.path.name}"
        if model_name != out.model:
            description = f"{description} ({stage_name} stage, for comparison)"
        versions[model_name] = export.write_version(
            out.repository,
            model_name,
            stage.artifact,
            manifest,
            inputs=inputs,
            outputs=outputs,
            max_batch_size=out.max_batch_size,
            description=description,
            extra_files=extra,
        )
    distributed.barrier()
    return Outcome(versions, report_json, markdown)
