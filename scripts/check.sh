#!/usr/bin/env bash
# The whole check, as CI runs it: format, lint, types, tests. Run from the repo root inside the venv
# (scripts/test.sh sets that up).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
echo "== ruff format --check"; "$PY" -m ruff format --check turbine tests benchmarks scripts examples
echo "== ruff check";          "$PY" -m ruff check turbine tests benchmarks scripts examples
echo "== mypy --strict";       "$PY" -m mypy --strict
# -rs: every skip with its reason; the slowest tests, to keep the suite fast.
echo "== pytest";              "$PY" -m pytest -q -p no:cacheprovider -rs --durations=25 "$@"
