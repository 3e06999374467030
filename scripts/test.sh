#!/usr/bin/env bash
# Installs the project into .venv, then runs the linters and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== pytest"
.venv/bin/python -m pytest -q --durations=20 "$@"
