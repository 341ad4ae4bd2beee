#!/usr/bin/env bash
# Install, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-install.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
