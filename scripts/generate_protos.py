"""Regenerate the Python code for every .proto under protos/.

The file path of each .proto mirrors its Python package path
(protos/edgeinfer/v1/x.proto -> client/edgeinfer/v1/x_pb2.py), so the
generated imports resolve as ``edgeinfer.v1...`` with no rewriting.

    python scripts/generate_protos.py            # writes into client/
    python scripts/generate_protos.py --out DIR  # the drift test uses this
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out: Path) -> list[Path]:
    """Run protoc over every .proto and return the files it wrote."""
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in out.rglob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "client")
    written = generate(parser.parse_args().out)
    print(f"generated {len(written)} files", file=sys.stderr)


if __name__ == "__main__":
    main()
