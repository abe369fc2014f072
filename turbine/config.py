"""Configuration: frozen dataclasses parsed once from argv and `TURBINE_*` environment variables.

This is the only module that reads argv or the environment. Every field is a flag (`--http-port`) and
an environment variable (`TURBINE_HTTP_PORT`); a flag wins over the environment, which wins over the
default. The field's docstring-like `help` is the flag's help text. Validation happens here, once,
and fails with one clear `ConfigError` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from turbine.choices import (
    AFFINITY_MODES,
    CPU_KERNELS,
    DEVICES,
    DISCOVERY_BACKENDS,
    DTYPES,
    ENGINES,
    EVENT_PLANES,
    GUIDED_DIALECTS,
    LOAD_COUNTING_MODES,
    LOAD_FORMATS,
    LOG_LEVELS,
    MODEL_FILES_VIA,
    QUEUE_POLICIES,
    REASONING_FIELD_NAMES,
    REASONING_PARSERS,
    REQUEST_PLANES,
    ROUTER_MODES,
    TOOL_CALL_PARSERS,
    UPSTREAM_MODES,
)
from turbine.errors import ConfigError
from turbine.protocol.model_card import MODEL_TYPES
from turbine.protocol.request import SAMPLING_KNOBS

log = logging.getLogger("turbine.config")

ENV_PREFIX = "TURBINE_"
# The few fields that also take a short flag.
SHORT_FLAGS = {"interactive": "-i"}
_GUIDED_HELP = (
    "the structured-output fields the upstream servers read: vllm (structured_outputs), sglang "
    "(json_schema/regex/ebnf), llama.cpp (json_schema/grammar; no regex) or none; frontends refuse "
    "the constraints the dialect cannot express with a 400."
)


def opt(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    min: float | None = None,
    above: float | None = None,
    max: float | None = None,
    off: float | None = None,
    pattern: tuple[str, str] | None = None,
    secret: bool = False,
    cli: bool = True,
    renamed_from: str | None = None,
) -> Any:
    """A config field: its default, help text, and its own rules, which `check_options` applies to
    every value (None, the unset value of an optional field, passes them all):
    `choices`: the allowed values; `min`/`max`: inclusive bounds; `above`: an exclusive lower bound;
    `off`: a value that turns the option off and need not meet the bounds; `pattern`: (regular
    expression the whole value matches, what it is in words). `secret`: redacted in dumps. `cli`:
    False for a setting one process hands another, which is no flag (only its variable).
    `renamed_from`: the field's old name, whose flag and variable still work with a warning."""
    rules = {"choices": choices, "min": min, "above": above, "max": max, "off": off, "pattern": pattern}
    flags = {"secret": secret, "cli": cli, "renamed_from": renamed_from}
    return dataclasses.field(default=default, metadata={"help": help, **flags, **rules})


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where a process finds the others: shared by frontends and workers."""

    namespace: str = opt(
        "turbine",
        "Discovery namespace; frontends see only workers of theirs.",
        pattern=(r"[^/]+", "a non-empty name without '/'"),
    )
    discovery_backend: str = opt(
        "file",
        "Discovery store: file (processes on one machine), mem (one process), etcd.",
        choices=DISCOVERY_BACKENDS,
    )
    file_store_path: str | None = opt(
        None, "Directory of the file discovery store (default: a per-user directory under the temp dir)."
    )
    etcd_endpoints: str = opt(
        "http://127.0.0.1:2379", "etcd client URLs for the etcd discovery store, comma-separated."
    )
    request_plane: str = opt("tcp", "Request plane transport.", choices=REQUEST_PLANES)
    nats_server: str = opt(
        "nats://127.0.0.1:4222", "NATS server URL (with --request-plane nats or --event-plane nats)."
    )
    event_plane: str = opt(
        "request",
        "Where KV events and load metrics travel: request (each frontend streams them from every "
        "worker over the request plane), nats (workers publish them on --nats-server) or zmq "
        "(workers publish them to the one frontend's --zmq-event-endpoint).",
        choices=EVENT_PLANES,
    )
    zmq_event_endpoint: str = opt(
        "tcp://127.0.0.1:5557",
        "With --event-plane zmq: the frontend binds it, workers connect to it (tcp://HOST:PORT or "
        "ipc://PATH; one frontend per endpoint).",
    )
    lease_ttl_s: float = opt(
        10.0, "Discovery lease TTL: a process that dies vanishes after this long.", above=0
    )
    request_stall_timeout_s: float = opt(
        10.0,
        "Request plane liveness (0: off). Frontend: a worker connection silent this long (no "
        "frame, not even a heartbeat) fails its streams, which --migration-limit moves on, and the "
        "worker is skipped by routing until it answers again. Worker: a frontend connection silent "
        "this long is closed and its requests stopped (their KV blocks freed); an upstream "
        "sidecar also cuts the streams of a server silent this long that no longer answers HTTP. "
        "Both ends send a heartbeat every 0.25 s whatever the requests are doing (queued, "
        "prefilling), so only a frozen or partitioned process goes silent. The default, the "
        "lease TTL's, outlasts GC and scheduling pauses by far and stays short next to clients' "
        "timeouts (Dynamo's DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS is off unless set). At least 1 s.",
        min=1,
        off=0,
    )
    # TLS between processes (turbine/runtime/transport/tls.py says who uses which file).
    tcp_tls_cert_path: str | None = opt(
        None, "TCP request plane, worker: serve TLS with this PEM certificate (needs --tcp-tls-key-path)."
    )
    tcp_tls_key_path: str | None = opt(
        None, "TCP request plane, worker: PEM private key of --tcp-tls-cert-path."
    )
    tcp_tls_ca_cert_path: str | None = opt(
        None,
        "TCP request plane, PEM CA bundle. Frontend: speak TLS and trust only workers' certificates "
        "signed by it. Worker (with --tcp-tls-cert-path): require frontends' client certificates "
        "signed by it (mTLS).",
    )
    tcp_tls_client_cert_path: str | None = opt(
        None, "TCP request plane, frontend: present this PEM client certificate (mTLS)."
    )
    tcp_tls_client_key_path: str | None = opt(
        None, "TCP request plane, frontend: PEM private key of --tcp-tls-client-cert-path."
    )
    nats_tls_ca_cert_path: str | None = opt(
        None, "NATS: connect with TLS and trust only servers whose certificate this PEM CA signed."
    )
    nats_tls_cert_path: str | None = opt(
        None, "NATS: present this PEM client certificate (servers that verify clients)."
    )
    nats_tls_key_path: str | None = opt(None, "NATS: PEM private key of --nats-tls-cert-path.")
    log_level: str = opt("info", "Log level.", choices=LOG_LEVELS)
    log_json: bool = opt(False, "Write logs as JSON lines.")
    dump_config_to: str | None = opt(None, "Write the resolved config as JSON to this file.")

    def validate(self) -> None:
        for cert, key in (
            ("tcp_tls_cert_path", "tcp_tls_key_path"),
            ("tcp_tls_client_cert_path", "tcp_tls_client_key_path"),
            ("nats_tls_cert_path", "nats_tls_key_path"),
        ):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ConfigError(f"{_flag(cert)} and {_flag(key)} must be given together")
        if "nats" in (self.request_plane, self.event_plane) and "://" not in self.nats_server:
            raise ConfigError(f"--nats-server {self.nats_server!r} is not a URL (e.g. nats://127.0.0.1:4222)")
        if self.event_plane == "zmq" and not _valid_zmq_endpoint(self.zmq_event_endpoint):
            raise ConfigError(
                f"--zmq-event-endpoint {self.zmq_event_endpoint!r} is not tcp://HOST:PORT or ipc://PATH"
            )


@dataclasses.dataclass(frozen=True)
class FrontendConfig(RuntimeConfig):
    http_host: str = opt("127.0.0.1", "Address the OpenAI HTTP server binds (0.0.0.0 to expose it).")
    http_port: int = opt(8000, "Port of the OpenAI HTTP server.", min=1, max=65535)
    kserve_grpc_server: bool = opt(
        False, "Also serve the KServe v2 gRPC API (on --http-host, --grpc-port) beside HTTP."
    )
    grpc_port: int = opt(
        8001, "Port of the KServe v2 gRPC server (with --kserve-grpc-server).", min=1, max=65535
    )
    grpc_metrics_port: int | None = opt(
        None,
        "Also serve Prometheus /metrics on this port (for gRPC deployments that scrape apart).",
        min=1,
        max=65535,
    )
    model_name: str | None = opt(None, "Serve only this model name (default: every discovered model).")
    model_path: str | None = opt(
        None, "Local model directory whose tokenizer and chat template override the workers' cards."
    )
    model_cache_dir: str | None = opt(
        None,
        "Where model files fetched from workers' cards are cached (default: a per-user directory "
        "under the temp dir).",
    )
    router_mode: str = opt("round-robin", "How to pick a worker.", choices=ROUTER_MODES)
    kv_overlap_score_weight: float = opt(
        1.0, "KV router: weight of the prefill cost (uncached blocks) against the decode cost.", min=0
    )
    router_temperature: float = opt(
        0.0, "KV router: 0 picks the cheapest worker; above 0 samples from a softmax over costs.", min=0
    )
    kv_events: bool = opt(
        True, "KV router: follow workers' KV events (--no-kv-events: approximate from routing history)."
    )
    router_replica_sync: bool = opt(
        False,
        "Share each model router's active load with the other frontends over the event plane "
        "(needs --event-plane nats), so replicas do not pile the same burst onto one worker.",
    )
    router_ttl_secs: float = opt(
        120.0, "KV router without events: how long a routed prefix counts as cached.", above=0
    )
    active_decode_blocks_threshold: float | None = opt(
        None,
        "A worker whose active decode blocks exceed this fraction of its KV blocks is busy (skipped).",
        above=0,
    )
    active_prefill_tokens_threshold: int | None = opt(
        None, "A worker with more active prefill tokens than this is busy (skipped).", min=1
    )
    kv_cache_block_size: int | None = opt(
        None, "Block size the KV router hashes with (default: the workers' advertised block size).", min=1
    )
    router_queue_threshold: float | None = opt(
        None,
        "Router queue: a worker whose active prefill tokens exceed this fraction of its max batched "
        "tokens is busy; when every candidate is busy requests wait in the router's queue instead of "
        "getting 503 (needs --router-mode kv, least-loaded or power-of-two; default: no queue).",
        above=0,
    )
    router_queue_policy: str = opt(
        "fcfs",
        "Router queue order: fcfs (arrival), wspt (least predicted prefill work, i.e. uncached prompt "
        "tokens, first).",
        choices=QUEUE_POLICIES,
    )
    router_max_queued: int = opt(
        1024, "Router queue: most waiting requests per model; beyond it 503 with Retry-After.", min=0
    )
    router_session_affinity_ttl_secs: float | None = opt(
        None,
        "Session affinity: requests of one session (x-session-id header, else the request's user "
        "field) go to the worker the session is bound to; the binding expires this long after its "
        "last use (default: off).",
        above=0,
    )
    router_session_affinity_mode: str = opt(
        "soft",
        "Session affinity: hard (the bound worker is a constraint until it leaves) or soft (a "
        "preference a busy worker loses).",
        choices=AFFINITY_MODES,
    )
    router_min_initial_workers: int = opt(
        0,
        "A model is not ready (503, /health 503) until this many of its workers have been live.",
        min=0,
    )
    migration_max_seq_len: int | None = opt(
        None,
        "Do not migrate a stream whose prompt + generated tokens exceed this; fail it instead.",
        min=1,
    )
    max_request_body_bytes: int = opt(32 * 1024 * 1024, "Larger request bodies get 413.", min=1024)
    drain_timeout_s: float = opt(30.0, "On SIGTERM, how long in-flight requests may take to finish.")
    metrics_prefix: str = opt(
        "turbine",
        "Prefix of the Prometheus metric names served at /metrics.",
        pattern=(r"[a-zA-Z_:][a-zA-Z0-9_:]*", "a valid Prometheus metric name"),
    )
    migration_limit: int = opt(
        0,
        "How many times a stream broken by a failing worker may continue on another one (0: never).",
        min=0,
    )
    health_check_interval_s: float = opt(
        0.0,
        "Canary health checks (0: off): every this many seconds each worker that served nothing "
        "meanwhile gets a one-token request; one that fails or times out is skipped by routing "
        "until a canary passes. Off by default: heartbeats (--request-stall-timeout-s) already "
        "catch frozen processes at no cost, and a canary spends a forward pass per idle worker; "
        "turn it on to also catch an engine that hangs while its process still answers.",
        min=0,
    )
    health_check_timeout_s: float = opt(
        10.0,
        "How long a canary (--health-check-interval-s) may take before the worker is skipped.",
        above=0,
    )
    tokenizer_threads: int = opt(2, "Threads tokenizing long prompts off the event loop.", min=1)
    exp_python_factory: str | None = opt(
        None, "module:function building a Python engine per discovered model (experimental)."
    )
    tokenizer_cache_entries: int = opt(
        256,
        "Long prompt pieces (e.g. shared system prompts) kept tokenized; 0 turns the cache off.",
        min=0,
    )
    # TLS: paths are not secrets (the key file's contents are), so they stay visible in dumps.
    tls_cert_path: str | None = opt(
        None, "Serve HTTPS with this PEM certificate chain (needs --tls-key-path)."
    )
    tls_key_path: str | None = opt(None, "PEM private key of --tls-cert-path.")
    tls_client_ca_cert_path: str | None = opt(
        None, "Require client certificates signed by this PEM CA bundle (mTLS; needs --tls-cert-path)."
    )
    enable_anthropic_api: bool = opt(
        False, "Also serve Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens."
    )
    tool_call_parser: str | None = opt(
        None,
        "Parse tool calls of every model with this parser (default: each worker's --tool-call-parser).",
        choices=TOOL_CALL_PARSERS,
    )
    reasoning_parser: str | None = opt(
        None,
        "Split reasoning off every model's answers with this parser (default: each worker's "
        "--reasoning-parser).",
        choices=REASONING_PARSERS,
    )
    reasoning_field_name: str = opt(
        "reasoning_content",
        "Field of chat messages and deltas that carries reasoning.",
        choices=REASONING_FIELD_NAMES,
    )
    exclude_tools_when_tool_choice_none: bool = opt(
        False, 'With tool_choice "none", do not show the request\'s tools to the chat template.'
    )
    interactive: bool = opt(False, "Chat with a discovered model in the terminal instead of serving HTTP.")
    interactive_max_tokens: int | None = opt(
        None, "Interactive mode: most tokens per answer (default: up to the context length).", min=1
    )
    interactive_system_prompt: str | None = opt(None, "Interactive mode: system prompt of the conversation.")
    upstream: tuple[str, ...] = opt(
        (),
        "MODEL=URL: front an OpenAI-compatible server (vLLM, SGLang, llama.cpp) from this process; "
        "repeat for several (env: comma-separated). Needs --model-path for the tokenizer.",
    )
    upstream_file: str | None = opt(
        None,
        "A file of upstream servers to front, one MODEL=URL per line ('#' starts a comment); "
        "added to --upstream.",
    )
    upstream_guided_decoding: str = opt("none", "--upstream: " + _GUIDED_HELP, choices=GUIDED_DIALECTS)

    @property
    def upstreams(self) -> tuple[str, ...]:
        """--upstream plus the lines of --upstream-file (read at start-up)."""
        if self.upstream_file is None:
            return self.upstream
        try:
            text = Path(self.upstream_file).read_text()
        except OSError as exc:
            raise ConfigError(
                f"--upstream-file {self.upstream_file!r} cannot be read: {exc.strerror}"
            ) from None
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        return (*self.upstream, *(line for line in lines if line))

    num_processes: str = opt(
        "1",
        "Frontend processes serving the same ports (SO_REUSEPORT) under one supervisor, sharing "
        "their routing load over a local channel; auto: one per core available to the process.",
        pattern=(r"auto|0*[1-9][0-9]*", "a positive integer or auto"),
    )
    frontend_process_dir: str | None = opt(
        None,
        "Set by the --num-processes supervisor for its children: the private directory of their "
        "local channel and metrics.",
        cli=False,
    )

    @property
    def process_count(self) -> int:
        """--num-processes resolved (auto: the cores this process may run on)."""
        if self.num_processes == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return int(self.num_processes)

    def _validate_processes(self) -> None:
        if self.process_count == 1:
            return
        if self.frontend_process_dir is not None:
            variable = _env_name("frontend_process_dir")
            raise ConfigError(f"{variable} is for the children of one supervisor (--num-processes 1)")
        if self.interactive:
            raise ConfigError("--interactive runs in one process (--num-processes 1)")
        if self.upstream or self.upstream_file:
            # Each process would register the same servers again as workers of its own.
            raise ConfigError("--upstream runs in one frontend process (--num-processes 1)")
        if self.discovery_backend == "mem":
            raise ConfigError(
                "--num-processes above 1 needs a shared discovery store (file or etcd), not mem"
            )
        if self.event_plane == "zmq":
            # Only one process can bind --zmq-event-endpoint.
            raise ConfigError("--num-processes above 1 needs --event-plane request or nats, not zmq")

    def validate(self) -> None:
        self._validate_processes()
        if self.grpc_metrics_port in (self.http_port, self.grpc_port):
            raise ConfigError("--grpc-metrics-port must differ from --http-port and --grpc-port")
        if self.kserve_grpc_server and self.grpc_port == self.http_port:
            raise ConfigError("--grpc-port must differ from --http-port")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ConfigError("--tls-cert-path and --tls-key-path must be given together")
        if self.tls_client_ca_cert_path is not None and self.tls_cert_path is None:
            raise ConfigError("--tls-client-ca-cert-path needs --tls-cert-path and --tls-key-path")
        if self.model_path is not None and not Path(self.model_path).is_dir():
            # --upstream takes the GGUF file the llama.cpp server runs (its tokenizer is read from it).
            gguf = _is_gguf(self.model_path) and bool(self.upstreams)
            if not gguf:
                raise ConfigError(f"--model-path {self.model_path!r} is not a directory")
            if not Path(self.model_path).is_file():
                raise ConfigError(f"--model-path {self.model_path!r} does not exist")
        if self.router_replica_sync and self.event_plane != "nats":
            # zmq has one subscriber per endpoint, so frontends cannot hear each other on it.
            raise ConfigError("--router-replica-sync needs --event-plane nats (shared by every frontend)")
        for spec in self.upstreams:
            name, _, url = spec.partition("=")
            if not name or not url.startswith(("http://", "https://")):
                raise ConfigError(f"--upstream {spec!r} is not MODEL=http(s)://HOST:PORT")
        if self.upstreams and self.model_path is None:
            raise ConfigError("--upstream needs --model-path (the upstream model's tokenizer and template)")
        if (
            self.router_replica_sync
            and self.router_mode not in LOAD_COUNTING_MODES
            and self.router_session_affinity_ttl_secs is None
        ):
            raise ConfigError(
                "--router-replica-sync needs --router-mode kv, least-loaded or power-of-two, or "
                "--router-session-affinity-ttl-secs"
            )
        if self.router_queue_threshold is not None and self.router_mode not in LOAD_COUNTING_MODES:
            raise ConfigError("--router-queue-threshold needs --router-mode kv, least-loaded or power-of-two")
        if self.router_session_affinity_ttl_secs is not None and self.router_mode == "direct":
            raise ConfigError("--router-session-affinity-ttl-secs does not apply to --router-mode direct")
        super().validate()


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
        return _is_gguf(self.model_path)


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
    )
    upstream_guided_decoding: str = opt("none", "--engine openai: " + _GUIDED_HELP, choices=GUIDED_DIALECTS)

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
        unknown = set(self.upstream_knobs) - set(SAMPLING_KNOBS)
        if unknown:
            raise ConfigError(
                f"--upstream-sampling-knobs: unknown {', '.join(sorted(unknown))} "
                f"(known: {', '.join(SAMPLING_KNOBS)})"
            )
        if len(self.kv_replay_endpoint) > len(self.kv_events_endpoint):
            raise ConfigError("more --kv-replay-endpoint than --kv-events-endpoint")
        for url in self.upstream_url:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"--upstream-url {url!r} is not an http(s):// URL")
        types = self.model_types
        if not types or any(t not in MODEL_TYPES for t in types):
            raise ConfigError(
                f"--model-type {self.model_type!r}: each must be one of {', '.join(MODEL_TYPES)}"
            )
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


@dataclasses.dataclass(frozen=True)
class UpConfig(EngineOptions, FrontendConfig):
    """`turbine up`: the frontend's options and the engine's, which it hands to its workers."""

    engine: str = opt(
        "torch",
        "Engine of the workers: torch (a real model; default SmolLM2-135M-Instruct on the CPU), "
        "mocker (simulated, for load tests) or echo.",
        choices=ENGINES,
    )
    workers: int | None = opt(
        None, "Workers to start beside the frontend (default: torch 1, mocker 2).", min=1
    )

    @property
    def num_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return 1 if self.engine == "torch" else 2

    def frontend_config(self) -> FrontendConfig:
        cfg = FrontendConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FrontendConfig)})
        # The torch workers publish the tokenizer and template; a .gguf is no directory for the frontend.
        return dataclasses.replace(cfg, model_path=None) if self.engine == "torch" else cfg

    def worker_config(self) -> WorkerConfig:
        """The workers': UP_WORKER_FIELDS and --num-workers from here, the rest their defaults."""
        return WorkerConfig(
            **{name: getattr(self, name) for name in UP_WORKER_FIELDS}, num_workers=self.num_workers
        )

    def validate(self) -> None:
        if self.is_gguf:
            # A .gguf file is for the workers; the frontend reads the files they publish.
            assert self.model_path is not None
            if self.engine != "torch":
                raise ConfigError("--model-path FILE.gguf needs --engine torch")
            if not Path(self.model_path).is_file():
                raise ConfigError(f"--model-path {self.model_path!r} does not exist")
            dataclasses.replace(self, model_path=None).validate()
            return
        super().validate()


# What `turbine up` decides for its workers: every runtime option but the dump, and the engine's.
UP_WORKER_FIELDS = tuple(
    field.name
    for field in (*dataclasses.fields(RuntimeConfig), *dataclasses.fields(EngineOptions))
    if field.name != "dump_config_to"
)


def _is_gguf(path: str | None) -> bool:
    return path is not None and path.lower().endswith(".gguf")


# tcp://HOST:PORT (a name, an IPv4 address, [IPv6], or * to bind every interface) or ipc://PATH.
_ZMQ_ENDPOINT = re.compile(r"tcp://(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]|\*):([0-9]{1,5})|ipc://\S+")


def _valid_zmq_endpoint(endpoint: str) -> bool:
    match = _ZMQ_ENDPOINT.fullmatch(endpoint)
    return match is not None and (match[1] is None or 1 <= int(match[1]) <= 65535)


def check_options(cfg: RuntimeConfig) -> None:
    """Each field's own rules, declared with `opt` (ConfigError naming the first it breaks)."""
    for field in dataclasses.fields(cfg):
        value, rules = getattr(cfg, field.name), field.metadata
        if value is None or value == rules.get("off"):
            continue
        flag, pattern = _flag(field.name), rules.get("pattern")
        if pattern is not None and not re.fullmatch(pattern[0], value):
            raise ConfigError(f"{flag} {value!r} is not {pattern[1]}")
        low, above, high = rules.get("min"), rules.get("above"), rules.get("max")
        # `not` of the comparisons that hold, so that NaN fails them all.
        if not (
            (low is None or value >= low)
            and (above is None or value > above)
            and (high is None or value <= high)
        ):
            raise ConfigError(_bound_message(flag, value, low, above, high, rules.get("off")))


def _bound_message(
    flag: str, value: object, low: float | None, above: float | None, high: float | None, off: float | None
) -> str:
    if high is not None:
        start = f"[{low:g}" if low is not None else f"({above:g}"
        return f"{flag} {value} is out of range: must be within {start}, {high:g}]"
    if off is not None:
        return f"{flag} must be {off:g} (off) or at least {low:g}"
    if above is not None:
        return f"{flag} must be positive" if above == 0 else f"{flag} must be above {above:g}"
    assert low is not None
    return f"{flag} must not be negative" if low == 0 else f"{flag} must be at least {low:g}"


# ------------------------------------------------------------------------------------- parsing

C = TypeVar("C", RuntimeConfig, FrontendConfig, WorkerConfig, UpConfig)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _field_type(field: dataclasses.Field[Any]) -> type:
    text = str(field.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("tuple", tuple)):
        if text.startswith(name):
            return kind
    return str


def _convert(kind: type, raw: str, source: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{source}={raw!r} is not a boolean")
    if kind is tuple:  # repeatable flags; in the environment, comma-separated
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{source}={raw!r} is not a valid {kind.__name__}") from None


def build_parser(cls: type[C], prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for field in dataclasses.fields(cls):
        if not field.metadata.get("cli", True):
            continue  # set by a parent process, through the environment only
        _add_flag(parser, field, field.name, f"{field.metadata['help']} [env {_env_name(field.name)}]")
        if field.metadata.get("renamed_from"):
            _add_flag(parser, field, field.metadata["renamed_from"], argparse.SUPPRESS)
    return parser


def _add_flag(parser: argparse.ArgumentParser, field: dataclasses.Field[Any], name: str, help: str) -> None:
    kind = _field_type(field)
    flags = [_flag(name), *([SHORT_FLAGS[name]] if name in SHORT_FLAGS else [])]
    if kind is bool:
        parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help)
    elif kind is tuple:
        parser.add_argument(*flags, dest=name, action="append", default=None, help=help)
    else:
        parser.add_argument(*flags, dest=name, type=str, default=None, metavar=name.upper(), help=help)


def _given(field: dataclasses.Field[Any], args: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str, Any]:
    """(where, raw value) of a field: its flag, else its variable, else ("", None). A renamed
    field's old spelling counts after the new one, with a warning; repeated flags of both add up."""
    old = field.metadata.get("renamed_from")
    names = (field.name, old) if old else (field.name,)
    flags = [(_flag(name), args[name]) for name in names if args.get(name) is not None]
    variables = [(_env_name(name), env[_env_name(name)]) for name in names if _env_name(name) in env]
    found = [*flags, *variables]
    used = flags if flags and _field_type(field) is tuple else found[:1]
    deprecated = [source for source, _ in used if old and source in (_flag(old), _env_name(old))]
    if deprecated:
        log.warning(
            "%s is deprecated: use %s (the old spelling stops working in a later release)",
            deprecated[0],
            _flag(field.name) if deprecated[0].startswith("--") else _env_name(field.name),
        )
    if len(used) > 1:  # the new and the old flag of a repeatable field
        return used[0][0], [item for _, raw in used for item in raw]
    return used[0] if used else ("", None)


def parse_config(
    cls: type[C], argv: Sequence[str], env: Mapping[str, str], *, prog: str, description: str = ""
) -> C:
    """Parse and validate; raises ConfigError (argparse itself exits 2 on unknown flags)."""
    args = vars(build_parser(cls, prog, description).parse_args(list(argv)))
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        kind = _field_type(field)
        source, raw = _given(field, args, env)
        if raw is None:
            continue
        if source.startswith("--"):
            values[field.name] = (
                tuple(raw) if kind is tuple else raw if kind is bool else _convert(kind, raw, source)
            )
        else:
            values[field.name] = _convert(kind, raw, source)
        choices = field.metadata.get("choices")
        if choices and values[field.name] not in choices:
            raise ConfigError(f"{source} {values[field.name]!r} is not one of: {', '.join(choices)}")
    cfg = cls(**values)
    check_options(cfg)
    cfg.validate()
    return cfg


def config_to_env(cfg: RuntimeConfig, names: Collection[str] | None = None) -> dict[str, str | None]:
    """Every field (or those of `names`) as its `TURBINE_*` variable, for a child process that must
    resolve the same config (None: unset it, the field's default). Env rather than argv keeps
    secrets off `ps`."""
    out: dict[str, str | None] = {}
    for field in dataclasses.fields(cfg):
        if names is not None and field.name not in names:
            continue
        value = getattr(cfg, field.name)
        if isinstance(value, tuple):  # repeatable flags: comma-separated in the environment
            out[_env_name(field.name)] = ",".join(value) if value else None
        elif isinstance(value, bool):
            out[_env_name(field.name)] = str(value).lower()
        else:
            out[_env_name(field.name)] = None if value is None else str(value)
    return out


def config_to_json(cfg: RuntimeConfig) -> str:
    """The resolved config, secrets redacted, for --dump-config-to."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        out[field.name] = "<redacted>" if field.metadata.get("secret") and value else value
    return json.dumps(out, indent=2, sort_keys=True)


def config_from_cli(cls: type[C], argv: Sequence[str] | None, *, prog: str, description: str) -> C | None:
    """Parse the process's flags and environment for an entry point; on a config error print one
    clear line to stderr and return None (the caller exits 2). Also writes --dump-config-to."""
    try:
        cfg = parse_config(
            cls, sys.argv[1:] if argv is None else argv, os.environ, prog=prog, description=description
        )
    except ConfigError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return None
    if cfg.dump_config_to:
        Path(cfg.dump_config_to).write_text(config_to_json(cfg) + "\n")
    return cfg
