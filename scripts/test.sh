#!/usr/bin/env bash
# Set up, then the lint (ruff, configured in pyproject.toml) and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
MEPF_NEWER_PYTHON=$(bash scripts/newer_python.sh) || true
export MEPF_NEWER_PYTHON
.venv/bin/python -m pytest -q "$@"
