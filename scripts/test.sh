#!/usr/bin/env bash
# Install, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-install.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
# Two workers: most tests wait on daemons and subprocesses, not the CPU (see
# tests/conftest.py for how tests are grouped onto them).
python -m pytest -n 2 --dist loadgroup "$@"
