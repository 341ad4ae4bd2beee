#!/usr/bin/env bash
# Create .venv (if missing) and install edgeinfer with the daemon, examples and dev tools.
# torch is pinned to the CPU build for development and CI; the package itself accepts a range.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[dev]"
