"""The `edgeinfer` CLI against a real daemon: outputs, JSON and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import Daemon
from tests.test_predict import reference


def cli(daemon: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeinfer.cli", "-a", daemon.address, *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


def test_predict_from_npz_prints_json_and_saves_npz(daemon: Daemon, tmp_path: Path) -> None:
    """`predict MODEL x.npz --json --output out.npz` prints and saves the model's outputs."""
    x = np.random.default_rng(4).standard_normal((2, 16), dtype=np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    result = cli(
        daemon,
        "--json",
        "predict",
        "mlp",
        str(tmp_path / "in.npz"),
        "--output",
        str(tmp_path / "out.npz"),
    )
    assert result.returncode == 0, result.stderr
    printed = np.asarray(json.loads(result.stdout)["y"], dtype=np.float32)
    np.testing.assert_allclose(printed, reference(x), rtol=1e-5, atol=1e-6)
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_allclose(saved["y"], reference(x), rtol=1e-5, atol=1e-6)


def test_predict_from_json_on_stdin_uses_the_models_dtypes(daemon: Daemon) -> None:
    """JSON input takes the dtype the model declares (int64 for adder)."""
    result = cli(daemon, "--json", "predict", "adder", "-", stdin='{"a": [1, 2], "b": [3, 4]}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"sum": [4, 6], "product": [3, 8]}


def test_stream_prints_one_line_per_row_and_flags_errors(daemon: Daemon, tmp_path: Path) -> None:
    """`stream MODEL x.npy` sends one message per row and prints one JSON line per answer."""
    x = np.random.default_rng(5).standard_normal((7, 16), dtype=np.float32)
    np.save(tmp_path / "rows.npy", x)
    result = cli(daemon, "--json", "stream", "mlp", str(tmp_path / "rows.npy"))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == [str(i) for i in range(1, 8)]
    np.testing.assert_allclose(
        np.asarray([line["y"][0] for line in lines], np.float32), reference(x), rtol=1e-5, atol=1e-6
    )


def test_stream_from_stdin_reports_a_bad_line_and_exits_non_zero(daemon: Daemon) -> None:
    """A bad message on a stdin stream prints its error line; the others still answer; exit 1."""
    good = json.dumps({"x": [[0.0] * 16]})
    bad = json.dumps({"x": [[0.0] * 3]})
    result = cli(daemon, "--json", "stream", "mlp", "-", stdin=f"{good}\n{bad}\n{good}\n")
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [("error" in line) for line in lines] == [False, True, False]
    assert lines[1]["error"] == "INVALID_ARGUMENT"


def test_models_list_and_show(daemon: Daemon) -> None:
    """`models list --json` lists states; `models show` prints tensors and versions."""
    listed = cli(daemon, "--json", "models", "list")
    states = {m["name"]: m["state"] for m in json.loads(listed.stdout)}
    assert states["mlp"] == "READY" and states["corrupt"] == "FAILED"
    shown = cli(daemon, "models", "show", "mlp")
    assert "input  x: float32[-1, 16]" in shown.stdout
    assert "version 1: READY torchscript" in shown.stdout


def test_errors_exit_non_zero_with_one_line(daemon: Daemon) -> None:
    """An unknown model exits 1 with one line naming the status and the model."""
    result = cli(daemon, "models", "show", "ghost")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "edgeinfer: NOT_FOUND: model 'ghost' is not in the repository"
    ]


def test_health_exit_code_follows_the_status(daemon: Daemon) -> None:
    """`health` exits 0 for SERVING and 1 for a failed model."""
    assert cli(daemon, "health").stdout.strip() == "SERVING"
    failed = cli(daemon, "health", "corrupt")
    assert (failed.returncode, failed.stdout.strip()) == (1, "NOT_SERVING")


def test_unreachable_daemon_is_a_one_line_error(tmp_path: Path) -> None:
    """With no daemon at the address, the CLI says UNAVAILABLE in one line and exits 1."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeinfer.cli",
            "-a",
            f"unix://{tmp_path}/none.sock",
            "--timeout",
            "2",
            "health",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("edgeinfer: UNAVAILABLE")
