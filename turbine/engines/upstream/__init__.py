"""The upstream engine: a sidecar that fronts stock OpenAI-compatible servers (vLLM, SGLang,
llama.cpp) as Turbine workers, with their own KV events re-keyed onto Turbine's block hashes."""
