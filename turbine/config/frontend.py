"""`turbine frontend`: the HTTP/gRPC edge, its routers, its processes and its upstream servers."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from turbine.choices import (
    AFFINITY_MODES,
    GUIDED_DIALECTS,
    LOAD_COUNTING_MODES,
    QUEUE_POLICIES,
    REASONING_FIELD_NAMES,
    REASONING_PARSERS,
    ROUTER_MODES,
    TOOL_CALL_PARSERS,
)
from turbine.config.options import env_name, opt
from turbine.config.runtime import GUIDED_HELP, RuntimeConfig, is_gguf_file
from turbine.errors import ConfigError


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
    upstream_guided_decoding: str = opt("none", "--upstream: " + GUIDED_HELP, choices=GUIDED_DIALECTS)

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
            variable = env_name("frontend_process_dir")
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
            gguf = is_gguf_file(self.model_path) and bool(self.upstreams)
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
