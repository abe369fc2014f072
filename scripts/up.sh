#!/usr/bin/env bash
# Set up a virtualenv with Turbine, then start a frontend plus mocker workers on :8000.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON_BIN:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON_BIN" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/turbine up "$@"
