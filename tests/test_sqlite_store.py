"""The SQLite key store on real files: CRUD, optimistic concurrency, persistence, corruption."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from knox.errors import ConcurrentChangeError, InternalError, KeyExistsError, KeyNotFoundError
from knox.model import Access, AccessType, PrincipalType, VersionStatus
from knox_server import sqlite_store
from knox_server.crypto import MasterKeyring
from knox_server.rewrap import rewrap
from knox_server.sqlite_store import (
    CorruptRowError,
    SQLiteKeyStore,
    decode_versions,
    encode_acl,
    encode_versions,
)
from knox_server.store import KeyMeta, StoredKey, StoredVersion

ACL = (
    Access(PrincipalType.USER, "alice", AccessType.ADMIN),
    Access(PrincipalType.MACHINE_PREFIX, "web<&>", AccessType.READ),
    Access(PrincipalType.SERVICE, "spiffe://example.org/ns/prod/sa/app", AccessType.WRITE),
)


def make_key(key_id: str, *version_ids: int, acl: tuple[Access, ...] = ACL) -> StoredKey:
    ids = version_ids or (1,)
    versions = tuple(
        StoredVersion(
            id=vid,
            sealed=b"\x01\x00sealed-" + vid.to_bytes(8, "big"),
            status=VersionStatus.PRIMARY if i == 0 else VersionStatus.ACTIVE,
            ts=1_700_000_000_000_000_000 + vid % 1000,
        )
        for i, vid in enumerate(ids)
    )
    return StoredKey(id=key_id, acl=acl, versions=versions, hash=f"hash-{ids}")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteKeyStore]:
    s = await SQLiteKeyStore.open(tmp_path / "keys.db")
    try:
        yield s
    finally:
        await s.aclose()


async def test_add_get_meta_delete(store: SQLiteKeyStore) -> None:
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
    assert await store.meta(["b", "missing", "b"]) == {"b": KeyMeta(hash=b.hash, acl=())}
    assert await store.meta([]) == {}

    assert await store.delete("a") is True
    assert await store.delete("a") is False
    assert await store.get("a") is None
    assert list(await store.meta()) == ["b"]


async def test_add_existing_key_fails_and_keeps_the_original(store: SQLiteKeyStore) -> None:
    first = await store.add(make_key("k", 1))
    with pytest.raises(KeyExistsError, match="Key k already exists"):
        await store.add(make_key("k", 2))
    assert await store.get("k") == first


async def test_update_replaces_and_bumps_row_version(store: SQLiteKeyStore) -> None:
    added = await store.add(make_key("k", 1))
    changed = replace(make_key("k", 1, 2, acl=ACL[:1]), row_version=added.row_version)
    updated = await store.update(changed)
    assert updated.row_version > added.row_version
    assert await store.get("k") == updated
    assert (await store.meta(["k"]))["k"] == KeyMeta(hash=changed.hash, acl=ACL[:1])


async def test_two_updates_from_the_same_read_one_wins(store: SQLiteKeyStore) -> None:
    await store.add(make_key("k", 1))
    read = await store.get("k")
    assert read is not None
    winner = await store.update(replace(read, versions=make_key("k", 1, 2).versions))
    with pytest.raises(ConcurrentChangeError):
        await store.update(replace(read, versions=make_key("k", 1, 3).versions))
    assert await store.get("k") == winner


async def test_concurrent_updates_in_tasks_lose_nothing(store: SQLiteKeyStore) -> None:
    await store.add(make_key("k", 1))

    async def add_version(vid: int) -> None:
        while True:
            key = await store.get("k")
            assert key is not None
            new = make_key("k", *(v.id for v in key.versions), vid)
            try:
                await store.update(replace(new, row_version=key.row_version))
                return
            except ConcurrentChangeError:
                continue

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for vid in range(2, 12):
                nursery.start_soon(add_version, vid)
    key = await store.get("k")
    assert key is not None
    assert sorted(v.id for v in key.versions) == list(range(1, 12))


async def test_update_of_deleted_key_is_not_found(store: SQLiteKeyStore) -> None:
    read = await store.add(make_key("k", 1))
    await store.delete("k")
    with pytest.raises(KeyNotFoundError, match="No such key k"):
        await store.update(read)
    assert await store.get("k") is None


async def test_delete_and_recreate_never_reuses_a_row_version(store: SQLiteKeyStore) -> None:
    stale = await store.add(make_key("k", 1))
    await store.delete("k")
    recreated = await store.add(make_key("k", 9))
    assert recreated.row_version != stale.row_version
    with pytest.raises(ConcurrentChangeError):
        await store.update(stale)
    assert await store.get("k") == recreated


async def test_data_persists_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    s = await SQLiteKeyStore.open(path)
    added = await s.add(make_key("k", 1, 2))
    await s.aclose()
    await s.aclose()  # idempotent
    with pytest.raises(InternalError, match="closed"):
        await s.get("k")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    s = await SQLiteKeyStore.open(path)
    try:
        assert await s.get("k") == added
        again = await s.update(replace(added, versions=make_key("k", 1, 2, 3).versions))
        assert again.row_version > added.row_version
    finally:
        await s.aclose()


async def test_meta_of_many_ids_spans_chunks(store: SQLiteKeyStore) -> None:
    for i in range(0, 1200, 2):
        await store.add(make_key(f"k{i}", i + 1, acl=ACL[: i % 3]))
    wanted = [f"k{i}" for i in range(1200)]
    meta = await store.meta(wanted)
    assert sorted(meta) == sorted(f"k{i}" for i in range(0, 1200, 2))
    assert meta["k1198"] == KeyMeta(hash="hash-(1199,)", acl=ACL[: 1198 % 3])
    assert meta == await store.meta()


def corrupt(path: Path, column: str, value: object) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE knox_keys SET {column} = ? WHERE id = 'bad'", (value,))
    conn.close()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("acl", "not json", "acl column does not decode"),
        ("acl", '[{"type":"Nope","id":"x","access":"Read"}]', "acl column does not decode"),
        ("acl", '{"type":"User"}', "acl column does not decode"),
        ("acl", b"\x00", "acl column is not text"),
        ("hash", b"\x00", "hash column is not text"),
        ("versions", b"\xc1garbage", "versions column: not msgpack"),
        (
            "versions",
            b"\x91\x93\x01\xa7Primary\x00",
            "versions column: version 0: expected a 4-element array",
        ),
        ("versions", "text", "versions column is not a blob"),
        ("versions", encode_versions(()) + b"\x00", "versions column: not msgpack"),
        ("row_version", "x", "row_version column is not an integer"),
    ],
)
async def test_corrupt_row_is_an_internal_error(
    tmp_path: Path, column: str, value: object, message: str
) -> None:
    path = tmp_path / "keys.db"
    s = await SQLiteKeyStore.open(path)
    try:
        await s.add(make_key("bad", 1))
        await s.add(make_key("good", 2))
        corrupt(path, column, value)
        with pytest.raises(InternalError, match=f"stored key bad: {message}"):
            if column in ("acl", "hash"):
                await s.meta(["bad", "good"])
            await s.get("bad")
        assert (await s.get("good")) is not None
    finally:
        await s.aclose()


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ([-1, "Primary", 0, b"s"], "bad id"),
        ([True, "Primary", 0, b"s"], "bad id"),
        ([1, "Main", 0, b"s"], "bad status"),
        ([1, "Primary", 2**63, b"s"], "bad ts"),
        ([1, "Primary", 0.5, b"s"], "bad ts"),
        ([1, "Primary", 0, "s"], "sealed data is not bytes"),
    ],
)
def test_decode_versions_is_strict(item: list[object], message: str) -> None:
    import msgpack

    with pytest.raises(ValueError, match=message):
        decode_versions(msgpack.packb([item], use_bin_type=True))
    with pytest.raises(ValueError, match="expected an array"):
        decode_versions(msgpack.packb({"a": 1}))


def test_acl_column_is_knox_json() -> None:
    assert encode_acl(ACL[:2]) == (
        '[{"type":"User","id":"alice","access":"Admin"},'
        '{"type":"MachinePrefix","id":"web\\u003c\\u0026\\u003e","access":"Read"}]'
    )
    assert encode_acl(()) == "[]"


async def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a database, just some text that is long enough\n" * 200)
    with pytest.raises(InternalError, match=r"notes\.txt: not an SQLite database"):
        await SQLiteKeyStore.open(path)
    assert path.read_bytes().startswith(b"this is not a database")


async def test_other_programs_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE cache (k TEXT)")
    conn.close()
    with pytest.raises(InternalError, match="database of another program"):
        await SQLiteKeyStore.open(path)

    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA application_id = 42")
    conn.close()
    with pytest.raises(InternalError, match="database of another program"):
        await SQLiteKeyStore.open(path)


async def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    await (await SQLiteKeyStore.open(path)).aclose()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(InternalError, match="schema version 99 is not supported"):
        await SQLiteKeyStore.open(path)


async def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InternalError, match="cannot open key store"):
        await SQLiteKeyStore.open(tmp_path / "no" / "such" / "dir.db")
    with pytest.raises(InternalError, match="cannot open key store"):
        await SQLiteKeyStore.open(tmp_path)


async def test_file_is_in_wal_mode(store: SQLiteKeyStore, tmp_path: Path) -> None:
    await store.add(make_key("k", 1))
    with sqlite3.connect(tmp_path / "keys.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT id FROM knox_keys").fetchall() == [("k",)]
    conn.close()


def with_version(*, id: int = 1, ts: int = 0) -> StoredKey:
    key = make_key("k", 1)
    return replace(key, versions=(replace(key.versions[0], id=id, ts=ts),))


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
    store: SQLiteKeyStore, key: StoredKey, message: str
) -> None:
    with pytest.raises(InternalError, match=f"Key k cannot be stored: .*{message}"):
        await store.add(key)
    assert await store.get("k") is None
    good = await store.add(make_key("k", 1))
    with pytest.raises(InternalError, match="cannot be stored"):
        await store.update(replace(key, row_version=good.row_version))
    assert await store.get("k") == good


# --- the in-memory copy -------------------------------------------------------------------------


@pytest.fixture
async def two_stores(tmp_path: Path) -> AsyncIterator[tuple[SQLiteKeyStore, SQLiteKeyStore]]:
    """Two stores on one file, as two server processes (or a server and ``rewrap``) would be."""
    first = await SQLiteKeyStore.open(tmp_path / "keys.db")
    try:
        second = await SQLiteKeyStore.open(tmp_path / "keys.db")
        try:
            yield first, second
        finally:
            await second.aclose()
    finally:
        await first.aclose()


async def test_reads_need_no_worker_thread(store: SQLiteKeyStore) -> None:
    a = await store.add(make_key("a", 1))
    b = await store.add(make_key("b", 2))
    b2 = await store.update(replace(make_key("b", 2, 3), row_version=b.row_version))
    await store.delete("a")
    limiter = trio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = 1
    # With the only worker thread taken, a read that needed one would wait here forever.
    async with limiter:
        with trio.fail_after(5):
            assert await store.get("a") is None
            assert await store.get("b") == b2
            assert await store.meta(["a", "b"]) == {"b": KeyMeta(hash=b2.hash, acl=ACL)}
            assert await store.meta() == {"b": KeyMeta(hash=b2.hash, acl=ACL)}
    assert a.row_version < b.row_version < b2.row_version


async def test_writes_of_another_store_are_seen_by_the_next_read(
    two_stores: tuple[SQLiteKeyStore, SQLiteKeyStore],
) -> None:
    server, other = two_stores
    assert await server.get("k") is None
    added = await other.add(make_key("k", 1))
    assert await server.get("k") == added
    assert await server.meta(["k"]) == {"k": KeyMeta(hash=added.hash, acl=ACL)}

    updated = await other.update(
        replace(make_key("k", 1, 2, acl=ACL[:1]), row_version=added.row_version)
    )
    assert await server.meta() == {"k": KeyMeta(hash=updated.hash, acl=ACL[:1])}
    assert await server.get("k") == updated

    assert await other.delete("k") is True
    assert await server.meta(["k"]) == {}
    assert await server.get("k") is None

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
    two_stores: tuple[SQLiteKeyStore, SQLiteKeyStore],
) -> None:
    server, other = two_stores
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


async def test_a_failed_write_leaves_reads_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short busy_timeout, so the blocked write below fails quickly.
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_S", 0.05)
    store = await SQLiteKeyStore.open(tmp_path / "keys.db")
    other = sqlite3.connect(tmp_path / "keys.db", isolation_level=None)
    try:
        added = await store.add(make_key("k", 1))
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(InternalError, match="database error SQLITE_BUSY"), trio.fail_after(5):
            await store.update(replace(make_key("k", 1, 2), row_version=added.row_version))
        other.execute("ROLLBACK")
        assert await store.get("k") == added
        other.execute("DELETE FROM knox_keys WHERE id = 'k'")
        assert await store.get("k") is None
    finally:
        other.close()
        await store.aclose()


async def test_corrupt_rows_of_another_connection_fail_only_their_reads(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    s = await SQLiteKeyStore.open(path)
    try:
        good = await s.add(make_key("good", 1))
        await s.add(make_key("bad", 2))
        await s.add(make_key("badmeta", 3))
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE knox_keys SET versions = x'c1' WHERE id = 'bad'")
            conn.execute("UPDATE knox_keys SET hash = x'00' WHERE id = 'badmeta'")
        conn.close()
        for store in (s, reopened := await SQLiteKeyStore.open(path)):
            try:
                with pytest.raises(CorruptRowError, match="stored key bad: versions column"):
                    await store.get("bad")
                with pytest.raises(CorruptRowError, match="stored key badmeta: hash column"):
                    await store.get("badmeta")
                with pytest.raises(CorruptRowError, match="stored key badmeta: hash column"):
                    await store.meta(["good", "badmeta"])
                with pytest.raises(CorruptRowError, match="badmeta"):
                    await store.meta()
                assert await store.get("good") == good
                # Bad versions leave the change check working.
                assert list(await store.meta(["bad", "good"])) == ["bad", "good"]
            finally:
                if store is reopened:
                    await store.aclose()

        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM knox_keys WHERE id = 'badmeta'")
            conn.execute("INSERT INTO knox_keys VALUES (x'00', '[]', 'h', x'90', 99)")
        conn.close()
        with pytest.raises(CorruptRowError, match="1 key ids are not text"):
            await s.meta()
        assert sorted(await s.meta(["good", "bad"])) == ["bad", "good"]
        # Rewriting a corrupt row makes it readable again.
        await s.delete("bad")
        assert await s.get("bad") is None
    finally:
        await s.aclose()


async def test_rewrap_by_another_store_while_reads_are_served(
    two_stores: tuple[SQLiteKeyStore, SQLiteKeyStore],
) -> None:
    server, rewrapper = two_stores
    old = MasterKeyring({0: b"\x00" * 32})
    both = MasterKeyring({0: b"\x00" * 32, 1: b"\x11" * 32})
    new_only = MasterKeyring({1: b"\x11" * 32})

    def sealed_key(key_id: str) -> StoredKey:
        versions = tuple(
            StoredVersion(
                vid,
                old.seal(key_id, vid, vid, b"%s v%d" % (key_id.encode(), vid)),
                VersionStatus.ACTIVE,
                vid,
            )
            for vid in (1, 2)
        )
        return StoredKey(id=key_id, acl=ACL, versions=versions, hash=f"h-{key_id}")

    def opens(key: StoredKey | None, ring: MasterKeyring) -> None:
        assert key is not None
        for v in key.versions:
            assert ring.open(key.id, v.id, v.ts, v.sealed) == b"%s v%d" % (key.id.encode(), v.id)

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
            await trio.lowlevel.checkpoint()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            done = trio.Event()
            nursery.start_soon(serve_reads, done)
            report = await rewrap(rewrapper, both)
            done.set()
    assert report.keys_rewrapped == len(key_ids) and report.ok
    assert reads > 0
    for key_id in key_ids:
        opens(await server.get(key_id), new_only)
