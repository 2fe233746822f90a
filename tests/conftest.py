"""Fixtures shared by the server's tests: the key store backends.

``backend`` runs a test once per backend: SQLite (a file in ``tmp_path``) and PostgreSQL (a fresh
schema in the database of ``KNOX_TEST_POSTGRES_DSN``, dropped afterwards; skipped with a reason
when the variable is not set). ``store_factory`` opens stores on the test's backend, as server
replicas sharing one database would, and closes them at the end.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from knox_server.main import open_store
from knox_server.store import KeyStore

POSTGRES_DSN = os.environ.get("KNOX_TEST_POSTGRES_DSN", "")

needs_postgres = pytest.mark.skipif(
    not POSTGRES_DSN, reason="KNOX_TEST_POSTGRES_DSN is not set: no PostgreSQL server to test on"
)

# Raw SQL on the test's schema: the columns a test may read or overwrite behind the store's back.
_COLUMNS = frozenset({"acl", "hash", "versions", "row_version"})


@dataclass(frozen=True)
class Backend:
    """One test's storage: ``url`` is what ``storage.url`` would say."""

    name: str
    url: str

    def connect_postgres(self) -> psycopg.Connection[tuple[Any, ...]]:
        """An autocommit connection on the test's schema (PostgreSQL only)."""
        assert self.name == "postgresql"
        return psycopg.connect(self.url, autocommit=True)

    def column(self, key_id: str, column: str) -> object:
        """The raw value of one column of a stored row."""
        assert column in _COLUMNS
        query = f"SELECT {column} FROM knox_keys WHERE id = %s"
        if self.name == "sqlite":
            with _sqlite(self.url) as db:
                (value,) = db.execute(query.replace("%s", "?"), (key_id,)).fetchone()
            return value
        with self.connect_postgres() as conn:
            row = conn.execute(query, (key_id,)).fetchone()
        assert row is not None
        return row[0]

    def set_column(self, key_id: str, column: str, value: object) -> None:
        """Overwrite one column of a stored row, as another program (or bit rot) could."""
        assert column in _COLUMNS
        query = f"UPDATE knox_keys SET {column} = %s WHERE id = %s"
        if self.name == "sqlite":
            with _sqlite(self.url) as db:
                db.execute(query.replace("%s", "?"), (value, key_id))
            return
        with self.connect_postgres() as conn:
            conn.execute(query, (value, key_id))


class _sqlite:
    """A short-lived sqlite3 connection, committed and closed on exit."""

    def __init__(self, url: str) -> None:
        self._db = sqlite3.connect(url.removeprefix("sqlite:///"))

    def __enter__(self) -> sqlite3.Connection:
        return self._db

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._db.commit()
        finally:
            self._db.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL of the test PostgreSQL database whose ``search_path`` is a fresh, empty schema."""
    if not POSTGRES_DSN:
        pytest.skip("KNOX_TEST_POSTGRES_DSN is not set: no PostgreSQL server to test on")
    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in POSTGRES_DSN else "?"
    try:
        yield f"{POSTGRES_DSN}{separator}options={quote(f'-c search_path={schema}')}"
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=[pytest.mark.postgres, needs_postgres]),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path / 'knox.db'}")
    url: str = request.getfixturevalue("postgres_url")
    return Backend("postgresql", url)


StoreFactory = Callable[[], Awaitable[KeyStore]]


@pytest.fixture
async def store_factory(backend: Backend) -> AsyncIterator[StoreFactory]:
    """Opens a store on the test's backend (migrating a PostgreSQL schema); each call is another
    replica of the same database. All are closed when the test ends."""
    opened: list[KeyStore] = []

    async def open_one() -> KeyStore:
        store = await open_store(backend.url, migrate=True)
        opened.append(store)
        return store

    try:
        yield open_one
    finally:
        for store in opened:
            await store.aclose()
