"""Model files across machines: the worker publishes them, a frontend elsewhere fetches and verifies them.

A frontend builds its preprocessor from the model directory's tokenizer, template and configs. When
the worker's `model_path` exists only on the worker's machine, the worker's card lists those files
(`ModelDeploymentCard.files`: name, size, SHA-256, location) after publishing each to a blob store
(`blobs.py`). The frontend (`ModelFileResolver`):

1. uses the card's `model_path` if it exists locally with exactly those files (same machine or a
   shared volume: nothing to fetch);
2. else uses its cache directory `{cache_dir}/{manifest digest}/` if it holds exactly those files;
3. else fetches every file, checks its size and SHA-256 against the card, and writes them into the
   cache directory (a temporary directory renamed into place, so a half-written one is never used).

Any mismatch refuses the model: a wrong tokenizer would silently serve wrong tokens. Hashing and
writing run in threads, never on the event loop.

Only the files `load_model_files` reads travel (`MODEL_FILE_NAMES`), not weights.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from turbine.choices import MODEL_FILES_VIA
from turbine.errors import ConfigError
from turbine.protocol.model_card import ModelDeploymentCard, ModelFile
from turbine.runtime.blobs import (
    BlobError,
    BlobStore,
    JetStreamUnavailable,
    StoreBlobStore,
    sha256_hex,
)
from turbine.runtime.discovery.base import Store
from turbine.runtime.lifecycle import Closing

__all__ = [
    "MODEL_FILES_VIA",
    "MODEL_FILE_NAMES",
    "ModelFileResolver",
    "ModelFilesError",
    "check_manifest",
    "default_model_cache_dir",
    "dir_matches",
    "manifest_digest",
    "publish_model_files",
    "publish_worker_model_files",
    "read_model_files",
    "verify_file",
]

log = logging.getLogger(__name__)

# Every file `turbine.preprocess.tokenizer.load_model_files` may read (a unit test checks that it
# reads no other). special_tokens_map.json is not among them: the loader takes special tokens from
# tokenizer_config.json and tokenizer.json.
MODEL_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ModelFilesError(ConfigError):
    """A card's model files are invalid, unavailable, or do not match their checksums."""


def default_model_cache_dir() -> Path:
    """Where a frontend caches fetched model files unless told otherwise (like the file store's
    default: per user, under the temp dir; content-addressed, so a cleaned temp dir costs a refetch)."""
    return Path(tempfile.gettempdir()) / f"turbine-{os.getuid()}" / "models"


# ----------------------------------------------------------------------------------- manifest


def read_model_files(model_dir: Path) -> list[tuple[str, bytes]]:
    """(name, content) of every `MODEL_FILE_NAMES` file present in `model_dir`. Blocking."""
    out = []
    for name in MODEL_FILE_NAMES:
        path = model_dir / name
        if path.is_file():
            out.append((name, path.read_bytes()))
    return out


def manifest_digest(files: Iterable[ModelFile]) -> str:
    """One SHA-256 over the (name, sha256) pairs: names the cache directory of exactly these files."""
    h = hashlib.sha256()
    for name, digest in sorted((f.name, f.sha256) for f in files):
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def check_manifest(files: Sequence[ModelFile]) -> None:
    """Refuse a manifest a frontend must not act on: names are written into a local directory, so
    only the known file names are allowed (no paths), each once, and tokenizer.json is required."""
    names = [f.name for f in files]
    for f in files:
        if f.name not in MODEL_FILE_NAMES:
            raise ModelFilesError(f"the card lists {f.name!r}, which is not a model file turbine reads")
        if not _SHA256_HEX.fullmatch(f.sha256) or f.size < 0:
            raise ModelFilesError(f"the card lists {f.name} with an invalid sha256 or size")
    if len(set(names)) != len(names):
        raise ModelFilesError(f"the card lists a file twice: {sorted(names)}")
    if "tokenizer.json" not in names:
        raise ModelFilesError("the card's files lack tokenizer.json")


def verify_file(file: ModelFile, data: bytes) -> None:
    """Raise unless `data` is the content the card promised."""
    if len(data) != file.size:
        raise ModelFilesError(
            f"{file.name} fetched from {file.location} is {len(data)} bytes, the card says {file.size}"
        )
    digest = sha256_hex(data)
    if digest != file.sha256:
        raise ModelFilesError(
            f"{file.name} fetched from {file.location} has sha256 {digest}, the card says {file.sha256}"
        )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_matches(model_dir: Path, files: Sequence[ModelFile]) -> bool:
    """Whether `model_dir` holds exactly `files` among `MODEL_FILE_NAMES`: each listed one with its
    size and sha256, and no other (a local chat_template.jinja the worker lacks would change the
    template). Blocking: it hashes the files."""
    listed = {f.name: f for f in files}
    try:
        for name in MODEL_FILE_NAMES:
            path = model_dir / name
            f = listed.get(name)
            if f is None:
                if path.exists():
                    return False
            elif not path.is_file() or path.stat().st_size != f.size or _file_sha256(path) != f.sha256:
                return False
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------------- worker side


async def publish_model_files(model_dir: Path, blobs: BlobStore) -> tuple[ModelFile, ...]:
    """Publish the model files of `model_dir` to `blobs`; the result goes into the worker's card."""
    contents = await asyncio.to_thread(read_model_files, model_dir)
    out = []
    for name, data in contents:
        location = await blobs.put(data)
        out.append(ModelFile(name=name, size=len(data), sha256=sha256_hex(data), location=location))
    return tuple(out)


async def publish_worker_model_files(
    via: str,
    *,
    model_dir: Path,
    store: Store,
    request_plane: str,
    nats_url: str,
    nats_tls: ssl.SSLContext | None = None,
) -> tuple[ModelFile, ...]:
    """A worker's `--model-files-via`: `none` publishes nothing (frontends need the same path);
    `store` uses the discovery store; `nats` a NATS JetStream object store; `auto` is `nats` with
    `--request-plane nats` (falling back to `store` if that server has no JetStream) and `store`
    otherwise."""
    if via not in MODEL_FILES_VIA:
        raise ConfigError(f"--model-files-via {via!r} is not one of {', '.join(MODEL_FILES_VIA)}")
    if via == "none":
        return ()
    if via == "nats" or (via == "auto" and request_plane == "nats"):
        from turbine.runtime.nats_blobs import NatsObjectBlobStore  # the NATS client, only when used

        nats = NatsObjectBlobStore(nats_url, tls=nats_tls)
        try:
            return await publish_model_files(model_dir, nats)
        except JetStreamUnavailable as exc:
            if via == "nats":
                raise
            log.warning("%s; publishing model files in the discovery store instead", exc.message)
        finally:
            await nats.close()
    return await publish_model_files(model_dir, StoreBlobStore(store))


# ---------------------------------------------------------------------------------- frontend side


class ModelFileResolver(Closing):
    """Finds or fetches the model directory a frontend loads a card's model from (module docstring).

    `blob_stores` are the stores it can fetch from, by location scheme. Owns them: `close()` closes
    them (the NATS one holds a connection once used).
    """

    def __init__(self, blob_stores: Iterable[BlobStore], cache_dir: Path) -> None:
        self._stores = {b.scheme: b for b in blob_stores}
        self._cache_dir = cache_dir

    async def local_dir(self, card: ModelDeploymentCard) -> Path:
        """A local directory holding exactly the card's files. Raises `ModelFilesError`."""
        files = card.files
        check_manifest(files)
        own = Path(card.model_path)
        if await asyncio.to_thread(dir_matches, own, files):
            return own
        target = self._cache_dir / manifest_digest(files)
        if await asyncio.to_thread(dir_matches, target, files):
            log.info("model %s: using cached files in %s", card.name, target)
            return target
        contents = []
        for f in files:
            store = self._stores.get(f.location.partition(":")[0])
            if store is None:
                raise ModelFilesError(f"{f.name}: no way to fetch {f.location!r}")
            try:
                data = await store.get(f.location)
            except BlobError as exc:
                raise ModelFilesError(f"{f.name}: {exc.message}") from None
            verify_file(f, data)
            contents.append((f.name, data))
        try:
            await asyncio.to_thread(self._write_dir, target, contents, files)
        except OSError as exc:
            raise ModelFilesError(f"cannot write the model files into {target}: {exc}") from None
        log.info(
            "model %s: fetched %d file(s) (%d bytes) into %s",
            card.name,
            len(contents),
            sum(len(d) for _, d in contents),
            target,
        )
        return target

    def _write_dir(self, target: Path, contents: list[tuple[str, bytes]], files: Sequence[ModelFile]) -> None:
        self._cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = Path(tempfile.mkdtemp(prefix=".fetching-", dir=self._cache_dir))
        try:
            for name, data in contents:
                (tmp / name).write_bytes(data)
            try:
                tmp.rename(target)
            except OSError:
                # Another load (of a model with the same files, or another frontend) got there first;
                # keep its directory if it is whole, else replace it.
                if not dir_matches(target, files):
                    shutil.rmtree(target, ignore_errors=True)
                    tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def close(self) -> None:
        for store in self._stores.values():
            await store.close()
