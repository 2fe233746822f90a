"""What only the PostgreSQL key store does: migrations, announcements of committed writes, its
errors, and the server's wiring of migrations. The contract every backend keeps is in
``test_store_contract.py``."""

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
from knox_server.config import ConfigError, load_config
from knox_server.dev import prepare_dev_state
from knox_server.main import run_server
from knox_server.pg_store import CHANNEL, SCHEMA_VERSION, MigrationReport, PostgresKeyStore, migrate
from tests.conftest import Backend
from tests.stored_keys import make_key

WAIT = 20


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
