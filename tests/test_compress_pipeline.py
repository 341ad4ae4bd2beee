"""A tiny recipe end to end: artifacts, config.toml, manifest and report in a model repository."""

from __future__ import annotations

import hashlib
import io
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from edgeinferd.compress import evaluate_artifact, quantize
from edgeinferd.compress.cli import main
from edgeinferd.compress.progress import Progress
from edgeinferd.compress.sources import load_torchscript


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run no slower on one thread, and then do not fight other test processes
    for the cores (spinning OpenMP threads slow everyone down many times over)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODELS = """
from torch import nn

def teacher():
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))

def student():
    return nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
"""

RECIPE = """
seed = 3
[teacher]
entry = "tiny_compress_models:teacher"
[teacher.train]
epochs = 10
lr = 3e-3
[student]
entry = "tiny_compress_models:student"
[data]
train = "train.npz"
test = "test.npz"
[[steps]]
kind = "distill"
epochs = 10
lr = 3e-3
[[steps]]
kind = "prune"
amount = 0.5
finetune_epochs = 2
[[steps]]
kind = "prune_structured"
amount = 0.25
[[steps]]
kind = "quantize_dynamic"
[evaluation]
latency_repeats = 3
[output]
repository = "repo"
model = "tiny"
export_stages = ["teacher"]
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("recipe")
    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target
    np.savez(folder / "train.npz", x=x[:600], y=y[:600])
    np.savez(folder / "test.npz", x=x[1200:1500], y=y[1200:1500])
    (folder / "tiny_compress_models.py").write_text(MODELS)
    (folder / "recipe.toml").write_text(RECIPE)
    assert main([str(folder / "recipe.toml"), "--quiet"]) == 0
    return folder / "recipe.toml"


def test_version_holds_artifact_manifest_and_report(recipe: Path) -> None:
    """The final stage lands as version 1 with its TorchScript artifact, manifest and report,
    and the manifest's SHA-256 is the artifact's."""
    version = recipe.parent / "repo" / "tiny" / "1"
    names = {"model.pt", "manifest.json", "report.md", "report.json", "report.png"}
    assert names <= {p.name for p in version.iterdir()}
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["artifact"] == "model.pt"
    assert manifest["format"] == "torchscript"
    assert manifest["sha256"] == hashlib.sha256((version / "model.pt").read_bytes()).hexdigest()
    assert manifest["torch_version"] == torch.__version__
    assert manifest["created"].endswith("Z")
    assert manifest["recipe"] == tomllib.loads(RECIPE)
    assert manifest["stage"] == "int8-dynamic"
    assert (version / "report.png").read_bytes().startswith(b"\x89PNG")


def test_config_is_derived_from_data_and_model(recipe: Path) -> None:
    """config.toml's inputs and outputs come from the data and a trial forward pass, without
    the batch dimension, and pin no version, so the daemon serves the newest."""
    config = tomllib.loads((recipe.parent / "repo" / "tiny" / "config.toml").read_text())
    assert config["max_batch_size"] == 32
    assert config["inputs"] == [{"name": "input", "dtype": "float32", "shape": [64]}]
    assert config["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [10]}]
    assert "version" not in config


def test_artifact_is_int8_and_evaluates_as_reported(recipe: Path) -> None:
    """The written artifact holds int8 weights, and evaluate_artifact reproduces the accuracy
    the report measured."""
    version = recipe.parent / "repo" / "tiny" / "1"
    loaded = load_torchscript(version / "model.pt")
    assert all(w.dtype == torch.qint8 for w in quantize.scripted_int8_weights(loaded).values())
    assert len(quantize.scripted_int8_weights(loaded)) == 2
    manifest = json.loads((version / "manifest.json").read_text())
    reported = manifest["measurements"]["accuracy"]
    assert evaluate_artifact(version) == pytest.approx(reported)
    assert reported > 0.5


def test_report_shows_what_each_step_did(recipe: Path) -> None:
    """One row per stage: unstructured pruning shows its sparsity, structured pruning fewer
    parameters, int8 a smaller file; the markdown table has every stage."""
    version = recipe.parent / "repo" / "tiny" / "1"
    rows = {r["name"]: r for r in json.loads((version / "report.json").read_text())["stages"]}
    assert list(rows) == ["teacher", "student", "pruned", "shrunk", "int8-dynamic"]
    assert all(s == pytest.approx(0.5) for s in rows["pruned"]["layer_sparsity"].values())
    assert (
        rows["shrunk"]["parameters"] < rows["pruned"]["parameters"] < rows["teacher"]["parameters"]
    )
    assert rows["int8-dynamic"]["size_bytes"] < rows["shrunk"]["size_bytes"]
    assert rows["teacher"]["size_vs_teacher"] == 1.0
    assert all(r["latency_b1_us"] > 0 and r["latency_b32_us"] > 0 for r in rows.values())
    markdown = (version / "report.md").read_text()
    assert all(f"| {name} |" in markdown for name in rows)


def test_side_by_side_stage_is_its_own_model(recipe: Path) -> None:
    """A stage listed in export_stages is written as <model>-<stage>, a servable fp32 model."""
    version = recipe.parent / "repo" / "tiny-teacher" / "1"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["stage"] == "teacher"
    loaded = load_torchscript(version / "model.pt")
    assert loaded(torch.zeros(3, 64)).shape == (3, 10)
    assert (recipe.parent / "repo" / "tiny-teacher" / "config.toml").is_file()


def test_second_run_adds_version_2(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Running again adds version 2 of every written model and leaves version 1 as it was."""
    version1 = recipe.parent / "repo" / "tiny" / "1"
    before = (version1 / "model.pt").read_bytes()
    assert main([str(recipe), "--quiet"]) == 0
    assert "| int8-dynamic |" in capsys.readouterr().out
    assert (recipe.parent / "repo" / "tiny" / "2" / "model.pt").is_file()
    assert (recipe.parent / "repo" / "tiny-teacher" / "2" / "model.pt").is_file()
    assert (version1 / "model.pt").read_bytes() == before
    assert not list((recipe.parent / "repo" / "tiny").glob(".incoming-*"))


def test_torchscript_teacher_can_be_distilled_from(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A teacher given as a saved TorchScript artifact (no Python code) teaches a student."""
    folder = recipe.parent
    teacher = folder / "repo" / "tiny-teacher" / "1" / "model.pt"
    text = RECIPE.replace(
        'entry = "tiny_compress_models:teacher"\n[teacher.train]\nepochs = 10\nlr = 3e-3',
        f'artifact = "{teacher}"',
    )
    steps = text.index('[[steps]]\nkind = "prune"')
    text = text[:steps] + text[text.index('[[steps]]\nkind = "quantize_dynamic"') :]
    text = text.replace('repository = "repo"', f'repository = "{tmp_path / "repo"}"')
    assert 'artifact = "' in text
    (folder / "from_artifact.toml").write_text(text)
    assert main([str(folder / "from_artifact.toml"), "--quiet"]) == 0
    rows = json.loads((tmp_path / "repo" / "tiny" / "1" / "report.json").read_text())["stages"]
    assert [r["name"] for r in rows] == ["teacher", "student", "int8-dynamic"]
    assert rows[1]["accuracy"] > 0.5
    capsys.readouterr()


def test_progress_is_plain_lines_off_a_terminal() -> None:
    """Without a terminal, progress is whole log lines (no carriage returns), at most about
    one per tenth of the work."""
    stream = io.StringIO()
    with Progress("distill", 100, stream=stream) as progress:
        for _ in range(100):
            progress.advance(note="loss 0.1")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert 5 <= len(lines) <= 12
    assert lines[-1].startswith("distill: 100/100")


def test_progress_is_a_bar_on_a_terminal() -> None:
    """On a terminal, progress redraws one bar in place."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    with Progress("train", 4, stream=stream) as progress:
        for _ in range(4):
            progress.advance()
    text = stream.getvalue()
    assert text.count("\r") == 4
    assert "[" + "#" * 28 + "] 4/4" in text
    assert text.endswith("\n")
