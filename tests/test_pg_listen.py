"""Change notification across replicas, and cancellation, on a real PostgreSQL server: writes wake
a listener on another connection, a listener whose backend is killed reconnects and resets, and a
cancelled call stops its statement on the server."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import psycopg
import pytest
import trio

from knox.errors import InternalError
from knox.model import VersionStatus
from knox_server.pg_listen import listen_for_changes
from knox_server.pg_store import PostgresKeyStore
from knox_server.store import StoredKey, StoredVersion
from tests.polling import until

pytestmark = pytest.mark.postgres

WAIT = 20


def make_key(key_id: str, *version_ids: int) -> StoredKey:
    versions = tuple(
        StoredVersion(id=vid, sealed=b"sealed", status=VersionStatus.ACTIVE, ts=vid)
        for vid in version_ids or (1,)
    )
    return StoredKey(id=key_id, acl=(), versions=versions, hash=f"hash-{version_ids}")


def backend_pids(url: str, where: str, value: str) -> list[int]:
    """Backends of other connections whose ``where`` column (application_name or query) matches
    ``value`` (a LIKE pattern)."""
    assert where in ("application_name", "query")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f"SELECT pid FROM pg_stat_activity WHERE {where} LIKE %s AND pid <> pg_backend_pid()",
            (value,),
        ).fetchall()
    return [pid for (pid,) in rows]


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresKeyStore]:
    s = await PostgresKeyStore.open(postgres_url, migrate=True)
    try:
        yield s
    finally:
        await s.aclose()


@asynccontextmanager
async def listening(
    url: str, on_reset: Callable[[], None] = lambda: None
) -> AsyncIterator[trio.MemoryReceiveChannel[str]]:
    """Run :func:`listen_for_changes` on ``url``; yields the key ids it reports, in order."""
    send, receive = trio.open_memory_channel[str](100)
    async with send, receive, trio.open_nursery() as nursery:
        await nursery.start(listen_for_changes, url, send.send_nowait, on_reset)
        yield receive
        nursery.cancel_scope.cancel()


async def test_writes_through_a_store_wake_a_listener(
    postgres_url: str, store: PostgresKeyStore
) -> None:
    name = "listener_" + secrets.token_hex(4)
    url = f"{postgres_url}&application_name={name}"
    resets: list[None] = []
    with trio.fail_after(WAIT):
        async with listening(url, lambda: resets.append(None)) as heard:
            added = await store.add(make_key("k1", 1))
            assert await heard.receive() == "k1"
            await store.update(replace(make_key("k1", 1, 2), row_version=added.row_version))
            assert await heard.receive() == "k1"
            assert await store.delete("k1") is True
            assert await heard.receive() == "k1"
            await store.add(make_key("k2", 1))
            assert await heard.receive() == "k2"
            assert backend_pids(postgres_url, "application_name", name) != []
        # Cancelled: the listener's connection is closed.
        await until(lambda: backend_pids(postgres_url, "application_name", name) == [])
    assert resets == []


async def test_a_killed_listener_reconnects_resets_and_hears_later_changes(
    postgres_url: str, store: PostgresKeyStore
) -> None:
    name = "listener_" + secrets.token_hex(4)
    url = f"{postgres_url}&application_name={name}"
    reset = trio.Event()
    with trio.fail_after(WAIT):
        async with listening(url, reset.set) as heard:
            (pid,) = backend_pids(postgres_url, "application_name", name)
            with psycopg.connect(postgres_url) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            # Made while the listener may be down: heard, or covered by the reset.
            await store.add(make_key("during", 1))
            await reset.wait()
            (new_pid,) = backend_pids(postgres_url, "application_name", name)
            assert new_pid != pid
            await store.add(make_key("after", 1))
            ids = [await heard.receive()]
            if ids == ["during"]:
                ids.append(await heard.receive())
            assert ids[-1] == "after"


async def test_a_listener_that_cannot_connect_at_start_fails_clearly() -> None:
    with pytest.raises(InternalError, match=r"cannot connect .*port 1 failed") as caught:
        await listen_for_changes(
            "postgresql://postgres:hunter2@127.0.0.1:1/test", lambda _: None, lambda: None
        )
    assert "hunter2" not in str(caught.value)


async def test_cancelling_a_call_stops_its_statement_on_the_server(
    postgres_url: str, store: PostgresKeyStore
) -> None:
    marker = "sleep_" + secrets.token_hex(4)
    scope = trio.CancelScope()

    async def sleep_on_the_server() -> None:
        with scope:
            await store.run(lambda conn: conn.execute(f"SELECT pg_sleep(60), '{marker}'"))

    # The statement sleeps longer than this test may take: only a cancellation on the server
    # (closing the connection does not stop a running statement) ends it in time.
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleep_on_the_server)
            await until(lambda: len(backend_pids(postgres_url, "query", f"%{marker}%")) == 1)
            (pid,) = backend_pids(postgres_url, "query", f"%{marker}%")
            scope.cancel()
        assert scope.cancelled_caught
        # Its connection is not reused (a late cancel could hit another statement): gone.
        with psycopg.connect(postgres_url) as conn:
            await until(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
                    ).fetchone()
                    == (0,)
                )
            )
        assert await store.get("k") is None
        await store.add(make_key("k", 1))
        assert await store.get("k") is not None
