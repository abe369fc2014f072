#!/usr/bin/env bash
# Set up a virtualenv with every test dependency, then run the whole check (scripts/check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON_BIN:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON_BIN" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
exec bash scripts/check.sh "$@"
