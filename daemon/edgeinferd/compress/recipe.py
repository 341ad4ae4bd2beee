"""Compression recipes: a TOML file naming the models, the data, the steps and the output.

Everything is validated before any training starts, so a typo costs a second, not a
twenty-minute run. Errors name the file and the field, e.g.
``recipe.toml: steps[2].amount: expected a number in (0, 1), got 1.5``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
ENTRY_POINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")
ENGINES = ("auto", "x86", "fbgemm", "qnnpack")
QUANTIZE_KINDS = ("quantize_dynamic", "quantize_static", "qat")
STEP_KINDS = ("distill", "prune", "prune_structured", *QUANTIZE_KINDS)
DEFAULT_STAGE_NAMES = {
    "distill": "student",
    "prune": "pruned",
    "prune_structured": "shrunk",
    "quantize_dynamic": "int8-dynamic",
    "quantize_static": "int8",
    "qat": "int8-qat",
}


class RecipeError(ValueError):
    """A recipe that cannot be run; the message says which file and field, and why."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        self.file = file
        self.field = field
        self.problem = problem
        where = f"{file}: {field}: " if field else f"{file}: "
        super().__init__(where + problem)


@dataclass(frozen=True)
class Training:
    """How a step trains: shared by teacher training, distillation, fine-tuning and QAT.

    ``alpha`` weighs the soft-target (teacher) loss against cross-entropy on the labels;
    0 means plain supervised training.
    """

    epochs: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    alpha: float = 0.0
    temperature: float = 4.0


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: an entry point building it, optionally with saved weights,
    or a TorchScript artifact (usable as a frozen teacher only)."""

    entry: str | None = None
    weights: Path | None = None
    artifact: Path | None = None
    train: Training | None = None


@dataclass(frozen=True)
class DataSource:
    """Either an entry point returning the splits, or .npz files with ``x`` and ``y`` arrays."""

    entry: str | None = None
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One compression step; which fields matter depends on ``kind``."""

    kind: str
    name: str
    amount: float = 0.5
    scope: str = "layer"
    norm: float = 2.0
    engine: str = "auto"
    calibration_samples: int = 512
    training: Training = field(default_factory=Training)


@dataclass(frozen=True)
class Output:
    """Where the artifacts go and how the daemon should see them."""

    repository: Path
    model: str
    export_stages: tuple[str, ...] = ()
    max_batch_size: int = 32
    input_name: str = "input"
    output_name: str = "logits"
    description: str = ""


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``raw`` is the parsed TOML, recorded in every manifest."""

    path: Path
    seed: int
    teacher: ModelSource
    student: ModelSource | None
    data: DataSource
    steps: tuple[Step, ...]
    output: Output
    latency_repeats: int
    raw: dict[str, Any]

    @property
    def folder(self) -> Path:
        """Relative paths and entry-point modules are resolved from the recipe's folder."""
        return self.path.parent


class _Table:
    """Reads typed fields from one TOML table and refuses keys nobody asked for."""

    def __init__(self, data: Any, file: str, prefix: str) -> None:
        if not isinstance(data, dict):
            raise RecipeError(file, prefix.rstrip("."), f"expected a table, got {_show(data)}")
        self.data: dict[str, Any] = data
        self.file = file
        self.prefix = prefix
        self.seen: set[str] = set()

    def error(self, key: str, problem: str) -> RecipeError:
        return RecipeError(self.file, f"{self.prefix}{key}", problem)

    def has(self, key: str) -> bool:
        self.seen.add(key)
        return key in self.data

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def string(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise self.error(key, "required")
            return default
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_show(value)}")
        if choices and value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def optional_string(self, key: str) -> str | None:
        return self.string(key) if self.has(key) else None

    def number(
        self,
        key: str,
        default: float,
        low: float,
        high: float,
        *,
        open_low: bool = True,
        open_high: bool = True,
    ) -> float:
        value = self.raw(key)
        if value is None:
            return default
        lo_ok = isinstance(value, int | float) and (value > low if open_low else value >= low)
        hi_ok = isinstance(value, int | float) and (value < high if open_high else value <= high)
        if isinstance(value, bool) or not (lo_ok and hi_ok):
            interval = (
                f"{'(' if open_low else '['}{_num(low)}, {_num(high)}{')' if open_high else ']'}"
            )
            raise self.error(key, f"expected a number in {interval}, got {_show(value)}")
        return float(value)

    def integer(self, key: str, default: int, low: int, high: int = 2**31) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(key, f"expected an integer in [{low}, {high}], got {_show(value)}")
        return value

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                raise self.error(key, "unknown field")


def _show(value: Any) -> str:
    return (
        repr(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def _num(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:g}"


def _path(table: _Table, key: str, folder: Path) -> Path | None:
    text = table.optional_string(key)
    if text is None:
        return None
    path = Path(text).expanduser()
    return path if path.is_absolute() else folder / path


def _entry(table: _Table, key: str) -> str | None:
    text = table.optional_string(key)
    if text is not None and not ENTRY_POINT.match(text):
        raise table.error(key, f"expected 'module:function', got {text!r}")
    return text


def _training(table: _Table, *, epochs: int, alpha: float, prefix: str = "") -> Training:
    inf = float("inf")
    return Training(
        epochs=table.integer(f"{prefix}epochs", epochs, 0, 100_000),
        lr=table.number("lr", 1e-3, 0.0, inf),
        batch_size=table.integer("batch_size", 64, 1, 1_000_000),
        weight_decay=table.number("weight_decay", 0.0, 0.0, inf, open_low=False),
        alpha=table.number("alpha", alpha, 0.0, 1.0, open_low=False, open_high=False),
        temperature=table.number("temperature", 4.0, 0.0, inf),
    )


def _model(data: Any, file: str, name: str, folder: Path) -> ModelSource:
    table = _Table(data, file, f"{name}.")
    entry = _entry(table, "entry")
    weights = _path(table, "weights", folder)
    artifact = _path(table, "artifact", folder)
    train = None
    if table.has("train"):
        sub = _Table(table.raw("train"), file, f"{name}.train.")
        train = _training(sub, epochs=10, alpha=0.0)
        sub.finish()
        if train.alpha:
            raise sub.error("alpha", "a model trained on its own has no teacher to distil from")
    table.finish()
    if (entry is None) == (artifact is None):
        raise table.error("entry", "give exactly one of 'entry' or 'artifact'")
    if artifact is not None and (weights is not None or train is not None):
        raise table.error("artifact", "a TorchScript artifact takes no 'weights' or 'train'")
    for key, path in (("weights", weights), ("artifact", artifact)):
        if path is not None and not path.is_file():
            raise table.error(key, f"no such file: {path}")
    return ModelSource(entry=entry, weights=weights, artifact=artifact, train=train)


def _data(data: Any, file: str, folder: Path) -> DataSource:
    table = _Table(data, file, "data.")
    entry = _entry(table, "entry")
    files: dict[str, Path] = {}
    for split in ("train", "test", "calibration"):
        path = _path(table, split, folder)
        if path is not None:
            if not path.is_file():
                raise table.error(split, f"no such file: {path}")
            files[split] = path
    table.finish()
    if entry is None and not {"train", "test"} <= files.keys():
        raise table.error("entry", "give 'entry', or 'train' and 'test' .npz files")
    if entry is not None and files:
        raise table.error("entry", "give either 'entry' or .npz files, not both")
    return DataSource(entry=entry, files=files)


def _step(data: Any, file: str, index: int) -> Step:
    table = _Table(data, file, f"steps[{index}].")
    kind = table.string("kind", choices=STEP_KINDS)
    name = table.string("name", DEFAULT_STAGE_NAMES[kind])
    if not MODEL_NAME.match(name):
        raise table.error("name", f"expected a name like 'int8' ([A-Za-z0-9_.-]), got {name!r}")
    step = Step(kind=kind, name=name)
    if kind == "distill":
        step = Step(kind, name, training=_training(table, epochs=10, alpha=0.7))
    elif kind in ("prune", "prune_structured"):
        amount = table.number("amount", 0.5, 0.0, 1.0)
        scope = table.string("scope", "layer", ("layer", "global")) if kind == "prune" else "layer"
        norm = table.number("norm", 2.0, 0.0, float("inf")) if kind == "prune_structured" else 2
        training = _training(table, epochs=0, alpha=0.0, prefix="finetune_")
        step = Step(kind, name, amount=amount, scope=scope, norm=norm, training=training)
    elif kind in QUANTIZE_KINDS:
        engine = table.string("engine", "auto", ENGINES)
        samples = table.integer("calibration_samples", 512, 1) if kind == "quantize_static" else 0
        training = _training(table, epochs=3, alpha=0.0) if kind == "qat" else Training()
        step = Step(kind, name, engine=engine, calibration_samples=samples, training=training)
    table.finish()
    return step


def _output(data: Any, file: str, folder: Path) -> Output:
    table = _Table(data, file, "output.")
    repository = _path(table, "repository", folder)
    if repository is None:
        raise table.error("repository", "required")
    model = table.string("model")
    if not MODEL_NAME.match(model):
        raise table.error("model", f"expected [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}, got {model!r}")
    stages = table.raw("export_stages") or []
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise table.error("export_stages", f"expected a list of stage names, got {_show(stages)}")
    output = Output(
        repository=repository,
        model=model,
        export_stages=tuple(stages),
        max_batch_size=table.integer("max_batch_size", 32, 0),
        input_name=table.string("input_name", "input"),
        output_name=table.string("output_name", "logits"),
        description=table.string("description", ""),
    )
    table.finish()
    return output


def parse_recipe(data: dict[str, Any], path: Path) -> Recipe:
    """Validate a parsed recipe; ``path`` anchors relative paths and names the file in errors."""
    file = str(path)
    folder = path.parent
    top = _Table(data, file, "")
    seed = top.integer("seed", 0, 0)
    teacher = _model(top.raw("teacher"), file, "teacher", folder) if top.has("teacher") else None
    if teacher is None:
        raise top.error("teacher", "required")
    student = _model(top.raw("student"), file, "student", folder) if top.has("student") else None
    if not top.has("data"):
        raise top.error("data", "required")
    data_source = _data(top.raw("data"), file, folder)
    raw_steps = top.raw("steps") or []
    if not isinstance(raw_steps, list):
        raise top.error("steps", "expected an array of tables ([[steps]])")
    steps = tuple(_step(item, file, i) for i, item in enumerate(raw_steps))
    if not top.has("output"):
        raise top.error("output", "required")
    output = _output(top.raw("output"), file, folder)
    latency_repeats = 50
    if top.has("evaluation"):
        evaluation = _Table(top.raw("evaluation"), file, "evaluation.")
        latency_repeats = evaluation.integer("latency_repeats", 50, 1)
        evaluation.finish()
    top.finish()
    _check_order(steps, student, teacher, output, file)
    return Recipe(path, seed, teacher, student, data_source, steps, output, latency_repeats, data)


def _check_order(
    steps: tuple[Step, ...],
    student: ModelSource | None,
    teacher: ModelSource,
    output: Output,
    file: str,
) -> None:
    names = ["teacher"]
    for i, step in enumerate(steps):
        if step.name in names:
            raise RecipeError(file, f"steps[{i}].name", f"stage name {step.name!r} is used twice")
        names.append(step.name)
        if step.kind == "distill" and (student is None or student.entry is None):
            raise RecipeError(file, f"steps[{i}].kind", "distill needs a [student] with 'entry'")
        if i and steps[i - 1].kind in QUANTIZE_KINDS:
            raise RecipeError(file, f"steps[{i}].kind", "nothing can follow a quantization step")
        if (
            step.kind != "distill"
            and teacher.artifact is not None
            and not any(s.kind == "distill" for s in steps[:i])
        ):
            raise RecipeError(
                file, f"steps[{i}].kind", "a TorchScript teacher can only be distilled from"
            )
    for j, stage in enumerate(output.export_stages):
        if stage not in names:
            raise RecipeError(
                file, f"output.export_stages[{j}]", f"no stage {stage!r}; stages: {names}"
            )


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise RecipeError(str(path), "", "file not found") from None
    except OSError as error:
        raise RecipeError(str(path), "", f"cannot be read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(str(path), "", f"invalid TOML: {error}") from None
    return parse_recipe(data, path)
