"""``edgeinferd import SOURCE``: a GGUF file or Hugging Face folder into the model repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeinferd.errors import EdgeInferError
from edgeinferd.generation.quantize import DEFAULT_FORM, FORMS
from edgeinferd.importer.checkpoint import ImportRefused


def build_parser(prog: str = "edgeinferd import") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Import a language model (a .gguf file or a Hugging Face model folder) as"
        " a new version of a model in the repository.",
    )
    parser.add_argument("source", type=Path, help="a .gguf file or a Hugging Face model folder")
    parser.add_argument("--repository", type=Path, required=True, help="the model repository")
    parser.add_argument("--name", required=True, help="the model's name in the repository")
    parser.add_argument(
        "--quantize",
        choices=FORMS,
        default=DEFAULT_FORM,
        help=f"weight form (default {DEFAULT_FORM}; none: fp32, exactly the source's weights)",
    )
    parser.add_argument(
        "--max-sequences", type=int, default=4, help="slots, for a new model's config.toml"
    )
    parser.add_argument(
        "--context", type=int, default=2048, help="positions per slot, for a new config.toml"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """0 on success; 2 for a source that cannot be imported (one line saying why)."""
    args = build_parser().parse_args(argv)
    try:
        from edgeinferd.importer.write import import_checkpoint
    except ImportError as error:
        print(
            f"edgeinferd import: {error.name} is missing; install the import extra:"
            ' pip install "edgeinfer[import]"',
            file=sys.stderr,
        )
        return 2
    try:
        folder = import_checkpoint(
            args.source,
            args.repository,
            args.name,
            args.quantize,
            max_sequences=args.max_sequences,
            context=args.context,
        )
    except (ImportRefused, EdgeInferError) as error:
        print(f"edgeinferd import: {error}", file=sys.stderr)
        return 2
    print(f"imported {args.source.name} as {folder} ({args.quantize})")
    return 0
