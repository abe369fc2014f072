"""Blob stores for model files: the discovery-store one against the memory, file and etcd stores, and
the NATS JetStream object store against a real nats-server."""

from __future__ import annotations

import os

import pytest

from tests.nats_server import NatsServer
from turbine.runtime.blobs import (
    NATS_BUCKET,
    STORE_CHUNK_BYTES,
    STORE_PREFIX,
    BlobError,
    JetStreamUnavailable,
    LazyBlobStore,
    StoreBlobStore,
    sha256_hex,
)
from turbine.runtime.discovery.base import Store
from turbine.runtime.nats_blobs import NatsObjectBlobStore

# ------------------------------------------------------------------------------- in the Store


async def test_a_lazy_store_is_made_on_first_use_only(store: Store) -> None:
    made: list[StoreBlobStore] = []

    def make() -> StoreBlobStore:
        made.append(StoreBlobStore(store))
        return made[-1]

    async with LazyBlobStore("store", make) as unused:
        assert unused.scheme == "store"
    assert not made  # closing an unused store makes nothing
    async with LazyBlobStore("store", make) as lazy:
        location = await lazy.put(b"weights")
        assert await lazy.get(location) == b"weights"
    assert len(made) == 1


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 4567])
async def test_store_blobs_round_trip_across_chunk_boundaries(store: Store, size: int) -> None:
    blobs = StoreBlobStore(store, chunk_bytes=1000)
    data = os.urandom(size)
    location = await blobs.put(data)
    assert location == f"store:{STORE_PREFIX}{sha256_hex(data)}"
    # Another reader (another frontend) with its own instance reads it back.
    assert await StoreBlobStore(store).get(location) == data
    chunks = [kv for kv in await store.get_prefix(f"{STORE_PREFIX}{sha256_hex(data)}/")]
    assert len(chunks) == max(1, -(-size // 1000))
    assert all(len(kv.value) <= 1000 for kv in chunks)


async def test_store_blobs_of_real_size_fit_etcds_request_limit(store: Store) -> None:
    # 1.3 MiB: one value would pass etcd's 1.5 MiB limit once base64-encoded; chunks do not.
    data = os.urandom(1300 * 1024)
    location = await StoreBlobStore(store).put(data)
    assert await StoreBlobStore(store).get(location) == data
    assert len(await store.get_prefix(f"{STORE_PREFIX}{sha256_hex(data)}/")) == -(
        -len(data) // STORE_CHUNK_BYTES
    )


async def test_store_blobs_are_shared_unleased_and_repaired(store: Store) -> None:
    blobs = StoreBlobStore(store, chunk_bytes=100)
    data = os.urandom(250)
    location = await blobs.put(data)
    assert await blobs.put(data) == location
    key = f"{STORE_PREFIX}{sha256_hex(data)}"
    keys = await store.get_prefix(key)
    assert sorted(kv.key for kv in keys) == [key, f"{key}/0", f"{key}/1", f"{key}/2"]
    # No lease: a worker that leaves does not take a blob other workers still advertise.
    assert all(kv.lease_id is None for kv in keys)
    # A lost chunk fails the read, and the next worker's put writes it again.
    await store.delete(f"{key}/1")
    with pytest.raises(BlobError, match="chunk 1 of 3 is missing"):
        await blobs.get(location)
    assert await blobs.put(data) == location
    assert await blobs.get(location) == data


async def test_store_blob_errors(store: Store) -> None:
    blobs = StoreBlobStore(store, chunk_bytes=100)
    with pytest.raises(BlobError, match="is not in the store"):
        await blobs.get(f"store:{STORE_PREFIX}{sha256_hex(b'never put')}")
    with pytest.raises(BlobError, match="not a store location"):
        await blobs.get("nats-os:bucket/x")
    location = await blobs.put(b"x" * 150)
    await store.put(location.removeprefix("store:"), b"\xc1 not msgpack")
    with pytest.raises(BlobError, match="malformed head"):
        await blobs.get(location)


# ------------------------------------------------------------------------ NATS object store


@pytest.mark.integration
async def test_nats_objects_round_trip_between_clients(nats_js: NatsServer) -> None:
    data = os.urandom(300 * 1024)  # several of the object store's 128 KiB chunks
    worker = NatsObjectBlobStore(nats_js.url)
    try:
        location = await worker.put(data)
        assert location == f"nats-os:{NATS_BUCKET}/{sha256_hex(data)}"
        assert await worker.put(data) == location  # already there
        assert await worker.put(b"") == f"nats-os:{NATS_BUCKET}/{sha256_hex(b'')}"
    finally:
        await worker.close()  # the objects outlive the publisher's connection
    frontend = NatsObjectBlobStore(nats_js.url)
    try:
        assert await frontend.get(location) == data
        assert await frontend.get(f"nats-os:{NATS_BUCKET}/{sha256_hex(b'')}") == b""
        with pytest.raises(BlobError, match="is not in the NATS object store"):
            await frontend.get(f"nats-os:{NATS_BUCKET}/{sha256_hex(b'never put')}")
        with pytest.raises(BlobError, match="is not in bucket"):
            await frontend.get(f"nats-os:other/{sha256_hex(data)}")
    finally:
        await frontend.close()


@pytest.mark.integration
async def test_nats_objects_survive_a_server_restart_and_the_client_reconnects(nats_js: NatsServer) -> None:
    blobs = NatsObjectBlobStore(nats_js.url)
    try:
        location = await blobs.put(b"tokenizer bytes")
        nats_js.restart()
        # JetStream keeps the object on disk; the dropped connection is replaced on the next use.
        assert await blobs.get(location) == b"tokenizer bytes"
    finally:
        await blobs.close()


@pytest.mark.integration
async def test_nats_without_jetstream_is_reported_as_such(nats_server: NatsServer) -> None:
    blobs = NatsObjectBlobStore(nats_server.url)
    try:
        with pytest.raises(JetStreamUnavailable, match="start nats-server with -js"):
            await blobs.put(b"x")
    finally:
        await blobs.close()
