"""The light client stays light, and the generated code matches the .proto files."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_client_and_cli_import_without_torch() -> None:
    """`import edgeinfer, edgeinfer.cli` loads neither torch nor the daemon."""
    code = (
        "import sys, edgeinfer, edgeinfer.cli, edgeinfer.client\n"
        "heavy = {'torch', 'edgeinferd', 'structlog'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_data_plane_imports_no_transport() -> None:
    """The data plane (and what it imports: models, batching, metrics, shared memory,
    errors) runs without grpc: importing it loads no grpc module."""
    code = (
        "import sys, edgeinferd.dataplane, edgeinferd.errors, edgeinferd.metrics\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'grpc', 'grpc_health'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    """Regenerating from protos/ reproduces the committed files byte for byte."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert generated, "the generator wrote nothing"
    committed = sorted(
        p.relative_to(ROOT / "client") for p in (ROOT / "client").rglob("*_pb2*.py*")
    )
    assert generated == committed
    stale = [
        str(p)
        for p in generated
        if not filecmp.cmp(tmp_path / p, ROOT / "client" / p, shallow=False)
    ]
    assert stale == []


def test_runtime_floor_matches_the_generator() -> None:
    """pyproject's protobuf floor is the gencode version the generated files demand."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    source = (ROOT / "client" / "edgeinfer" / "v1" / "inference_pb2.py").read_text()
    line = next(ln for ln in source.splitlines() if ln.startswith("# Protobuf Python Version:"))
    gencode = line.split(":")[1].strip()
    assert f"protobuf>={gencode}" in pyproject["project"]["dependencies"]


def test_async_client_has_the_same_methods_as_the_blocking_one() -> None:
    """README: "edgeinfer.AsyncClient has the same methods for asyncio" (names and arguments)."""
    import inspect

    from edgeinfer.client import AsyncClient, Client

    def public(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(member).parameters)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    assert public(AsyncClient) == public(Client)
