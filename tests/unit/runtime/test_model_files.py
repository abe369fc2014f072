"""Model files across machines: manifest and checksum logic, publishing, and the frontend's resolver
(fetch → verify → cache), against an in-memory discovery store."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from turbine.config import FrontendConfig, WorkerConfig, parse_config
from turbine.errors import ConfigError
from turbine.models import bundled_model_path
from turbine.preprocess.tokenizer import load_model_files
from turbine.protocol.model_card import ModelDeploymentCard, ModelFile
from turbine.runtime.blobs import STORE_PREFIX, BlobError, StoreBlobStore, sha256_hex
from turbine.runtime.discovery.memory import MemoryStore
from turbine.runtime.model_files import (
    MODEL_FILE_NAMES,
    ModelFileResolver,
    ModelFilesError,
    check_manifest,
    dir_matches,
    manifest_digest,
    publish_model_files,
    publish_worker_model_files,
    read_model_files,
    verify_file,
)

pytestmark = pytest.mark.unit

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def model_copy(tmp_path: Path, name: str = "model") -> Path:
    """The bundled tiny model plus a chat_template.jinja and a weights-like file that must not travel."""
    target = tmp_path / name
    shutil.copytree(bundled_model_path(), target)
    (target / "chat_template.jinja").write_text(TEMPLATE)
    (target / "model.safetensors").write_bytes(b"\0" * 100)
    return target


def card_for(model_dir: Path, files: tuple[ModelFile, ...]) -> ModelDeploymentCard:
    return ModelDeploymentCard(
        name="m",
        model_path=str(model_dir),
        namespace="ns",
        component="backend",
        endpoint="generate",
        instance_id=1,
        files=files,
    )


def mf(name: str, data: bytes, location: str = "store:x") -> ModelFile:
    return ModelFile(name=name, size=len(data), sha256=sha256_hex(data), location=location)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    try:
        yield s
    finally:
        await s.close()


# --------------------------------------------------------------------------------- pure logic


def test_load_model_files_reads_only_the_published_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # If the loader learns to read another file, it must be published too, or a remote frontend
    # would silently load the model without it.
    model = model_copy(tmp_path)
    (model / "chat_template.jinja").unlink()
    seen: list[str] = []
    original = Path.is_file

    def recording_is_file(self: Path) -> bool:
        seen.append(self.name)
        return original(self)

    monkeypatch.setattr(Path, "is_file", recording_is_file)
    load_model_files(model)
    assert seen and set(seen) <= set(MODEL_FILE_NAMES)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json"} <= set(
        seen
    )


def test_read_model_files_takes_only_known_names(tmp_path: Path) -> None:
    model = model_copy(tmp_path)
    names = [name for name, _ in read_model_files(model)]
    assert names == [n for n in MODEL_FILE_NAMES if (model / n).exists()]
    assert "chat_template.jinja" in names and "model.safetensors" not in names
    assert dict(read_model_files(model))["tokenizer.json"] == (model / "tokenizer.json").read_bytes()


def test_manifest_digest_depends_on_names_and_contents_not_order_or_location() -> None:
    a, b = mf("tokenizer.json", b"a"), mf("config.json", b"b")
    assert manifest_digest([a, b]) == manifest_digest([b, a])
    assert manifest_digest([a, b]) == manifest_digest([a, mf("config.json", b"b", "nats-os:bucket/x")])
    assert manifest_digest([a, b]) != manifest_digest([a, mf("config.json", b"c")])
    assert manifest_digest([a, b]) != manifest_digest([a, mf("generation_config.json", b"b")])
    assert manifest_digest([a]) != manifest_digest([a, b])


def test_verify_file_checks_size_and_sha256() -> None:
    good = mf("tokenizer.json", b"hello")
    verify_file(good, b"hello")
    with pytest.raises(ModelFilesError, match="sha256"):
        verify_file(good, b"jello")
    with pytest.raises(ModelFilesError, match="6 bytes, the card says 5"):
        verify_file(good, b"hello!")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ((mf("tokenizer.json", b"t"), mf("../../etc/passwd", b"x")), "not a model file"),
        ((mf("tokenizer.json", b"t"), mf("tokenizer.json", b"u")), "twice"),
        ((mf("config.json", b"c"),), "lack tokenizer.json"),
        ((ModelFile("tokenizer.json", 1, "ABC", "store:x"),), "invalid sha256"),
        ((ModelFile("tokenizer.json", -1, sha256_hex(b""), "store:x"),), "invalid sha256 or size"),
    ],
)
def test_check_manifest_refuses_what_a_frontend_must_not_write(
    files: tuple[ModelFile, ...], message: str
) -> None:
    with pytest.raises(ModelFilesError, match=message):
        check_manifest(files)


def test_dir_matches_needs_exactly_the_listed_files(tmp_path: Path) -> None:
    model = model_copy(tmp_path)
    files = tuple(mf(name, data) for name, data in read_model_files(model))
    assert dir_matches(model, files)
    assert not dir_matches(tmp_path / "nowhere", files)
    # A file the worker does not have (it would change the template) makes the directory differ.
    assert not dir_matches(model, tuple(f for f in files if f.name != "chat_template.jinja"))
    (model / "chat_template.jinja").write_text(TEMPLATE + " ")
    assert not dir_matches(model, files)


def test_cards_without_files_still_decode_and_old_readers_ignore_them() -> None:
    class OldCard(msgspec.Struct, frozen=True):
        name: str
        model_path: str
        namespace: str
        component: str
        endpoint: str
        instance_id: int

    old = msgspec.msgpack.encode(OldCard("m", "/p", "ns", "c", "e", 7))
    assert msgspec.msgpack.decode(old, type=ModelDeploymentCard).files == ()
    new = card_for(Path("/p"), (mf("tokenizer.json", b"t"),))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=OldCard).instance_id == 1
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=ModelDeploymentCard) == new


# ------------------------------------------------------------------------- publish and resolve


async def test_publish_then_fetch_into_the_cache_when_the_path_is_elsewhere(
    tmp_path: Path, store: MemoryStore
) -> None:
    model = model_copy(tmp_path)
    files = await publish_model_files(model, StoreBlobStore(store))
    assert [f.name for f in files] == [name for name, _ in read_model_files(model)]
    assert all(f.location == f"store:{STORE_PREFIX}{f.sha256}" for f in files)
    card = card_for(tmp_path / "only-on-the-worker", files)
    resolver = ModelFileResolver([StoreBlobStore(store)], tmp_path / "cache")

    fetched = await resolver.local_dir(card)
    assert fetched == tmp_path / "cache" / manifest_digest(files)
    for name, data in read_model_files(model):
        assert (fetched / name).read_bytes() == data
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".fetching-")]
    loaded, original = load_model_files(fetched), load_model_files(model)
    assert loaded.chat_template == original.chat_template == TEMPLATE
    assert loaded.eos_token_ids == original.eos_token_ids
    assert loaded.tokenizer.encode("Hello there").ids == original.tokenizer.encode("Hello there").ids

    # A second resolve uses the cache, without the store.
    offline = ModelFileResolver([], tmp_path / "cache")
    assert await offline.local_dir(card) == fetched
    # A damaged cache is not trusted: it is fetched again (and here, with no store, refused).
    (fetched / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelFilesError, match="no way to fetch"):
        await offline.local_dir(card)
    assert await resolver.local_dir(card) == fetched
    assert dir_matches(fetched, files)


async def test_the_cards_own_path_is_used_when_it_matches(tmp_path: Path, store: MemoryStore) -> None:
    model = model_copy(tmp_path)
    files = await publish_model_files(model, StoreBlobStore(store))
    resolver = ModelFileResolver([StoreBlobStore(store)], tmp_path / "cache")
    assert await resolver.local_dir(card_for(model, files)) == model
    assert not (tmp_path / "cache").exists()
    # Same path, different contents on this machine: the card's files win.
    (model / "tokenizer_config.json").write_text('{"eos_token": null}')
    assert await resolver.local_dir(card_for(model, files)) == tmp_path / "cache" / manifest_digest(files)


async def test_a_tampered_blob_is_refused(tmp_path: Path, store: MemoryStore) -> None:
    model = model_copy(tmp_path)
    files = await publish_model_files(model, StoreBlobStore(store))
    template = next(f for f in files if f.name == "chat_template.jinja")
    await store.put(f"{STORE_PREFIX}{template.sha256}/0", b"{{ 'pwned' }}" + b" " * (template.size - 13))
    resolver = ModelFileResolver([StoreBlobStore(store)], tmp_path / "cache")
    with pytest.raises(ModelFilesError, match=r"chat_template.jinja fetched from .* has sha256"):
        await resolver.local_dir(card_for(tmp_path / "elsewhere", files))
    assert not (tmp_path / "cache" / manifest_digest(files)).exists()


async def test_a_missing_blob_is_refused(tmp_path: Path, store: MemoryStore) -> None:
    model = model_copy(tmp_path)
    files = await publish_model_files(model, StoreBlobStore(store))
    await store.delete(f"{STORE_PREFIX}{files[0].sha256}")
    resolver = ModelFileResolver([StoreBlobStore(store)], tmp_path / "cache")
    with pytest.raises(ModelFilesError, match=r"tokenizer\.json: .* is not in the store"):
        await resolver.local_dir(card_for(tmp_path / "elsewhere", files))


async def test_worker_publishing_choices(tmp_path: Path, store: MemoryStore) -> None:
    model = model_copy(tmp_path)

    async def publish(via: str, request_plane: str) -> tuple[ModelFile, ...]:
        return await publish_worker_model_files(
            via, model_dir=model, store=store, request_plane=request_plane, nats_url="nats://127.0.0.1:1"
        )

    assert await publish("none", "tcp") == ()
    assert await store.get_prefix(STORE_PREFIX) == []
    files = await publish("auto", "tcp")
    assert files and all(f.location.startswith("store:") for f in files)
    assert files == await publish("store", "nats")
    # Nothing listens on port 1: with NATS asked for, the worker fails rather than publish nothing.
    with pytest.raises(BlobError, match="cannot connect to NATS"):
        await publish("auto", "nats")
    with pytest.raises(BlobError, match="cannot connect to NATS"):
        await publish("nats", "tcp")


def test_flags_and_env_choose_how_files_travel(tmp_path: Path) -> None:
    assert parse_config(WorkerConfig, [], {}, prog="w").model_files_via == "auto"
    env = {"TURBINE_MODEL_FILES_VIA": "nats", "TURBINE_MODEL_CACHE_DIR": str(tmp_path)}
    assert parse_config(WorkerConfig, [], env, prog="w").model_files_via == "nats"
    assert parse_config(WorkerConfig, ["--model-files-via", "none"], env, prog="w").model_files_via == "none"
    assert parse_config(FrontendConfig, [], env, prog="f").model_cache_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="'s3' is not one of: auto, store, nats, none"):
        parse_config(WorkerConfig, ["--model-files-via", "s3"], {}, prog="w")
