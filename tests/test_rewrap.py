"""Online re-wrapping to a new master key, on a real SQLite store, with writers running."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from knox.errors import ConcurrentChangeError
from knox.model import Access, AccessType, PrincipalType, VersionStatus
from knox_server.crypto import MasterKeyring
from knox_server.rewrap import REASON_CONFLICTS, REASON_UNREADABLE, RewrapReport, rewrap
from knox_server.sqlite_store import SQLiteKeyStore
from knox_server.store import KeyMeta, KeyStore, StoredKey, StoredVersion

OLD = MasterKeyring({0: b"\x00" * 32})
BOTH = MasterKeyring({0: b"\x00" * 32, 1: b"\x11" * 32})
NEW_ONLY = MasterKeyring({1: b"\x11" * 32})
ACL = (Access(PrincipalType.USER, "alice", AccessType.ADMIN),)


def secret(key_id: str, version_id: int) -> bytes:
    return f"secret of {key_id} v{version_id}".encode()


def version(ring: MasterKeyring, key_id: str, vid: int, status: VersionStatus) -> StoredVersion:
    ts = 1_000 + vid
    return StoredVersion(vid, ring.seal(key_id, vid, ts, secret(key_id, vid)), status, ts)


def make_key(ring: MasterKeyring, key_id: str, n_versions: int) -> StoredKey:
    versions = tuple(
        version(ring, key_id, vid, VersionStatus.PRIMARY if vid == 1 else VersionStatus.ACTIVE)
        for vid in range(1, n_versions + 1)
    )
    return StoredKey(id=key_id, acl=ACL, versions=versions, hash=f"h{n_versions}")


async def add_version(store: KeyStore, ring: MasterKeyring, key_id: str, vid: int) -> None:
    """What the server's add-version route does: read, append, update, retry on conflict."""
    while True:
        key = await store.get(key_id)
        assert key is not None
        new = version(ring, key_id, vid, VersionStatus.ACTIVE)
        try:
            await store.update(replace(key, versions=(*key.versions, new)))
            return
        except ConcurrentChangeError:
            continue


def assert_all_open(keys: Sequence[StoredKey], ring: MasterKeyring) -> None:
    for key in keys:
        for v in key.versions:
            assert ring.open(key.id, v.id, v.ts, v.sealed) == secret(key.id, v.id)


async def all_keys(store: KeyStore) -> list[StoredKey]:
    keys = [await store.get(key_id) for key_id in sorted(await store.meta())]
    return [k for k in keys if k is not None]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteKeyStore]:
    s = await SQLiteKeyStore.open(tmp_path / "keys.db")
    try:
        yield s
    finally:
        await s.aclose()


async def test_rewrap_everything_then_drop_the_old_key(store: SQLiteKeyStore) -> None:
    for i in range(5):
        await store.add(make_key(OLD, f"k{i}", i + 1))
    await store.add(make_key(BOTH, "already_new", 2))
    before = {k.id: k for k in await all_keys(store)}

    report = await rewrap(store, BOTH)

    assert report == RewrapReport(keys_rewrapped=5, versions_rewrapped=15, keys_current=1)
    assert report.ok
    after = await all_keys(store)
    for key in after:
        assert not any(BOTH.needs_rewrap(v.sealed) for v in key.versions)
        old = before[key.id]
        assert (key.acl, key.hash) == (old.acl, old.hash)
        assert [(v.id, v.status, v.ts) for v in key.versions] == [
            (v.id, v.status, v.ts) for v in old.versions
        ]
    assert_all_open(after, NEW_ONLY)
    assert await rewrap(store, BOTH) == RewrapReport(keys_current=6)


async def test_rewrap_of_empty_store(store: SQLiteKeyStore) -> None:
    assert await rewrap(store, BOTH) == RewrapReport()


async def test_rewrap_with_writers_loses_no_update(store: SQLiteKeyStore) -> None:
    key_ids = [f"k{i}" for i in range(4)]
    for key_id in key_ids:
        await store.add(make_key(OLD, key_id, 3))
    added: dict[str, list[int]] = {key_id: [] for key_id in key_ids}

    async def writer(key_id: str) -> None:
        # One busy writer per key, so rewrap's read-then-update races a write on every key.
        for vid in range(100, 110):
            await add_version(store, BOTH, key_id, vid)
            added[key_id].append(vid)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for key_id in key_ids:
                nursery.start_soon(writer, key_id)
            report = await rewrap(store, BOTH, max_retries=100)

    assert report.ok
    assert report.keys_rewrapped == len(key_ids)
    after = await all_keys(store)
    for key in after:
        assert [v.id for v in key.versions] == [1, 2, 3, *added[key.id]]
        assert len(added[key.id]) == 10
    assert_all_open(after, NEW_ONLY)


class Interleaved:
    """A real store whose ``update`` first lets a concurrent writer in, as a busy server would
    between the re-wrapper's read and its write."""

    def __init__(self, inner: KeyStore, before_update: Callable[[str], Awaitable[None]]) -> None:
        self.inner = inner
        self.before_update = before_update

    async def get(self, key_id: str) -> StoredKey | None:
        return await self.inner.get(key_id)

    async def meta(self, key_ids: Sequence[str] | None = None) -> dict[str, KeyMeta]:
        return await self.inner.meta(key_ids)

    async def add(self, key: StoredKey) -> StoredKey:
        return await self.inner.add(key)

    async def update(self, key: StoredKey) -> StoredKey:
        await self.before_update(key.id)
        return await self.inner.update(key)

    async def delete(self, key_id: str) -> bool:
        return await self.inner.delete(key_id)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_conflict_is_retried_after_rereading(store: SQLiteKeyStore) -> None:
    await store.add(make_key(OLD, "k", 2))
    writes = 0

    async def one_concurrent_write(key_id: str) -> None:
        nonlocal writes
        if writes < 2:
            writes += 1
            await add_version(store, OLD, key_id, 10 + writes)

    report = await rewrap(Interleaved(store, one_concurrent_write), BOTH)

    assert report == RewrapReport(keys_rewrapped=1, versions_rewrapped=4, conflicts_retried=2)
    key = await store.get("k")
    assert key is not None
    assert [v.id for v in key.versions] == [1, 2, 11, 12]
    assert_all_open([key], NEW_ONLY)


async def test_endless_conflicts_are_reported_and_leave_the_key_intact(
    store: SQLiteKeyStore,
) -> None:
    await store.add(make_key(OLD, "busy", 1))
    await store.add(make_key(OLD, "quiet", 1))
    next_vid = 100

    async def write_busy(key_id: str) -> None:
        nonlocal next_vid
        if key_id == "busy":
            next_vid += 1
            await add_version(store, OLD, key_id, next_vid)

    report = await rewrap(Interleaved(store, write_busy), BOTH, max_retries=2)

    assert report == RewrapReport(
        keys_rewrapped=1,
        versions_rewrapped=1,
        conflicts_retried=3,
        failed=(("busy", REASON_CONFLICTS),),
    )
    assert not report.ok
    busy = await store.get("busy")
    assert busy is not None
    assert [v.id for v in busy.versions] == [1, 101, 102, 103]
    assert_all_open([busy], OLD)


async def test_key_deleted_meanwhile_is_skipped(store: SQLiteKeyStore) -> None:
    for key_id in ("a", "b", "c"):
        await store.add(make_key(OLD, key_id, 1))

    async def delete_b(key_id: str) -> None:
        if key_id == "b":
            await store.delete("b")

    report = await rewrap(Interleaved(store, delete_b), BOTH)

    assert report == RewrapReport(keys_rewrapped=2, versions_rewrapped=2, keys_skipped=1)
    assert report.ok
    assert sorted(await store.meta()) == ["a", "c"]
    assert_all_open(await all_keys(store), NEW_ONLY)


async def test_unreadable_key_is_reported_and_the_rest_goes_on(store: SQLiteKeyStore) -> None:
    stranger = MasterKeyring({5: b"\x55" * 32})
    await store.add(make_key(OLD, "a", 1))
    lost = await store.add(make_key(stranger, "lost", 2))
    await store.add(make_key(OLD, "z", 1))

    report = await rewrap(store, MasterKeyring({0: b"\x00" * 32, 6: b"\x66" * 32}))

    assert report.keys_rewrapped == 2
    assert report.failed == (("lost", REASON_UNREADABLE),)
    assert await store.get("lost") == lost
