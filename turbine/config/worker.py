"""`turbine worker`: the engine a worker serves and how (`EngineOptions` are `turbine up`'s too)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from turbine.choices import (
    CPU_KERNELS,
    DEVICES,
    DTYPES,
    ENGINES,
    GUIDED_DIALECTS,
    LOAD_FORMATS,
    MODEL_FILES_VIA,
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    UPSTREAM_MODES,
)
from turbine.config.options import comma_list, opt
from turbine.config.runtime import GUIDED_HELP, RuntimeConfig, is_gguf_file
from turbine.errors import ConfigError
from turbine.protocol.model_card import MODEL_TYPES
from turbine.protocol.request import SAMPLING_KNOBS


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The worker options that `turbine up` takes too and hands to its workers."""

    engine: str = opt("mocker", "Engine to serve.", choices=ENGINES)
    model_path: str | None = opt(
        None,
        "Model directory (tokenizer, template, config; safetensors weights for --engine torch) or, "
        "for --engine torch, a .gguf file; default: the bundled tiny tokenizer (mocker, echo).",
    )
    model_name: str | None = opt(None, "Served model name (default: the model directory's name).")
    block_size: int = opt(64, "KV block size in tokens.", min=1)
    num_gpu_blocks_override: int | None = opt(
        None, "KV blocks per worker (default: mocker 16384; torch: sized from memory).", min=1
    )
    device: str | None = opt(None, "Torch engine device (default: cuda when available).", choices=DEVICES)
    dtype: str = opt(
        "auto",
        "Torch engine compute dtype (auto: bfloat16 on CUDA, and on CPUs with native bf16; else float32).",
        choices=DTYPES,
    )
    gguf_cache_dir: str | None = opt(
        None, "Where converted .gguf models are cached (default: ~/.cache/turbine/gguf)."
    )
    speedup_ratio: float = opt(1.0, "Divide simulated step times by this.", above=0)

    @property
    def is_gguf(self) -> bool:
        return is_gguf_file(self.model_path)


@dataclasses.dataclass(frozen=True)
class WorkerConfig(EngineOptions, RuntimeConfig):
    model_files_via: str = opt(
        "auto",
        "Publish the tokenizer/template files for frontends on other machines: store (discovery "
        "store), nats (JetStream object store), none; auto: nats with --request-plane nats, else store.",
        choices=MODEL_FILES_VIA,
    )
    component: str = opt("backend", "Discovery component name.")
    endpoint: str = opt("generate", "Discovery endpoint name.")
    model_type: str = opt(
        "chat,completions",
        "What the model serves, comma-separated: chat, completions, embedding (e.g. 'embedding').",
        pattern=comma_list(MODEL_TYPES),
    )
    host: str = opt("127.0.0.1", "Address the worker's request plane binds.")
    num_workers: int = opt(1, "Independent workers run in this process.", min=1)
    context_length: int | None = opt(None, "Override the model's context length.")
    drain_timeout_s: float = opt(60.0, "On SIGTERM, how long in-flight requests may take to finish.")
    # Scheduling engines (mocker, torch; names follow vLLM and Dynamo's mocker).
    max_num_seqs: int = opt(256, "Most sequences in one batch.", min=1)
    kv_events_interval_ms: float = opt(
        2.0,
        "Least time between two sends of this worker's KV events to each following frontend process "
        "while events keep coming (each send carries all that arrived meanwhile); 0: every batch at "
        "once. Longer costs every follower fewer wake-ups; routing sees events up to this much later.",
        min=0,
        max=1000,
    )
    max_num_batched_tokens: int | None = opt(
        None, "Token budget of one scheduler step (default 8192; torch on CPU 2048).", min=1
    )
    # Torch engine.
    gpu_memory_utilization: float = opt(
        0.9, "Torch engine on CUDA: fraction of GPU memory it may use.", above=0, max=1
    )
    enforce_eager: bool = opt(False, "Torch engine on CUDA: no CUDA graphs for decode steps.")
    kv_cache_memory_bytes: int | None = opt(
        None, "Torch engine on CPU: KV cache bytes per worker (1 GiB).", min=1
    )
    q4_max_rows: int | None = opt(
        None,
        "Torch engine on CPU in bfloat16: steps of at most this many tokens use a .gguf's Q4_0/Q4_1/Q4_K "
        "weights as stored (a 4-bit kernel, faster for few rows), larger steps the dequantized "
        "weights; 0: off. Default: 32 with Turbine's AMX kernel (--cpu-kernels), else 8.",
        min=0,
    )
    cpu_kernels: str = opt(
        "auto",
        "Torch engine on CPU: the kernel of those 4-bit steps: turbine (Turbine's AMX kernel, "
        "compiled on first use with the C++ compiler), torch (torch's int4 kernel), auto (turbine where "
        "it builds and the CPU has AMX, else torch).",
        choices=CPU_KERNELS,
    )
    load_format: str = opt(
        "auto",
        "Torch engine: auto (the checkpoint's weights) or dummy (random weights of the model's "
        "config.json shape drawn on the device, no weights read: for benchmarks; vLLM's flag).",
        choices=LOAD_FORMATS,
    )
    guided_decoding_threads: int | None = opt(
        None,
        "Torch engine: threads computing guided decoding's token masks, a step's rows together "
        "(default: a quarter of the CPUs, 1 to 4).",
        min=1,
    )
    override_generation_config: str | None = opt(
        None,
        "Torch engine: JSON object of default sampling knobs (temperature, top_p, top_k, min_p) over "
        "the model's generation_config.json, e.g. '{\"temperature\": 0.2}' (vLLM's flag).",
    )
    enable_prefix_caching: bool = opt(True, "Reuse cached prefix blocks.")
    eos_probability: float = opt(0.0, "Mocker: chance per decode step of ending with EOS.", min=0, max=1)
    # Echo.
    echo_delay_ms: float = opt(0.0, "Echo engine: delay between tokens.")
    # Scripted.
    script_file: str | None = opt(
        None,
        'Scripted engine: a reply text file, or a .json list of {"when": prompt substring, '
        '"reply": text} rules (first match wins; a rule without "when" always matches).',
    )
    # Output parsing, applied by frontends (carried in the model card).
    tool_call_parser: str | None = opt(
        None, "How the model writes tool calls (frontends parse them).", choices=TOOL_CALL_PARSERS
    )
    reasoning_parser: str | None = opt(
        None, "How the model marks its reasoning (frontends split it off).", choices=REASONING_PARSERS
    )
    # OpenAI-compatible upstream servers (--engine openai): turbine/engines/upstream/.
    upstream_url: tuple[str, ...] = opt(
        (),
        "--engine openai: base URL of an OpenAI-compatible server to front (vLLM, SGLang, llama.cpp); "
        "repeat for several, each becomes an instance (env: comma-separated). Formerly --upstream.",
        renamed_from="upstream",
        pattern=(r"https?://\S+", "an http(s):// URL"),
    )
    upstream_mode: str = opt(
        "auto",
        "--engine openai: send token ids (token) or the templated prompt text (text); auto probes.",
        choices=UPSTREAM_MODES,
    )
    upstream_dp_size: int = opt(
        1,
        "--engine openai: data-parallel ranks behind each upstream URL (vLLM): one instance per rank.",
        min=1,
    )
    upstream_poll_interval_s: float = opt(
        1.0, "--engine openai: how often each upstream's health and /metrics are polled.", above=0
    )
    upstream_api_key: str | None = opt(
        None, "--engine openai: bearer token sent to the upstreams.", secret=True
    )
    kv_events_endpoint: tuple[str, ...] = opt(
        (),
        "--engine openai: the engine's ZMQ KV-event PUB endpoint, one per --upstream-url in order "
        "(DP rank r at port + r; 'none' to skip one). Upstreams without events are routed from history.",
    )
    kv_replay_endpoint: tuple[str, ...] = opt(
        (), "--engine openai: the engine's ZMQ replay (ROUTER) endpoint, one per --kv-events-endpoint."
    )
    kv_events_topic: str = opt("", "--engine openai: ZMQ topic of the engines' KV events ('': all).")
    upstream_sampling_knobs: str = opt(
        "presence_penalty,frequency_penalty,repetition_penalty,logit_bias",
        "--engine openai: the sampling knobs the upstreams honour, comma-separated (of "
        "presence_penalty, frequency_penalty, repetition_penalty, logit_bias, bad_words, "
        "allowed_token_ids; vLLM takes all, SGLang and llama.cpp the default four); frontends "
        "refuse the others with a 400.",
        pattern=comma_list(SAMPLING_KNOBS, empty=True),
    )
    upstream_guided_decoding: str = opt("none", "--engine openai: " + GUIDED_HELP, choices=GUIDED_DIALECTS)

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.model_type.split(",") if t.strip())

    @property
    def upstream_knobs(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.upstream_sampling_knobs.split(",") if k.strip())

    def validate(self) -> None:
        if self.model_path is not None:
            path = Path(self.model_path)
            if self.is_gguf and self.engine in ("torch", "openai"):
                if not path.is_file():
                    raise ConfigError(f"--model-path {self.model_path!r} does not exist")
            elif not path.is_dir():
                raise ConfigError(f"--model-path {self.model_path!r} is not a directory")
        if self.engine == "torch" and self.model_path is None:
            raise ConfigError("--engine torch needs --model-path (a model directory or a .gguf file)")
        self.generation_overrides()  # raises on a malformed value
        if self.engine == "scripted" and (self.script_file is None or not Path(self.script_file).is_file()):
            raise ConfigError("--engine scripted needs --script-file naming an existing file")
        if (self.engine == "openai") != bool(self.upstream_url):
            raise ConfigError("--engine openai and --upstream-url URL go together")
        if len(self.kv_events_endpoint) > len(self.upstream_url):
            raise ConfigError("more --kv-events-endpoint than --upstream-url")
        if len(self.kv_replay_endpoint) > len(self.kv_events_endpoint):
            raise ConfigError("more --kv-replay-endpoint than --kv-events-endpoint")
        super().validate()

    def generation_overrides(self) -> dict[str, float]:
        """--override-generation-config, parsed and checked."""
        if self.override_generation_config is None:
            return {}
        try:
            raw = json.loads(self.override_generation_config)
        except ValueError:
            raise ConfigError("--override-generation-config is not valid JSON") from None
        allowed = ("temperature", "top_p", "top_k", "min_p")
        if not isinstance(raw, dict) or any(k not in allowed for k in raw):
            raise ConfigError(f"--override-generation-config must be a JSON object with keys among {allowed}")
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in raw.values()):
            raise ConfigError("--override-generation-config values must be numbers")
        return {k: float(v) for k, v in raw.items()}
