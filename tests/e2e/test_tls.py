"""HTTPS and mTLS on the frontend, through the official openai client, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx2
import openai
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e.conftest import MODEL, Stack, wait_until

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self, *, with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if with_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier | None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if usage is None:  # the CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    cert_path = path.with_suffix(".crt")
    key_path = path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("turbine test CA", ca_key, None, ca_key, None)
    ca_path, _ = _write(root / "ca", ca_key, ca)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue("localhost", server_key, ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH)
    server_cert, server_key_path = _write(root / "server", server_key, server)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue("turbine test client", client_key, ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    client_cert, client_key_path = _write(root / "client", client_key, client)
    return Pki(ca_path, server_cert, server_key_path, client_cert, client_key_path)


def wait_instances_tls(url: str, ctx: ssl.SSLContext) -> None:
    def count() -> int:
        with httpx2.Client(verify=ctx, timeout=2) as client:
            models: dict[str, int] = orjson.loads(client.get(url + "/health").content)["models"]
        return models.get(MODEL, 0)

    wait_until(lambda: count() == 1, 20)


def _chat(url: str, ctx: ssl.SSLContext) -> str:
    # openai's own HTTP client is httpx2: a CA bundle (and client certificate) go in as an SSLContext.
    with httpx2.Client(verify=ctx, timeout=10) as http_client:
        oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http_client)
        out = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi over TLS"}], max_tokens=4
        )
    return out.choices[0].finish_reason


def test_https_serves_the_openai_client(stack: Stack, pki: Pki) -> None:
    stack.worker("--engine", "echo")
    tls = ["--tls-cert-path", str(pki.server_cert), "--tls-key-path", str(pki.server_key)]
    ctx = pki.client_context(with_cert=False)
    proc, url = stack.frontend(*tls, ssl_context=ctx)
    assert (
        url.startswith("https://")
        and f"OpenAI API on https://127.0.0.1:{url.rsplit(':', 1)[1]}" in proc.log()
    )
    wait_instances_tls(url, ctx)
    assert _chat(url, ctx) == "length"
    # A client that does not trust the CA refuses the server.
    with pytest.raises(openai.APIConnectionError):
        _chat(url, ssl.create_default_context())


def test_mtls_refuses_clients_without_a_certificate(stack: Stack, pki: Pki) -> None:
    stack.worker("--engine", "echo")
    tls = [
        "--tls-cert-path",
        str(pki.server_cert),
        "--tls-key-path",
        str(pki.server_key),
        "--tls-client-ca-cert-path",
        str(pki.ca),
    ]
    with_cert = pki.client_context(with_cert=True)
    _, url = stack.frontend(*tls, ssl_context=with_cert)
    wait_instances_tls(url, with_cert)
    assert _chat(url, with_cert) == "length"
    with pytest.raises(openai.APIConnectionError):
        _chat(url, pki.client_context(with_cert=False))
    # A certificate from another CA is refused as well: the server's own certificate is not a client's.
    other = pki.client_context(with_cert=False)
    other.load_cert_chain(pki.server_cert, pki.server_key)
    with pytest.raises(openai.APIConnectionError):
        _chat(url, other)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert-path", "{cert}"], "--tls-cert-path and --tls-key-path must be given together"),
        (["--tls-key-path", "{key}"], "--tls-cert-path and --tls-key-path must be given together"),
        (["--tls-client-ca-cert-path", "{ca}"], "--tls-client-ca-cert-path needs --tls-cert-path"),
        (
            ["--tls-cert-path", "/nonexistent.crt", "--tls-key-path", "{key}"],
            "--tls-cert-path '/nonexistent.crt'",
        ),
        (
            ["--tls-cert-path", "{cert}", "--tls-key-path", "/nonexistent.key"],
            "--tls-key-path '/nonexistent.key'",
        ),
        (
            ["--tls-cert-path", "{cert}", "--tls-key-path", "{ca}"],
            "not a PEM certificate and its matching key",
        ),
        (
            ["--tls-cert-path", "{cert}", "--tls-key-path", "{key}", "--tls-client-ca-cert-path", "{key}"],
            "--tls-client-ca-cert-path",
        ),
    ],
)
def test_bad_tls_flags_exit_2_with_one_line(tmp_path: Path, pki: Pki, flags: list[str], message: str) -> None:
    paths = {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca)}
    argv = [a.format(**paths) for a in flags]
    result = subprocess.run(
        [sys.executable, "-m", "turbine.frontend", "--file-store-path", str(tmp_path / "store"), *argv],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_kserve_grpc_uses_the_same_certificates(stack: Stack, pki: Pki) -> None:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    from tests.e2e.conftest import free_port

    grpc_port = free_port()
    tls = [
        "--tls-cert-path",
        str(pki.server_cert),
        "--tls-key-path",
        str(pki.server_key),
        "--tls-client-ca-cert-path",
        str(pki.ca),
    ]
    ctx = pki.client_context(with_cert=True)
    stack.frontend(*tls, "--kserve-grpc-server", "--grpc-port", str(grpc_port), ssl_context=ctx)
    target = f"localhost:{grpc_port}"
    trusted = triton.InferenceServerClient(
        url=target,
        ssl=True,
        root_certificates=str(pki.ca),
        private_key=str(pki.client_key),
        certificate_chain=str(pki.client_cert),
    )
    try:
        assert trusted.is_server_live()
    finally:
        trusted.close()
    anonymous = triton.InferenceServerClient(url=target, ssl=True, root_certificates=str(pki.ca))
    try:
        with pytest.raises(InferenceServerException):
            anonymous.is_server_live(client_timeout=5)
    finally:
        anonymous.close()
