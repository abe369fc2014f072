"""Pick concrete runtime implementations from config (used by composition roots only)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from turbine.config import RuntimeConfig
from turbine.errors import ConfigError
from turbine.runtime.discovery.base import Store
from turbine.runtime.discovery.file import FileStore, default_file_store_path
from turbine.runtime.discovery.memory import MemoryStore
from turbine.runtime.transport.base import RequestPlaneClient, RequestPlaneServer
from turbine.runtime.transport.tcp import TcpRequestClient, TcpRequestServer
from turbine.runtime.transport.tls import client_context, server_context

if TYPE_CHECKING:
    from turbine.runtime.events.nats import NatsEventPlane
    from turbine.runtime.events.zmq import ZmqEventPlane

# The backends a configuration does not name are not imported: every frontend and worker process
# would otherwise load the NATS, ZeroMQ and etcd clients at start whatever it uses.


def tcp_server_tls(cfg: RuntimeConfig) -> ssl.SSLContext | None:
    """A worker's TLS for the TCP request plane: with --tcp-tls-cert-path/--tcp-tls-key-path;
    --tcp-tls-ca-cert-path adds client verification (mTLS)."""
    if cfg.tcp_tls_cert_path is None or cfg.tcp_tls_key_path is None:
        return None
    ca = cfg.tcp_tls_ca_cert_path
    return server_context(
        ("--tcp-tls-cert-path", cfg.tcp_tls_cert_path),
        ("--tcp-tls-key-path", cfg.tcp_tls_key_path),
        ("--tcp-tls-ca-cert-path", ca) if ca is not None else None,
    )


def tcp_client_tls(cfg: RuntimeConfig) -> ssl.SSLContext | None:
    """A frontend's TLS for the TCP request plane: with --tcp-tls-ca-cert-path or a client
    certificate (--tcp-tls-client-cert-path/--tcp-tls-client-key-path)."""
    ca, cert, key = cfg.tcp_tls_ca_cert_path, cfg.tcp_tls_client_cert_path, cfg.tcp_tls_client_key_path
    if ca is None and cert is None:
        return None
    return client_context(
        ("--tcp-tls-ca-cert-path", ca) if ca is not None else None,
        ("--tcp-tls-client-cert-path", cert) if cert is not None else None,
        ("--tcp-tls-client-key-path", key) if key is not None else None,
    )


def nats_tls(cfg: RuntimeConfig) -> ssl.SSLContext | None:
    """TLS for every NATS connection of the process: with --nats-tls-ca-cert-path or a client
    certificate (--nats-tls-cert-path/--nats-tls-key-path)."""
    ca, cert, key = cfg.nats_tls_ca_cert_path, cfg.nats_tls_cert_path, cfg.nats_tls_key_path
    if ca is None and cert is None:
        return None
    return client_context(
        ("--nats-tls-ca-cert-path", ca) if ca is not None else None,
        ("--nats-tls-cert-path", cert) if cert is not None else None,
        ("--nats-tls-key-path", key) if key is not None else None,
    )


def make_store(cfg: RuntimeConfig, memory: MemoryStore | None = None) -> Store:
    """`memory` lets one process share a MemoryStore between its frontend and workers."""
    if cfg.discovery_backend == "file":
        root = Path(cfg.file_store_path) if cfg.file_store_path else default_file_store_path()
        return FileStore(root)
    if cfg.discovery_backend == "mem":
        return memory if memory is not None else MemoryStore()
    if cfg.discovery_backend == "etcd":
        from turbine.runtime.discovery.etcd import EtcdStore

        return EtcdStore(cfg.etcd_endpoints)
    raise ConfigError(f"discovery backend {cfg.discovery_backend!r} is not available")


def make_request_client(cfg: RuntimeConfig) -> RequestPlaneClient:
    if cfg.request_plane == "tcp":
        return TcpRequestClient(ssl_context=tcp_client_tls(cfg), stall_timeout_s=cfg.request_stall_timeout_s)
    if cfg.request_plane == "nats":
        from turbine.runtime.transport.nats import NatsRequestClient

        return NatsRequestClient(
            cfg.nats_server, stall_timeout_s=cfg.request_stall_timeout_s, tls=nats_tls(cfg)
        )
    if cfg.request_plane == "http":
        from turbine.runtime.transport.http import HttpRequestClient

        return HttpRequestClient(stall_timeout_s=cfg.request_stall_timeout_s)
    raise ConfigError(f"request plane {cfg.request_plane!r} is not available")


def make_request_server(cfg: RuntimeConfig, host: str = "127.0.0.1") -> RequestPlaneServer:
    """A worker's server; `host` is the TCP or HTTP plane's bind address (NATS connects out)."""
    if cfg.request_plane == "tcp":
        return TcpRequestServer(
            host, ssl_context=tcp_server_tls(cfg), stall_timeout_s=cfg.request_stall_timeout_s
        )
    if cfg.request_plane == "nats":
        from turbine.runtime.transport.nats import NatsRequestServer

        return NatsRequestServer(
            cfg.nats_server, stall_timeout_s=cfg.request_stall_timeout_s, tls=nats_tls(cfg)
        )
    if cfg.request_plane == "http":
        from turbine.runtime.transport.http import HttpRequestServer

        return HttpRequestServer(host, stall_timeout_s=cfg.request_stall_timeout_s)
    raise ConfigError(f"request plane {cfg.request_plane!r} is not available")


def make_event_plane(cfg: RuntimeConfig) -> NatsEventPlane | ZmqEventPlane | None:
    """The process's shared event plane, or None with `--event-plane request` (each worker keeps
    its own in-process plane and frontends stream from it over the request plane). Not yet
    connected: `start()` it (workers, to fail fast) or let the first `subscribe` do it (a zmq
    plane binds its endpoint then: only the frontend subscribes)."""
    if cfg.event_plane == "request":
        return None
    if cfg.event_plane == "nats":
        from turbine.runtime.events.nats import NatsEventPlane

        return NatsEventPlane(cfg.nats_server, tls=nats_tls(cfg))
    if cfg.event_plane == "zmq":
        from turbine.runtime.events.zmq import ZmqEventPlane

        return ZmqEventPlane(cfg.zmq_event_endpoint)
    raise ConfigError(f"event plane {cfg.event_plane!r} is not available")
