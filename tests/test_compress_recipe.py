"""Recipe validation: every mistake is reported with the file and the field it is in."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeinferd.compress.cli import main
from edgeinferd.compress.recipe import RecipeError, load_recipe

VALID = """
seed = 1
[teacher]
entry = "models:teacher"
[teacher.train]
epochs = 2
[student]
entry = "models:student"
[data]
entry = "models:data"
[[steps]]
kind = "distill"
temperature = 2.0
alpha = 0.5
[[steps]]
kind = "prune"
scope = "global"
amount = 0.5
[[steps]]
kind = "prune_structured"
amount = 0.25
[[steps]]
kind = "quantize_static"
[output]
repository = "repo"
model = "digits"
export_stages = ["teacher", "student"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_valid_recipe_is_read_with_defaults(tmp_path: Path) -> None:
    """A valid recipe yields its steps in order, with default stage names and relative paths
    resolved from the recipe's folder."""
    recipe = load_recipe(_write(tmp_path, VALID))
    assert [s.kind for s in recipe.steps] == [
        "distill",
        "prune",
        "prune_structured",
        "quantize_static",
    ]
    assert [s.name for s in recipe.steps] == ["student", "pruned", "shrunk", "int8"]
    assert recipe.steps[0].training.alpha == 0.5
    assert recipe.steps[1].scope == "global"
    assert recipe.output.repository == tmp_path / "repo"
    assert recipe.output.max_batch_size == 32


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("amount = 0.25", "amount = 1.5", "steps[2].amount: expected a number in (0, 1), got 1.5"),
        ("alpha = 0.5", "alpha = true", "steps[0].alpha: expected a number in [0, 1], got true"),
        ('kind = "prune"\n', 'kind = "prun"\n', "steps[1].kind: expected one of distill, prune,"),
        ("temperature = 2.0", "temprature = 2.0", "steps[0].temprature: unknown field"),
        ("epochs = 2", 'epochs = "2"', "teacher.train.epochs: expected an integer"),
        ('model = "digits"', 'model = "../x"', "output.model: expected"),
        ('"teacher", "student"', '"teacher", "int9"', "output.export_stages[1]: no stage 'int9'"),
        (
            'entry = "models:data"',
            'entry = "models.data"',
            "data.entry: expected 'module:function'",
        ),
        ('entry = "models:data"', 'train = "missing.npz"', "data.train: no such file"),
        (
            '[[steps]]\nkind = "quantize_static"',
            '[[steps]]\nkind = "quantize_static"\n[[steps]]\nkind = "prune"\nname = "late"',
            "steps[4].kind: nothing can follow",
        ),
        ('[student]\nentry = "models:student"\n', "", "steps[0].kind: distill needs a [student]"),
        ("seed = 1", "seed = 1\n[output2]", "output2: unknown field"),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    """Each mistake is refused before anything runs, naming the file and the exact field."""
    assert old in VALID
    path = _write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_invalid_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    """A syntax error names the file rather than surfacing as a parser traceback."""
    path = _write(tmp_path, "seed = = 1")
    with pytest.raises(RecipeError, match=r"recipe\.toml: invalid TOML"):
        load_recipe(path)


def test_cli_reports_recipe_errors_with_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line prints the named field and exits 2, without a traceback."""
    path = _write(tmp_path, VALID.replace("amount = 0.25", "amount = 1.5"))
    assert main([str(path)]) == 2
    error = capsys.readouterr().err
    assert f"{path}: steps[2].amount: expected a number in (0, 1), got 1.5" in error
    assert "Traceback" not in error
