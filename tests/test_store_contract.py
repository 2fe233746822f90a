"""The KeyStore contract, on every backend: SQLite files and PostgreSQL schemas (skipped with a
reason when ``KNOX_TEST_POSTGRES_DSN`` is not set). Several stores on one database stand for server
replicas (or a server and ``rewrap``) sharing it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio
import trio.lowlevel

from knox.errors import ConcurrentChangeError, InternalError, KeyExistsError, KeyNotFoundError
from knox.model import Access, AccessType, PrincipalType, VersionStatus
from knox_server.crypto import MasterKeyring
from knox_server.main import open_store
from knox_server.rewrap import rewrap
from knox_server.rowcodec import CorruptRowError, encode_versions
from knox_server.store import KeyMeta, KeyStore, StoredKey, StoredVersion
from tests.conftest import Backend, StoreFactory
from tests.stored_keys import ACL, make_key

WAIT = 30


@pytest.fixture
async def store(store_factory: StoreFactory) -> KeyStore:
    return await store_factory()


def with_version(*, id: int = 1, ts: int = 0) -> StoredKey:
    key = make_key("k", 1)
    return replace(key, versions=(replace(key.versions[0], id=id, ts=ts),))


async def test_add_get_meta_delete(store: KeyStore) -> None:
    assert await store.get("a") is None
    assert await store.meta() == {}
    added = await store.add(make_key("a", 1, 2**64 - 1))
    assert added.row_version > 0
    assert added == replace(make_key("a", 1, 2**64 - 1), row_version=added.row_version)
    assert await store.get("a") == added
    b = await store.add(make_key("b", 5, acl=()))
    assert b.row_version > added.row_version

    assert await store.meta() == {
        "a": KeyMeta(hash=added.hash, acl=ACL),
        "b": KeyMeta(hash=b.hash, acl=()),
    }
    assert list(await store.meta(["b", "missing", "a", "b"])) == ["b", "a"]
    assert await store.meta(["b", "missing", "b"]) == {"b": KeyMeta(hash=b.hash, acl=())}
    assert await store.meta([]) == {}

    assert await store.delete("a") is True
    assert await store.delete("a") is False
    assert await store.get("a") is None
    assert list(await store.meta()) == ["b"]


async def test_add_existing_key_fails_and_keeps_the_original(store: KeyStore) -> None:
    first = await store.add(make_key("k", 1))
    with pytest.raises(KeyExistsError, match="Key k already exists"):
        await store.add(make_key("k", 2))
    assert await store.get("k") == first


async def test_update_replaces_and_bumps_row_version(store: KeyStore) -> None:
    added = await store.add(make_key("k", 1))
    changed = replace(make_key("k", 1, 2, acl=ACL[:1]), row_version=added.row_version)
    updated = await store.update(changed)
    assert updated == replace(changed, row_version=updated.row_version)
    assert updated.row_version > added.row_version
    assert await store.get("k") == updated
    assert await store.meta(["k"]) == {"k": KeyMeta(hash=changed.hash, acl=ACL[:1])}


async def test_two_updates_from_the_same_read_one_wins(store: KeyStore) -> None:
    added = await store.add(make_key("k", 1))
    read = await store.get("k")
    assert read == added
    winner = await store.update(replace(read, versions=make_key("k", 1, 2).versions))
    with pytest.raises(ConcurrentChangeError, match="Key k changed concurrently"):
        await store.update(replace(read, versions=make_key("k", 1, 3).versions))
    assert await store.get("k") == winner


async def test_update_of_deleted_key_is_not_found(store: KeyStore) -> None:
    read = await store.add(make_key("k", 1))
    await store.delete("k")
    with pytest.raises(KeyNotFoundError, match="No such key k"):
        await store.update(read)
    assert await store.get("k") is None


async def test_delete_and_recreate_never_reuses_a_row_version(store: KeyStore) -> None:
    stale = await store.add(make_key("k", 1))
    await store.delete("k")
    recreated = await store.add(make_key("k", 9))
    assert recreated.row_version > stale.row_version
    with pytest.raises(ConcurrentChangeError):
        await store.update(stale)
    assert await store.get("k") == recreated


@pytest.mark.parametrize("n_replicas", [1, 3])
async def test_tasks_racing_on_one_key_lose_nothing(
    store_factory: StoreFactory, n_replicas: int
) -> None:
    """Tasks on one store, and on several replicas, each add a version by read-update-retry."""
    replicas = [await store_factory() for _ in range(n_replicas)]
    await replicas[0].add(make_key("k", 1))

    async def add_version(store: KeyStore, vid: int) -> None:
        while True:
            key = await store.get("k")
            assert key is not None
            new = make_key("k", *(v.id for v in key.versions), vid)
            try:
                await store.update(replace(new, row_version=key.row_version))
                return
            except ConcurrentChangeError:
                continue

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for vid in range(2, 20):
                nursery.start_soon(add_version, replicas[vid % n_replicas], vid)
    for replica in replicas:
        key = await replica.get("k")
        assert key is not None
        assert sorted(v.id for v in key.versions) == list(range(1, 20))


async def test_every_replica_reads_the_others_writes(store_factory: StoreFactory) -> None:
    server, other = await store_factory(), await store_factory()
    assert await server.get("k") is None
    added = await other.add(make_key("k", 1))
    assert await server.get("k") == added
    assert await server.meta(["k"]) == {"k": KeyMeta(hash=added.hash, acl=ACL)}

    updated = await other.update(
        replace(make_key("k", 1, 2, acl=ACL[:1]), row_version=added.row_version)
    )
    assert await server.meta(["k"]) == {"k": KeyMeta(hash=updated.hash, acl=ACL[:1])}
    assert await server.meta() == {"k": KeyMeta(hash=updated.hash, acl=ACL[:1])}
    assert await server.get("k") == updated
    with pytest.raises(ConcurrentChangeError):
        await server.update(replace(make_key("k", 1, 3), row_version=added.row_version))

    assert await other.delete("k") is True
    assert await server.meta(["k"]) == {}
    assert await server.meta() == {}
    assert await server.get("k") is None
    with pytest.raises(KeyNotFoundError):
        await server.update(updated)

    # The server's own writes and the other's interleave; each side reads both.
    mine = await server.add(make_key("mine", 3))
    theirs = await other.add(make_key("theirs", 4))
    assert (
        await server.meta()
        == await other.meta()
        == {
            "mine": KeyMeta(hash=mine.hash, acl=ACL),
            "theirs": KeyMeta(hash=theirs.hash, acl=ACL),
        }
    )
    assert await other.get("mine") == mine
    assert await server.get("theirs") == theirs


async def test_stale_update_conflicts_and_the_next_get_is_fresh(
    store_factory: StoreFactory,
) -> None:
    server, other = await store_factory(), await store_factory()
    read = await server.add(make_key("k", 1))
    assert await server.get("k") == read
    theirs = await other.update(replace(make_key("k", 1, 2), row_version=read.row_version))
    with pytest.raises(ConcurrentChangeError):
        await server.update(replace(make_key("k", 1, 3), row_version=read.row_version))
    assert await server.get("k") == theirs
    await other.delete("k")
    with pytest.raises(KeyNotFoundError):
        await server.update(theirs)
    assert await server.get("k") is None
    again = await other.add(make_key("k", 7))
    with pytest.raises(KeyExistsError):
        await server.add(make_key("k", 8))
    assert await server.get("k") == again


async def test_meta_of_many_ids(store: KeyStore) -> None:
    for i in range(0, 1200, 2):
        await store.add(make_key(f"k{i}", i + 1, acl=ACL[: i % 3]))
    wanted = [f"k{i}" for i in range(1200)]
    meta = await store.meta(wanted)
    assert list(meta) == [f"k{i}" for i in range(0, 1200, 2)]
    assert meta["k1198"] == KeyMeta(hash="hash-(1199,)", acl=ACL[: 1198 % 3])
    assert meta == await store.meta()


@pytest.mark.parametrize("key_id", ["a\x00b", "x" * 513, ""])
async def test_reads_of_odd_ids_find_nothing(store: KeyStore, key_id: str) -> None:
    await store.add(make_key("k", 1))
    assert await store.get(key_id) is None
    assert list(await store.meta([key_id, "k"])) == ["k"]
    assert await store.delete(key_id) is False


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            replace(make_key("k", 1), acl=(Access(PrincipalType.UNKNOWN, "x", AccessType.READ),)),
            "Invalid PrincipalType",
        ),
        (with_version(id=2**64), "id is not a 64-bit unsigned integer"),
        (with_version(id=-1), "id is not a 64-bit unsigned integer"),
        (with_version(ts=2**63), "ts is not a 64-bit signed integer"),
    ],
)
async def test_unstorable_key_is_refused_and_nothing_written(
    store: KeyStore, key: StoredKey, message: str
) -> None:
    with pytest.raises(InternalError, match=f"Key k cannot be stored: .*{message}"):
        await store.add(key)
    assert await store.get("k") is None
    good = await store.add(make_key("k", 1))
    with pytest.raises(InternalError, match="cannot be stored"):
        await store.update(replace(key, row_version=good.row_version))
    assert await store.get("k") == good


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("acl", "not json", "acl column does not decode"),
        ("acl", '[{"type":"Nope","id":"x","access":"Read"}]', "acl column does not decode"),
        ("acl", '{"type":"User"}', "acl column does not decode"),
        ("versions", b"\xc1garbage", "versions column: not msgpack"),
        (
            "versions",
            b"\x91\x93\x01\xa7Primary\x00",
            "versions column: version 0: expected a 4-element array",
        ),
        ("versions", encode_versions(()) + b"\x00", "versions column: not msgpack"),
    ],
)
async def test_corrupt_row_fails_only_its_reads(
    store: KeyStore, backend: Backend, column: str, value: object, message: str
) -> None:
    await store.add(make_key("bad", 1))
    good = await store.add(make_key("good", 2))
    backend.set_column("bad", column, value)
    with pytest.raises(CorruptRowError, match=f"stored key bad: {message}") as caught:
        await store.get("bad")
    assert "garbage" not in str(caught.value) and "Nope" not in str(caught.value)
    if column == "acl":
        with pytest.raises(CorruptRowError, match=f"stored key bad: {message}"):
            await store.meta(["good", "bad"])
    else:
        assert list(await store.meta(["bad", "good"])) == ["bad", "good"]
    assert await store.get("good") == good
    # Rewriting a corrupt row makes it readable again.
    assert await store.delete("bad") is True
    assert await store.get("bad") is None


async def test_closed_store_refuses_calls_and_a_reopened_one_carries_on(backend: Backend) -> None:
    store = await open_store(backend.url, migrate=True)
    added = await store.add(make_key("k", 1, 2))
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(InternalError, match="closed"):
        await store.get("k")
    store = await open_store(backend.url)
    try:
        assert await store.get("k") == added
        again = await store.update(replace(added, versions=make_key("k", 1, 2, 3).versions))
        assert again.row_version > added.row_version
    finally:
        await store.aclose()


async def test_rewrap_by_another_replica_while_reads_are_served(
    store_factory: StoreFactory,
) -> None:
    server, rewrapper = await store_factory(), await store_factory()
    old = MasterKeyring({0: b"\x00" * 32})
    both = MasterKeyring({0: b"\x00" * 32, 1: b"\x11" * 32})
    new_only = MasterKeyring({1: b"\x11" * 32})

    def plaintext(key_id: str, vid: int) -> bytes:
        return b"%s v%d" % (key_id.encode(), vid)

    def sealed_key(key_id: str) -> StoredKey:
        versions = tuple(
            StoredVersion(
                vid, old.seal(key_id, vid, vid, plaintext(key_id, vid)), VersionStatus.ACTIVE, vid
            )
            for vid in (1, 2)
        )
        return StoredKey(id=key_id, acl=ACL, versions=versions, hash=f"h-{key_id}")

    def opens(key: StoredKey | None, ring: MasterKeyring) -> None:
        assert key is not None
        for v in key.versions:
            assert ring.open(key.id, v.id, v.ts, v.sealed) == plaintext(key.id, v.id)

    key_ids = [f"k{i:02d}" for i in range(40)]
    for key_id in key_ids:
        await server.add(sealed_key(key_id))
    hashes = {key_id: KeyMeta(hash=f"h-{key_id}", acl=ACL) for key_id in key_ids}
    reads = 0

    async def serve_reads(done: trio.Event) -> None:
        nonlocal reads
        while not done.is_set():
            for key_id in key_ids:
                opens(await server.get(key_id), both)
                reads += 1
            assert await server.meta(key_ids) == hashes
            # SQLite answers from memory without a checkpoint: let the rewrap run.
            await trio.lowlevel.checkpoint()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            done = trio.Event()
            nursery.start_soon(serve_reads, done)
            report = await rewrap(rewrapper, both)
            done.set()
    assert report.keys_rewrapped == len(key_ids) and report.ok
    assert reads > 0
    for key_id in key_ids:
        opens(await server.get(key_id), new_only)
