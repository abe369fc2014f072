"""A frontend serving a model whose files exist only on the worker's machine.

The worker starts with `--model-path` pointing at a copy of the bundled model; once it registered,
the test renames that directory, so the path its card advertises no longer exists here, exactly as
for a frontend on another machine. The frontend must then fetch the files the worker published
(discovery store or NATS object store), verify them, and answer exactly as a frontend that has the
model locally does.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import msgspec
import openai
import pytest

from tests.e2e.conftest import MODEL, Stack, http, wait_instances, wait_until
from tests.nats_server import NatsServer
from turbine.models import bundled_model_path
from turbine.protocol.model_card import ModelDeploymentCard
from turbine.runtime.discovery.file import FileStore
from turbine.runtime.model_files import manifest_digest

pytestmark = pytest.mark.e2e

FAST = ("--engine", "mocker", "--speedup-ratio", "1000")
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there, how are you?"},
]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def cards(stack: Stack) -> list[ModelDeploymentCard]:
    async def read() -> list[ModelDeploymentCard]:
        store = FileStore(stack.store)
        try:
            kvs = await store.get_prefix("turbine/models/test/")
        finally:
            await store.close()
        return [msgspec.msgpack.decode(kv.value, type=ModelDeploymentCard) for kv in kvs]

    return asyncio.run(read())


def start_worker_elsewhere(stack: Stack, tmp_path: Path, *args: str) -> ModelDeploymentCard:
    """A worker serving a private copy of the model; returns its card once the copy is gone."""
    model = tmp_path / "worker-machine" / "tiny"
    shutil.copytree(bundled_model_path(), model)
    worker = stack.worker(*FAST, "--model-path", str(model), "--model-name", MODEL, *args)
    wait_until(lambda: len(cards(stack)) == 1, 20, worker)
    model.rename(model.with_name("moved-away"))
    (card,) = cards(stack)
    assert card.model_path == str(model) and not model.exists()
    return card


def chat(url: str) -> tuple[str, int]:
    out = client(url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, seed=11)
    assert out.choices[0].message.content and out.usage is not None
    return out.choices[0].message.content, out.usage.prompt_tokens


def test_fetches_files_from_the_store_and_answers_like_a_local_model(stack: Stack, tmp_path: Path) -> None:
    card = start_worker_elsewhere(stack, tmp_path)
    assert {f.name for f in card.files} == {p.name for p in bundled_model_path().iterdir()}
    assert all(f.location.startswith("store:turbine/files/") for f in card.files)

    cache = tmp_path / "frontend-cache"
    remote_proc, remote = stack.frontend("--model-cache-dir", str(cache))
    _, local = stack.frontend("--model-path", str(bundled_model_path()))
    wait_instances(remote, 1)
    wait_instances(local, 1)
    assert chat(remote) == chat(local)
    streamed = client(remote).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, seed=11, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat(local)[0]

    fetched = cache / manifest_digest(card.files)
    for f in card.files:
        assert (fetched / f.name).read_bytes() == (bundled_model_path() / f.name).read_bytes()
    assert f"fetched {len(card.files)} file(s)" in remote_proc.log()


def test_a_tampered_blob_makes_the_frontend_refuse_the_model(stack: Stack, tmp_path: Path) -> None:
    card = start_worker_elsewhere(stack, tmp_path, "--model-files-via", "store")
    tokenizer = next(f for f in card.files if f.name == "tokenizer.json")
    chunk_key = tokenizer.location.removeprefix("store:") + "/0"

    async def tamper() -> None:
        store = FileStore(stack.store)
        try:
            original = await store.get(chunk_key)
            assert original is not None
            # Same length, one byte changed: only the checksum can tell.
            await store.put(chunk_key, original[:-1] + bytes([original[-1] ^ 1]))
        finally:
            await store.close()

    asyncio.run(tamper())
    proc, url = stack.frontend("--model-cache-dir", str(tmp_path / "frontend-cache"))
    wait_until(lambda: "cannot serve model" in proc.log(), 20, proc)
    assert "has sha256" in proc.log() and f"the card says {tokenizer.sha256}" in proc.log()
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    status, _, body = http("GET", url + "/v1/models")
    assert status == 200 and MODEL not in body.decode()
    assert not (tmp_path / "frontend-cache" / manifest_digest(card.files)).exists()


def test_fetches_files_from_the_nats_object_store(stack: Stack, tmp_path: Path, nats_js: NatsServer) -> None:
    plane = ("--request-plane", "nats", "--nats-server", nats_js.url)
    card = start_worker_elsewhere(stack, tmp_path, *plane)  # auto: NATS with the NATS plane
    assert card.files and all(f.location.startswith("nats-os:turbine_model_files/") for f in card.files)

    remote_proc, remote = stack.frontend(*plane, "--model-cache-dir", str(tmp_path / "frontend-cache"))
    _, local = stack.frontend(*plane, "--model-path", str(bundled_model_path()))
    wait_instances(remote, 1)
    wait_instances(local, 1)
    assert chat(remote) == chat(local)
    assert f"fetched {len(card.files)} file(s)" in remote_proc.log()
