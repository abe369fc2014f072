#!/usr/bin/env bash
# The whole check, as CI runs it: format, lint, types, tests. Run from the repo root inside the venv
# (scripts/test.sh sets that up). Arguments go to pytest. A first argument `--fast` runs the fast
# lane instead: pytest alone (no ruff, no mypy) on the tests marked `unit` but not `slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# pytest-xdist: one test process per core (PYTEST_WORKERS=0: all in this one). Tests share no fixed
# port or folder. A module whose servers are a module fixture carries an xdist_group mark, so that
# one worker runs it and starts them once.
PARALLEL=(-n "${PYTEST_WORKERS:-auto}" --dist loadgroup)
# Several torch processes (test workers, the workers they start) share few cores: OpenMP threads
# that spin while idle would take turns away from the others' work.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# -rs: every skip with its reason; the slowest tests, to keep the suite fast.
REPORT=(-q -p no:cacheprovider -rs --durations=25)
if [ "${1:-}" = "--fast" ]; then
    shift
    # Only tests/unit holds `unit` tests: unless told where, do not collect the rest.
    paths=tests/unit
    for arg in "$@"; do [[ $arg == -* ]] || paths=; done
    echo "== pytest -m 'unit and not slow'"
    exec "$PY" -m pytest "${REPORT[@]}" "${PARALLEL[@]}" -p no:schemathesis -m "unit and not slow" $paths "$@"
fi
echo "== ruff format --check"; "$PY" -m ruff format --check turbine tests benchmarks scripts examples
echo "== ruff check";          "$PY" -m ruff check turbine tests benchmarks scripts examples
echo "== mypy --strict";       "$PY" -m mypy --strict
echo "== pytest";              "$PY" -m pytest "${REPORT[@]}" "${PARALLEL[@]}" "$@"
