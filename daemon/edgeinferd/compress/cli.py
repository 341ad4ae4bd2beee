"""``edgeinferd compress RECIPE``: run a compression recipe into a model repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeinferd.compress import distributed
from edgeinferd.compress.pipeline import run
from edgeinferd.compress.recipe import RecipeError, load_recipe


def build_parser(prog: str = "edgeinferd compress") -> argparse.ArgumentParser:
    """The argument parser, exposed so ``edgeinferd`` can embed it as a subcommand."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Distil, prune and quantize a model as a TOML recipe says, and write the "
        "result, its config.toml, manifest.json and a report into a model repository.",
    )
    parser.add_argument("recipe", type=Path, help="the recipe (TOML)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a recipe; 0 on success, 2 for an invalid recipe, 1 for a failed step."""
    args = build_parser().parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
        outcome = run(recipe, show_progress=not args.quiet)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"error: {args.recipe}: {error}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if outcome.versions:
        print(outcome.markdown)
        for model, folder in outcome.versions.items():
            print(f"wrote {model} version {folder.name}: {folder}")
    return 0
