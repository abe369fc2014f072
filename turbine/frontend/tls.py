"""The HTTP server's TLS context: HTTPS from a PEM certificate and key, and optionally mTLS.

Built once at start-up; every file problem (missing, unreadable, not PEM, key not matching the
certificate) becomes one `ConfigError` line naming the flag, so a misconfigured frontend exits before
it binds a port.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from turbine.errors import ConfigError
from turbine.runtime.transport.tls import check_readable, ssl_reason

if TYPE_CHECKING:
    import grpc


def server_ssl_context(cert_path: str, key_path: str, client_ca_path: str | None = None) -> ssl.SSLContext:
    """A server context (TLS 1.2+) presenting `cert_path`; with `client_ca_path`, clients must present
    a certificate signed by that CA (`CERT_REQUIRED`), else the handshake fails."""
    check_readable("--tls-cert-path", cert_path)
    check_readable("--tls-key-path", key_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"--tls-cert-path {cert_path!r} and --tls-key-path {key_path!r} are not a PEM certificate "
            f"and its matching key ({ssl_reason(exc)})"
        ) from None
    if client_ca_path is not None:
        check_readable("--tls-client-ca-cert-path", client_ca_path)
        try:
            ctx.load_verify_locations(cafile=client_ca_path)
        except ssl.SSLError as exc:
            reason = ssl_reason(exc)
            raise ConfigError(
                f"--tls-client-ca-cert-path {client_ca_path!r} holds no PEM CA certificate ({reason})"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def grpc_server_credentials(
    cert_path: str, key_path: str, client_ca_path: str | None = None
) -> grpc.ServerCredentials:
    """The same certificate (and client CA, for mTLS) for the KServe gRPC server."""
    import grpc  # only a frontend with --kserve-grpc-server loads gRPC

    server_ssl_context(cert_path, key_path, client_ca_path)  # validates the files, one clear error
    key = Path(key_path).read_bytes()
    chain = Path(cert_path).read_bytes()
    ca = Path(client_ca_path).read_bytes() if client_ca_path is not None else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=client_ca_path is not None
    )
