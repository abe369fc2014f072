"""Request-plane and NATS TLS flags: pairs, which process gets a context, clear file errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from turbine.config import FrontendConfig, WorkerConfig, parse_config
from turbine.errors import ConfigError
from turbine.runtime.factory import nats_tls, tcp_client_tls, tcp_server_tls
from turbine.runtime.transport.tls import client_context

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "argv",
    [
        ["--tcp-tls-cert-path", "a.pem"],
        ["--tcp-tls-client-key-path", "k.pem"],
        ["--nats-tls-cert-path", "a.pem"],
    ],
)
def test_certificates_and_keys_come_in_pairs(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match="must be given together"):
        parse_config(WorkerConfig, argv, {}, prog="t")


def test_no_flags_no_tls() -> None:
    cfg = parse_config(FrontendConfig, [], {}, prog="t")
    assert (tcp_server_tls(cfg), tcp_client_tls(cfg), nats_tls(cfg)) == (None, None, None)


def test_unreadable_or_bogus_files_name_their_flag(tmp_path: Path) -> None:
    cfg = parse_config(
        FrontendConfig, [], {"TURBINE_TCP_TLS_CA_CERT_PATH": str(tmp_path / "nope.pem")}, prog="t"
    )
    with pytest.raises(ConfigError, match=r"--tcp-tls-ca-cert-path .* cannot be read"):
        tcp_client_tls(cfg)
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"--nats-tls-ca-cert-path .* holds no PEM CA certificate"):
        client_context(("--nats-tls-ca-cert-path", str(bogus)))
    worker = parse_config(
        WorkerConfig, ["--tcp-tls-cert-path", str(bogus), "--tcp-tls-key-path", str(bogus)], {}, prog="t"
    )
    with pytest.raises(ConfigError, match="are not a PEM certificate and its matching key"):
        tcp_server_tls(worker)
