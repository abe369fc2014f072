"""What every process reads: where it finds the others (discovery, planes, TLS between them, logs)."""

from __future__ import annotations

import dataclasses
import re

from turbine.choices import DISCOVERY_BACKENDS, EVENT_PLANES, LOG_LEVELS, REQUEST_PLANES
from turbine.config.options import flag_name, opt
from turbine.errors import ConfigError

GUIDED_HELP = (
    "the structured-output fields the upstream servers read: vllm (structured_outputs), sglang "
    "(json_schema/regex/ebnf), llama.cpp (json_schema/grammar; no regex) or none; frontends refuse "
    "the constraints the dialect cannot express with a 400."
)


def is_gguf_file(path: str | None) -> bool:
    return path is not None and path.lower().endswith(".gguf")


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
                raise ConfigError(f"{flag_name(cert)} and {flag_name(key)} must be given together")
        if "nats" in (self.request_plane, self.event_plane) and "://" not in self.nats_server:
            raise ConfigError(f"--nats-server {self.nats_server!r} is not a URL (e.g. nats://127.0.0.1:4222)")
        if self.event_plane == "zmq" and not _valid_zmq_endpoint(self.zmq_event_endpoint):
            raise ConfigError(
                f"--zmq-event-endpoint {self.zmq_event_endpoint!r} is not tcp://HOST:PORT or ipc://PATH"
            )


# tcp://HOST:PORT (a name, an IPv4 address, [IPv6], or * to bind every interface) or ipc://PATH.
_ZMQ_ENDPOINT = re.compile(r"tcp://(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]|\*):([0-9]{1,5})|ipc://\S+")


def _valid_zmq_endpoint(endpoint: str) -> bool:
    match = _ZMQ_ENDPOINT.fullmatch(endpoint)
    return match is not None and (match[1] is None or 1 <= int(match[1]) <= 65535)
