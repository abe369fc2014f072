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
import os
import re
import sys
from collections.abc import Mapping, Sequence
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

ENV_PREFIX = "TURBINE_"
# The few fields that also take a short flag.
SHORT_FLAGS = {"interactive": "-i"}
_GUIDED_HELP = (
    "the structured-output fields the upstream servers read: vllm (structured_outputs), sglang "
    "(json_schema/regex/ebnf), llama.cpp (json_schema/grammar; no regex) or none; frontends refuse "
    "the constraints the dialect cannot express with a 400."
)


def opt(default: Any, help: str, *, choices: Sequence[str] | None = None, secret: bool = False) -> Any:
    """A config field: its default, help text, allowed values, and whether to redact it in dumps."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "secret": secret})


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where a process finds the others: shared by frontends and workers."""

    namespace: str = opt("turbine", "Discovery namespace; frontends see only workers of theirs.")
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
    lease_ttl_s: float = opt(10.0, "Discovery lease TTL: a process that dies vanishes after this long.")
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
        if self.lease_ttl_s <= 0:
            raise ConfigError("--lease-ttl-s must be positive")
        if self.request_stall_timeout_s != 0 and not self.request_stall_timeout_s >= 1.0:
            raise ConfigError("--request-stall-timeout-s must be 0 (off) or at least 1 second")
        if not self.namespace or "/" in self.namespace:
            raise ConfigError("--namespace must be non-empty and contain no '/'")
        if "nats" in (self.request_plane, self.event_plane) and "://" not in self.nats_server:
            raise ConfigError(f"--nats-server {self.nats_server!r} is not a URL (e.g. nats://127.0.0.1:4222)")
        if self.event_plane == "zmq" and not _valid_zmq_endpoint(self.zmq_event_endpoint):
            raise ConfigError(
                f"--zmq-event-endpoint {self.zmq_event_endpoint!r} is not tcp://HOST:PORT or ipc://PATH"
            )


@dataclasses.dataclass(frozen=True)
class FrontendConfig(RuntimeConfig):
    http_host: str = opt("127.0.0.1", "Address the OpenAI HTTP server binds (0.0.0.0 to expose it).")
    http_port: int = opt(8000, "Port of the OpenAI HTTP server.")
    kserve_grpc_server: bool = opt(
        False, "Also serve the KServe v2 gRPC API (on --http-host, --grpc-port) beside HTTP."
    )
    grpc_port: int = opt(8001, "Port of the KServe v2 gRPC server (with --kserve-grpc-server).")
    grpc_metrics_port: int | None = opt(
        None, "Also serve Prometheus /metrics on this port (for gRPC deployments that scrape apart)."
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
        1.0, "KV router: weight of the prefill cost (uncached blocks) against the decode cost."
    )
    router_temperature: float = opt(
        0.0, "KV router: 0 picks the cheapest worker; above 0 samples from a softmax over costs."
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
        120.0, "KV router without events: how long a routed prefix counts as cached."
    )
    active_decode_blocks_threshold: float | None = opt(
        None, "A worker whose active decode blocks exceed this fraction of its KV blocks is busy (skipped)."
    )
    active_prefill_tokens_threshold: int | None = opt(
        None, "A worker with more active prefill tokens than this is busy (skipped)."
    )
    kv_cache_block_size: int | None = opt(
        None, "Block size the KV router hashes with (default: the workers' advertised block size)."
    )
    router_queue_threshold: float | None = opt(
        None,
        "Router queue: a worker whose active prefill tokens exceed this fraction of its max batched "
        "tokens is busy; when every candidate is busy requests wait in the router's queue instead of "
        "getting 503 (needs --router-mode kv, least-loaded or power-of-two; default: no queue).",
    )
    router_queue_policy: str = opt(
        "fcfs",
        "Router queue order: fcfs (arrival), wspt (least predicted prefill work, i.e. uncached prompt "
        "tokens, first).",
        choices=QUEUE_POLICIES,
    )
    router_max_queued: int = opt(
        1024, "Router queue: most waiting requests per model; beyond it 503 with Retry-After."
    )
    router_session_affinity_ttl_secs: float | None = opt(
        None,
        "Session affinity: requests of one session (x-session-id header, else the request's user "
        "field) go to the worker the session is bound to; the binding expires this long after its "
        "last use (default: off).",
    )
    router_session_affinity_mode: str = opt(
        "soft",
        "Session affinity: hard (the bound worker is a constraint until it leaves) or soft (a "
        "preference a busy worker loses).",
        choices=AFFINITY_MODES,
    )
    router_min_initial_workers: int = opt(
        0, "A model is not ready (503, /health 503) until this many of its workers have been live."
    )
    migration_max_seq_len: int | None = opt(
        None, "Do not migrate a stream whose prompt + generated tokens exceed this; fail it instead."
    )
    max_request_body_bytes: int = opt(32 * 1024 * 1024, "Larger request bodies get 413.")
    drain_timeout_s: float = opt(30.0, "On SIGTERM, how long in-flight requests may take to finish.")
    metrics_prefix: str = opt("turbine", "Prefix of the Prometheus metric names served at /metrics.")
    migration_limit: int = opt(
        0, "How many times a stream broken by a failing worker may continue on another one (0: never)."
    )
    health_check_interval_s: float = opt(
        0.0,
        "Canary health checks (0: off): every this many seconds each worker that served nothing "
        "meanwhile gets a one-token request; one that fails or times out is skipped by routing "
        "until a canary passes. Off by default: heartbeats (--request-stall-timeout-s) already "
        "catch frozen processes at no cost, and a canary spends a forward pass per idle worker; "
        "turn it on to also catch an engine that hangs while its process still answers.",
    )
    health_check_timeout_s: float = opt(
        10.0, "How long a canary (--health-check-interval-s) may take before the worker is skipped."
    )
    tokenizer_threads: int = opt(2, "Threads tokenizing long prompts off the event loop.")
    exp_python_factory: str | None = opt(
        None, "module:function building a Python engine per discovered model (experimental)."
    )
    tokenizer_cache_entries: int = opt(
        256, "Long prompt pieces (e.g. shared system prompts) kept tokenized; 0 turns the cache off."
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
        None, "Interactive mode: most tokens per answer (default: up to the context length)."
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
    )
    frontend_process_dir: str | None = opt(
        None,
        "Set by the --num-processes supervisor for its children: the private directory of their "
        "local channel and metrics (not for direct use).",
    )

    @property
    def process_count(self) -> int:
        """--num-processes resolved (auto: the cores this process may run on)."""
        if self.num_processes == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return int(self.num_processes)

    def _validate_processes(self) -> None:
        if self.num_processes != "auto" and not (
            self.num_processes.isdigit() and int(self.num_processes) >= 1
        ):
            raise ConfigError(f"--num-processes {self.num_processes!r} is not a positive integer or auto")
        if self.process_count == 1:
            return
        if self.frontend_process_dir is not None:
            raise ConfigError(
                "--frontend-process-dir is for the children of one supervisor (--num-processes 1)"
            )
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
        _check_port("--http-port", self.http_port)
        _check_port("--grpc-port", self.grpc_port)
        if self.grpc_metrics_port is not None:
            _check_port("--grpc-metrics-port", self.grpc_metrics_port)
            if self.grpc_metrics_port in (self.http_port, self.grpc_port):
                raise ConfigError("--grpc-metrics-port must differ from --http-port and --grpc-port")
        if self.kserve_grpc_server and self.grpc_port == self.http_port:
            raise ConfigError("--grpc-port must differ from --http-port")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ConfigError("--tls-cert-path and --tls-key-path must be given together")
        if self.tls_client_ca_cert_path is not None and self.tls_cert_path is None:
            raise ConfigError("--tls-client-ca-cert-path needs --tls-cert-path and --tls-key-path")
        if self.interactive_max_tokens is not None and self.interactive_max_tokens < 1:
            raise ConfigError("--interactive-max-tokens must be at least 1")
        if self.model_path is not None and not Path(self.model_path).is_dir():
            # --upstream takes the GGUF file the llama.cpp server runs (its tokenizer is read from it).
            gguf = self.model_path.lower().endswith(".gguf") and bool(self.upstreams)
            if not gguf:
                raise ConfigError(f"--model-path {self.model_path!r} is not a directory")
            if not Path(self.model_path).is_file():
                raise ConfigError(f"--model-path {self.model_path!r} does not exist")
        if self.max_request_body_bytes < 1024:
            raise ConfigError("--max-request-body-bytes must be at least 1024")
        if self.migration_limit < 0:
            raise ConfigError("--migration-limit must not be negative")
        if not self.health_check_interval_s >= 0:  # written so that NaN fails too
            raise ConfigError("--health-check-interval-s must not be negative")
        if not self.health_check_timeout_s > 0:
            raise ConfigError("--health-check-timeout-s must be positive")
        if self.tokenizer_cache_entries < 0:
            raise ConfigError("--tokenizer-cache-entries must not be negative")
        if self.tokenizer_threads < 1:
            raise ConfigError("--tokenizer-threads must be at least 1")
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", self.metrics_prefix):
            raise ConfigError(
                f"--metrics-prefix {self.metrics_prefix!r} is not a valid Prometheus metric name"
            )
        if self.router_temperature < 0 or self.kv_overlap_score_weight < 0:
            raise ConfigError("--router-temperature and --kv-overlap-score-weight must not be negative")
        if self.router_ttl_secs <= 0:
            raise ConfigError("--router-ttl-secs must be positive")
        if self.active_decode_blocks_threshold is not None and self.active_decode_blocks_threshold <= 0:
            raise ConfigError("--active-decode-blocks-threshold must be positive")
        if self.active_prefill_tokens_threshold is not None and self.active_prefill_tokens_threshold < 1:
            raise ConfigError("--active-prefill-tokens-threshold must be at least 1")
        if self.kv_cache_block_size is not None and self.kv_cache_block_size < 1:
            raise ConfigError("--kv-cache-block-size must be at least 1")
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
        if self.router_queue_threshold is not None:
            if self.router_queue_threshold <= 0:
                raise ConfigError("--router-queue-threshold must be positive")
            if self.router_mode not in LOAD_COUNTING_MODES:
                raise ConfigError(
                    "--router-queue-threshold needs --router-mode kv, least-loaded or power-of-two"
                )
        if self.router_max_queued < 0:
            raise ConfigError("--router-max-queued must not be negative")
        ttl = self.router_session_affinity_ttl_secs
        if ttl is not None and ttl <= 0:
            raise ConfigError("--router-session-affinity-ttl-secs must be positive")
        if ttl is not None and self.router_mode == "direct":
            raise ConfigError("--router-session-affinity-ttl-secs does not apply to --router-mode direct")
        if self.router_min_initial_workers < 0:
            raise ConfigError("--router-min-initial-workers must not be negative")
        if self.migration_max_seq_len is not None and self.migration_max_seq_len < 1:
            raise ConfigError("--migration-max-seq-len must be at least 1")
        super().validate()


@dataclasses.dataclass(frozen=True)
class WorkerConfig(RuntimeConfig):
    engine: str = opt("mocker", "Engine to serve.", choices=ENGINES)
    model_path: str | None = opt(
        None,
        "Model directory (tokenizer, template, config; safetensors weights for --engine torch) or, "
        "for --engine torch, a .gguf file; default: the bundled tiny tokenizer (mocker, echo).",
    )
    model_name: str | None = opt(None, "Served model name (default: the model directory's name).")
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
    num_workers: int = opt(1, "Independent workers run in this process.")
    context_length: int | None = opt(None, "Override the model's context length.")
    drain_timeout_s: float = opt(60.0, "On SIGTERM, how long in-flight requests may take to finish.")
    # Scheduling engines (mocker, torch; names follow vLLM and Dynamo's mocker).
    block_size: int = opt(64, "KV block size in tokens.")
    num_gpu_blocks_override: int | None = opt(
        None, "KV blocks per worker (default: mocker 16384; torch: sized from memory)."
    )
    max_num_seqs: int = opt(256, "Most sequences in one batch.")
    kv_events_interval_ms: float = opt(
        2.0,
        "Least time between two sends of this worker's KV events to each following frontend process "
        "while events keep coming (each send carries all that arrived meanwhile); 0: every batch at "
        "once. Longer costs every follower fewer wake-ups; routing sees events up to this much later.",
    )
    max_num_batched_tokens: int | None = opt(
        None, "Token budget of one scheduler step (default 8192; torch on CPU 2048)."
    )
    # Torch engine.
    device: str | None = opt(None, "Torch engine device (default: cuda when available).", choices=DEVICES)
    dtype: str = opt(
        "auto",
        "Torch engine compute dtype (auto: bfloat16 on CUDA, and on CPUs with native bf16; else float32).",
        choices=DTYPES,
    )
    gpu_memory_utilization: float = opt(0.9, "Torch engine on CUDA: fraction of GPU memory it may use.")
    enforce_eager: bool = opt(False, "Torch engine on CUDA: no CUDA graphs for decode steps.")
    kv_cache_memory_bytes: int | None = opt(None, "Torch engine on CPU: KV cache bytes per worker (1 GiB).")
    q4_max_rows: int | None = opt(
        None,
        "Torch engine on CPU in bfloat16: steps of at most this many tokens use a .gguf's Q4_0/Q4_1/Q4_K "
        "weights as stored (a 4-bit kernel, faster for few rows), larger steps the dequantized "
        "weights; 0: off. Default: 32 with Turbine's AMX kernel (--cpu-kernels), else 8.",
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
    gguf_cache_dir: str | None = opt(
        None, "Where converted .gguf models are cached (default: ~/.cache/turbine/gguf)."
    )
    speedup_ratio: float = opt(1.0, "Divide simulated step times by this.")
    enable_prefix_caching: bool = opt(True, "Reuse cached prefix blocks.")
    eos_probability: float = opt(0.0, "Mocker: chance per decode step of ending with EOS.")
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
    upstream: tuple[str, ...] = opt(
        (),
        "--engine openai: base URL of an OpenAI-compatible server to front (vLLM, SGLang, llama.cpp); "
        "repeat for several, each becomes an instance (env: comma-separated).",
    )
    upstream_mode: str = opt(
        "auto",
        "--engine openai: send token ids (token) or the templated prompt text (text); auto probes.",
        choices=UPSTREAM_MODES,
    )
    upstream_dp_size: int = opt(
        1, "--engine openai: data-parallel ranks behind each upstream URL (vLLM): one instance per rank."
    )
    upstream_poll_interval_s: float = opt(
        1.0, "--engine openai: how often each upstream's health and /metrics are polled."
    )
    upstream_api_key: str | None = opt(
        None, "--engine openai: bearer token sent to the upstreams.", secret=True
    )
    kv_events_endpoint: tuple[str, ...] = opt(
        (),
        "--engine openai: the engine's ZMQ KV-event PUB endpoint, one per --upstream in order "
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

    @property
    def is_gguf(self) -> bool:
        return self.model_path is not None and self.model_path.lower().endswith(".gguf")

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
        for name in (
            "num_workers",
            "block_size",
            "num_gpu_blocks_override",
            "max_num_seqs",
            "max_num_batched_tokens",
            "kv_cache_memory_bytes",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("--gpu-memory-utilization must be within (0, 1]")
        if self.q4_max_rows is not None and self.q4_max_rows < 0:
            raise ConfigError("--q4-max-rows must be at least 0")
        self.generation_overrides()  # raises on a malformed value
        if self.speedup_ratio <= 0:
            raise ConfigError("--speedup-ratio must be positive")
        if not 0.0 <= self.kv_events_interval_ms <= 1000.0:
            raise ConfigError("--kv-events-interval-ms must be within [0, 1000]")
        if self.engine == "scripted" and (self.script_file is None or not Path(self.script_file).is_file()):
            raise ConfigError("--engine scripted needs --script-file naming an existing file")
        if (self.engine == "openai") != bool(self.upstream):
            raise ConfigError("--engine openai and --upstream URL go together")
        if len(self.kv_events_endpoint) > len(self.upstream):
            raise ConfigError("more --kv-events-endpoint than --upstream")
        unknown = set(self.upstream_knobs) - set(SAMPLING_KNOBS)
        if unknown:
            raise ConfigError(
                f"--upstream-sampling-knobs: unknown {', '.join(sorted(unknown))} "
                f"(known: {', '.join(SAMPLING_KNOBS)})"
            )
        if len(self.kv_replay_endpoint) > len(self.kv_events_endpoint):
            raise ConfigError("more --kv-replay-endpoint than --kv-events-endpoint")
        for url in self.upstream:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"--upstream {url!r} is not an http(s):// URL")
        if self.upstream_dp_size < 1 or self.upstream_poll_interval_s <= 0:
            raise ConfigError("--upstream-dp-size must be at least 1, --upstream-poll-interval-s positive")
        if not 0.0 <= self.eos_probability <= 1.0:
            raise ConfigError("--eos-probability must be within [0, 1]")
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
class UpConfig(FrontendConfig):
    engine: str = opt(
        "torch",
        "Engine of the workers: torch (a real model; default SmolLM2-135M-Instruct on the CPU), "
        "mocker (simulated, for load tests) or echo.",
        choices=ENGINES,
    )
    workers: int | None = opt(None, "Workers to start beside the frontend (default: torch 1, mocker 2).")
    speedup_ratio: float = opt(1.0, "Mocker speedup ratio.")
    num_gpu_blocks_override: int | None = opt(
        None, "KV blocks per worker (default: mocker 16384; torch: sized from memory)."
    )
    block_size: int = opt(64, "KV block size in tokens.")
    device: str | None = opt(None, "Torch engine device (default: cuda when available).", choices=DEVICES)
    dtype: str = opt("auto", "Torch engine compute dtype.", choices=DTYPES)
    gguf_cache_dir: str | None = opt(
        None, "Where converted .gguf models are cached (default: ~/.cache/turbine/gguf)."
    )

    @property
    def num_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return 1 if self.engine == "torch" else 2

    @property
    def is_gguf(self) -> bool:
        return self.model_path is not None and self.model_path.lower().endswith(".gguf")

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
        if self.workers is not None and self.workers < 1:
            raise ConfigError("--workers must be at least 1")


# tcp://HOST:PORT (a name, an IPv4 address, [IPv6], or * to bind every interface) or ipc://PATH.
_ZMQ_ENDPOINT = re.compile(r"tcp://(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]|\*):([0-9]{1,5})|ipc://\S+")


def _valid_zmq_endpoint(endpoint: str) -> bool:
    match = _ZMQ_ENDPOINT.fullmatch(endpoint)
    return match is not None and (match[1] is None or 1 <= int(match[1]) <= 65535)


def _check_port(flag: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{flag} {port} is out of range (1-65535)")


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
        kind = _field_type(field)
        help_text = f"{field.metadata.get('help', '')} [env {_env_name(field.name)}]"
        if kind is bool:
            parser.add_argument(
                _flag(field.name),
                *([SHORT_FLAGS[field.name]] if field.name in SHORT_FLAGS else []),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif kind is tuple:
            parser.add_argument(
                _flag(field.name), dest=field.name, action="append", default=None, help=help_text
            )
        else:
            parser.add_argument(
                _flag(field.name),
                dest=field.name,
                type=str,
                default=None,
                metavar=field.name.upper(),
                help=help_text,
            )
    return parser


def parse_config(
    cls: type[C], argv: Sequence[str], env: Mapping[str, str], *, prog: str, description: str = ""
) -> C:
    """Parse and validate; raises ConfigError (argparse itself exits 2 on unknown flags)."""
    args = vars(build_parser(cls, prog, description).parse_args(list(argv)))
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        kind = _field_type(field)
        raw = args.get(field.name)
        env_key = _env_name(field.name)
        if raw is not None:
            source = _flag(field.name)
            if kind is tuple:
                values[field.name] = tuple(raw)
            else:
                values[field.name] = raw if kind is bool else _convert(kind, raw, source)
        elif env_key in env:
            source = env_key
            values[field.name] = _convert(kind, env[env_key], env_key)
        choices = field.metadata.get("choices")
        if choices and field.name in values and values[field.name] not in choices:
            raise ConfigError(f"{source} {values[field.name]!r} is not one of: {', '.join(choices)}")
    cfg = cls(**values)
    cfg.validate()
    return cfg


def config_to_env(cfg: RuntimeConfig) -> dict[str, str | None]:
    """Every field as its `TURBINE_*` variable, for a child process that must resolve the same
    config (None: unset it, the field's default). Env rather than argv keeps secrets off `ps`."""
    out: dict[str, str | None] = {}
    for field in dataclasses.fields(cfg):
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
