"""TLS contexts for the connections between processes: the TCP request plane and NATS.

Roles on the TCP request plane (`--tcp-tls-*`): the worker is the server. It presents
`--tcp-tls-cert-path`/`--tcp-tls-key-path`; given `--tcp-tls-ca-cert-path` as well, it also requires
every frontend to present a certificate signed by that CA (mTLS). The frontend is the client: with
`--tcp-tls-ca-cert-path` it speaks TLS and verifies each worker's certificate (chain and host name,
which is the host of the worker's registered address) against that CA; with
`--tcp-tls-client-cert-path`/`--tcp-tls-client-key-path` it presents its own certificate. A frontend
that does not trust the worker's CA, or has no certificate the worker accepts, cannot connect: the
worker counts as unreachable and the request gets 503.

NATS (`--nats-tls-*`): every process is a client of the NATS server; the CA verifies the server,
the certificate and key are the process's own (for servers that verify clients).

Built once at start-up; every file problem becomes one `ConfigError` naming the flag.
"""

from __future__ import annotations

import ssl

from turbine.errors import ConfigError


def check_readable(flag: str, path: str) -> None:
    # OpenSSL's own errors do not say which file failed, so read each one first.
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{flag} {path!r} cannot be read: {exc.strerror or exc}") from None


def ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc)


def _load_pair(ctx: ssl.SSLContext, cert: tuple[str, str], key: tuple[str, str]) -> None:
    (cert_flag, cert_path), (key_flag, key_path) = cert, key
    check_readable(cert_flag, cert_path)
    check_readable(key_flag, key_path)
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{cert_flag} {cert_path!r} and {key_flag} {key_path!r} are not a PEM certificate and its "
            f"matching key ({ssl_reason(exc)})"
        ) from None


def _load_ca(ctx: ssl.SSLContext, flag: str, path: str) -> None:
    check_readable(flag, path)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(f"{flag} {path!r} holds no PEM CA certificate ({ssl_reason(exc)})") from None


def server_context(
    cert: tuple[str, str], key: tuple[str, str], client_ca: tuple[str, str] | None = None
) -> ssl.SSLContext:
    """A server context (TLS 1.2+); each argument is (flag, path). With `client_ca`, clients must
    present a certificate signed by it."""
    # Not create_default_context: it would also trust the system's CAs for client certificates.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(ctx, cert, key)
    if client_ca is not None:
        _load_ca(ctx, *client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    ca: tuple[str, str] | None, cert: tuple[str, str] | None = None, key: tuple[str, str] | None = None
) -> ssl.SSLContext:
    """A client context (TLS 1.2+) verifying the server against `ca` (the system's CAs without
    one), presenting `cert`/`key` when given; each argument is (flag, path)."""
    # Verifies the chain and the host name; trusts only `ca` when given (a private CA for a
    # private plane), the system's CAs otherwise.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load_ca(ctx, *ca)
    else:
        ctx.load_default_certs()
    if cert is not None and key is not None:
        _load_pair(ctx, cert, key)
    return ctx
