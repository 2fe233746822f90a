"""What only the SQLite key store does, on real files: its file (mode, WAL, refusing files that
are not its database), column types SQLite lets any value into, and reads served from an in-memory
copy kept exact against other connections' writes. The contract every backend keeps is in
``test_store_contract.py``."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from knox.errors import InternalError
from knox_server import sqlite_store
from knox_server.sqlite_store import (
    CorruptRowError,
    SQLiteKeyStore,
    decode_versions,
    encode_acl,
)
from knox_server.store import KeyMeta
from tests.stored_keys import ACL, make_key


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteKeyStore]:
    s = await SQLiteKeyStore.open(tmp_path / "keys.db")
    try:
        yield s
    finally:
        await s.aclose()


async def test_the_file_is_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    s = await SQLiteKeyStore.open(path)
    await s.add(make_key("k", 1, 2))
    await s.aclose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def corrupt(path: Path, column: str, value: object) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE knox_keys SET {column} = ? WHERE id = 'bad'", (value,))
    conn.close()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("acl", b"\x00", "acl column is not text"),
        ("hash", b"\x00", "hash column is not text"),
        ("versions", "text", "versions column is not a blob"),
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


# --- the in-memory copy -------------------------------------------------------------------------


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
