"""The KeyStore contract on every backend (SQLite files and PostgreSQL schemas), then what only
the PostgreSQL backend does: migrations, announcements of committed writes, its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import trio

from knox.errors import ConcurrentChangeError, InternalError, KeyExistsError, KeyNotFoundError
from knox.model import Access, AccessType, PrincipalType, VersionStatus
from knox_server.config import ConfigError, load_config
from knox_server.crypto import MasterKeyring
from knox_server.dev import prepare_dev_state
from knox_server.main import open_store, run_server
from knox_server.pg_store import CHANNEL, SCHEMA_VERSION, MigrationReport, PostgresKeyStore, migrate
from knox_server.rewrap import rewrap
from knox_server.rowcodec import CorruptRowError
from knox_server.store import KeyMeta, KeyStore, StoredKey, StoredVersion
from tests.conftest import Backend, StoreFactory

ACL = (
    Access(PrincipalType.USER, "alice", AccessType.ADMIN),
    Access(PrincipalType.MACHINE_PREFIX, "web<&>", AccessType.READ),
    Access(PrincipalType.SERVICE, "spiffe://example.org/ns/prod/sa/app", AccessType.WRITE),
)
WAIT = 20


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
async def store(store_factory: StoreFactory) -> KeyStore:
    return await store_factory()


# --- the contract, on both backends -----------------------------------------------------------


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
    read = await store.add(make_key("k", 1))
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


async def test_replicas_racing_on_one_key_lose_nothing(store_factory: StoreFactory) -> None:
    replicas = [await store_factory() for _ in range(3)]
    await replicas[0].add(make_key("k", 1))
    conflicts = 0

    async def add_version(store: KeyStore, vid: int) -> None:
        nonlocal conflicts
        while True:
            key = await store.get("k")
            assert key is not None
            new = make_key("k", *(v.id for v in key.versions), vid)
            try:
                await store.update(replace(new, row_version=key.row_version))
                return
            except ConcurrentChangeError:
                conflicts += 1

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for vid in range(2, 20):
                nursery.start_soon(add_version, replicas[vid % 3], vid)
    for replica in replicas:
        key = await replica.get("k")
        assert key is not None
        assert sorted(v.id for v in key.versions) == list(range(1, 20))


async def test_every_replica_reads_the_others_writes(store_factory: StoreFactory) -> None:
    server, other = await store_factory(), await store_factory()
    assert await server.get("k") is None
    added = await other.add(make_key("k", 1))
    assert await server.get("k") == added
    updated = await other.update(
        replace(make_key("k", 1, 2, acl=ACL[:1]), row_version=added.row_version)
    )
    assert await server.meta(["k"]) == {"k": KeyMeta(hash=updated.hash, acl=ACL[:1])}
    assert await server.get("k") == updated
    with pytest.raises(ConcurrentChangeError):
        await server.update(replace(make_key("k", 1, 3), row_version=added.row_version))
    assert await other.delete("k") is True
    assert await server.meta() == {}
    with pytest.raises(KeyNotFoundError):
        await server.update(updated)
    again = await other.add(make_key("k", 7))
    with pytest.raises(KeyExistsError):
        await server.add(make_key("k", 8))
    assert await server.get("k") == again


async def test_meta_of_many_ids(store: KeyStore) -> None:
    for i in range(0, 600, 2):
        await store.add(make_key(f"k{i}", i + 1, acl=ACL[: i % 3]))
    wanted = [f"k{i}" for i in range(600)]
    meta = await store.meta(wanted)
    assert list(meta) == [f"k{i}" for i in range(0, 600, 2)]
    assert meta["k598"] == KeyMeta(hash="hash-(599,)", acl=ACL[: 598 % 3])
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
        (
            replace(make_key("k", 1), versions=(replace(make_key("k", 1).versions[0], id=2**64),)),
            "id is not a 64-bit unsigned integer",
        ),
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
        ("versions", b"\xc1garbage", "versions column: not msgpack"),
        ("versions", b"\x91\x93\x01\xa7Primary\x00", "versions column: version 0: expected"),
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
        with pytest.raises(CorruptRowError, match="stored key bad: acl column"):
            await store.meta(["good", "bad"])
    else:
        assert list(await store.meta(["bad", "good"])) == ["bad", "good"]
    assert await store.get("good") == good
    # Rewriting a corrupt row makes it readable again.
    assert await store.delete("bad") is True
    assert await store.get("bad") is None


async def test_closed_store_refuses_calls(backend: Backend) -> None:
    store = await open_store(backend.url, migrate=True)
    added = await store.add(make_key("k", 1))
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(InternalError, match="closed"):
        await store.get("k")
    store = await open_store(backend.url)
    try:
        assert await store.get("k") == added
    finally:
        await store.aclose()


async def test_rewrap_by_another_replica_while_reads_are_served(
    store_factory: StoreFactory,
) -> None:
    server, rewrapper = await store_factory(), await store_factory()
    old = MasterKeyring({0: b"\x00" * 32})
    both = MasterKeyring({0: b"\x00" * 32, 1: b"\x11" * 32})
    new_only = MasterKeyring({1: b"\x11" * 32})

    def sealed_key(key_id: str) -> StoredKey:
        versions = tuple(
            StoredVersion(vid, old.seal(key_id, vid, vid, b"v%d" % vid), VersionStatus.ACTIVE, vid)
            for vid in (1, 2)
        )
        return StoredKey(id=key_id, acl=ACL, versions=versions, hash=f"h-{key_id}")

    def opens(key: StoredKey | None, ring: MasterKeyring) -> None:
        assert key is not None
        for v in key.versions:
            assert ring.open(key.id, v.id, v.ts, v.sealed) == b"v%d" % v.id

    key_ids = [f"k{i:02d}" for i in range(20)]
    for key_id in key_ids:
        await server.add(sealed_key(key_id))
    reads = 0

    async def serve_reads(done: trio.Event) -> None:
        nonlocal reads
        while not done.is_set():
            for key_id in key_ids:
                opens(await server.get(key_id), both)
                reads += 1
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


# --- PostgreSQL only --------------------------------------------------------------------------


def schema_version(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT version FROM knox_schema_version").fetchone()
    assert row is not None
    version: int = row[0]
    return version


async def test_migrate_is_idempotent_and_concurrent_migrations_take_turns(
    postgres_url: str,
) -> None:
    with pytest.raises(InternalError, match=r"no knox-server schema .*knox-server migrate"):
        await PostgresKeyStore.open(postgres_url)
    reports: list[MigrationReport] = []

    async def run() -> None:
        reports.append(await migrate(postgres_url))

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(run)
    assert sorted(reports, key=lambda r: r.before) == [
        MigrationReport(0, SCHEMA_VERSION),
        MigrationReport(SCHEMA_VERSION, SCHEMA_VERSION),
        MigrationReport(SCHEMA_VERSION, SCHEMA_VERSION),
    ]
    assert schema_version(postgres_url) == SCHEMA_VERSION
    store = await PostgresKeyStore.open(postgres_url, migrate=True)
    try:
        await store.add(make_key("k", 1))
    finally:
        await store.aclose()
    assert await migrate(postgres_url) == MigrationReport(SCHEMA_VERSION, SCHEMA_VERSION)
    store = await PostgresKeyStore.open(postgres_url)
    try:
        assert await store.get("k") is not None
    finally:
        await store.aclose()


async def test_schemas_this_code_does_not_know_are_refused(postgres_url: str) -> None:
    await migrate(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE knox_schema_version SET version = 99")
    for attempt in (migrate(postgres_url), PostgresKeyStore.open(postgres_url, migrate=True)):
        with pytest.raises(InternalError, match="schema version 99 is not supported"):
            await attempt
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE knox_schema_version")
    with pytest.raises(InternalError, match="knox_keys table exists without knox_schema_version"):
        await migrate(postgres_url)


async def test_unreachable_or_malformed_database_is_a_clear_error(postgres_url: str) -> None:
    with pytest.raises(InternalError, match=r"cannot connect .*port 1 failed") as caught:
        await PostgresKeyStore.open("postgresql://postgres:hunter2@127.0.0.1:1/test")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(InternalError, match="not a valid PostgreSQL connection URL") as caught:
        await PostgresKeyStore.open("postgresql://postgres:hunter 2@127.0.0.1/test")
    assert "hunter" not in str(caught.value)
    with pytest.raises(InternalError, match="min_size"):
        await PostgresKeyStore.open(postgres_url, min_size=3, max_size=2)


async def test_ids_postgresql_cannot_hold_are_refused(postgres_url: str) -> None:
    store = await PostgresKeyStore.open(postgres_url, migrate=True)
    try:
        for key_id in ("x" * 513, "a\x00b", "bad\udc80"):
            with pytest.raises(InternalError, match="cannot be stored: not a storable key id"):
                await store.add(make_key(key_id, 1))
            assert await store.get(key_id) is None
            assert await store.meta([key_id]) == {}
            assert await store.delete(key_id) is False
        await store.add(make_key("x" * 512, 1))
    finally:
        await store.aclose()
    with (
        psycopg.connect(postgres_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation),
    ):
        conn.execute(
            "INSERT INTO knox_keys VALUES (%s, '[]', 'h', '\\x90', nextval('knox_row_version'))",
            ("y" * 513,),
        )


async def test_committed_writes_and_only_those_are_announced(postgres_url: str) -> None:
    store = await PostgresKeyStore.open(postgres_url, migrate=True)
    listener = psycopg.connect(postgres_url, autocommit=True)
    try:
        listener.execute(f"LISTEN {CHANNEL}")
        added = await store.add(make_key("k", 1))
        with pytest.raises(KeyExistsError):
            await store.add(make_key("k", 2))
        updated = await store.update(replace(make_key("k", 1, 2), row_version=added.row_version))
        with pytest.raises(ConcurrentChangeError):
            await store.update(added)
        with pytest.raises(KeyNotFoundError):
            await store.update(make_key("missing", 1))
        assert await store.delete("missing") is False
        # A rolled-back write announces nothing either.
        with pytest.raises(InternalError, match="database error"):
            await store.run(
                lambda conn: conn.execute(
                    "WITH d AS (DELETE FROM knox_keys WHERE id = 'k' RETURNING id) "
                    "SELECT pg_notify('knox_key_changes', id), 1 / 0 FROM d"
                )
            )
        assert await store.get("k") == updated
        assert await store.delete("k") is True
        await store.add(make_key("end", 1))

        def collect() -> list[str]:
            payloads: list[str] = []
            for notify in listener.notifies(timeout=WAIT):
                payloads.append(notify.payload)
                if notify.payload == "end":
                    break
            return payloads

        with trio.fail_after(WAIT):
            assert await trio.to_thread.run_sync(collect) == ["k", "k", "k", "end"]
    finally:
        listener.close()
        await store.aclose()


# --- the server's wiring ------------------------------------------------------------------------


def write_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(
        "[server]\n"
        'cert = "server.pem"\nkey = "server.key"\nclient_ca = "ca.pem"\n'
        f"[storage]\nurl = {json.dumps(url)}\n"
        'master_key_file = "master.keys"\n'
    )
    return path


def run_migrate(config: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "knox_server.cli", "migrate", "--config", str(config)],
        capture_output=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def test_knox_server_migrate(tmp_path: Path, backend: Backend) -> None:
    config = write_config(tmp_path, backend.url)
    if backend.name == "sqlite":
        assert run_migrate(config) == {"backend": "sqlite", "schema_version": 1}
        assert (tmp_path / "knox.db").exists()
        return
    assert run_migrate(config) == {"backend": "postgresql", "schema_version": 1, "previous": 0}
    assert run_migrate(config) == {"backend": "postgresql", "schema_version": 1, "previous": 1}
    assert schema_version(backend.url) == SCHEMA_VERSION


async def test_the_server_migrates_at_start_only_when_configured(
    tmp_path: Path, postgres_url: str
) -> None:
    config = replace(
        prepare_dev_state(tmp_path).server_config("127.0.0.1:0", knox_compat=False),
        storage_url=postgres_url,
    )
    with pytest.raises(InternalError, match="no knox-server schema"):
        await run_server(config)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_server(
                    replace(config, migrate_on_start=True), task_status=task_status
                )
            )
            nursery.cancel_scope.cancel()
    assert schema_version(postgres_url) == SCHEMA_VERSION


@pytest.mark.parametrize(("value", "ok"), [("true", True), ("false", True), ('"yes"', False)])
def test_migrate_on_start_is_a_boolean(tmp_path: Path, value: str, ok: bool) -> None:
    path = write_config(tmp_path, "postgresql://db.example/knox")
    path.write_text(path.read_text() + f"migrate_on_start = {value}\n")
    if ok:
        assert load_config(path).migrate_on_start is (value == "true")
    else:
        with pytest.raises(ConfigError, match=r"storage\.migrate_on_start: expected true or false"):
            load_config(path)
