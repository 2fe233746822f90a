"""The PostgreSQL :class:`~knox_server.store.KeyStore`: several server replicas, one database.

The schema, created and migrated by :func:`migrate` (``knox-server migrate``, or at start with
``[storage] migrate_on_start = true``)::

    knox_keys(id TEXT PRIMARY KEY CHECK (length(id) <= 512), acl TEXT, hash TEXT,
              versions BYTEA, row_version BIGINT)
    knox_row_version       a SEQUENCE: the row version of every add and update
    knox_schema_version    one row: the schema version

The columns hold exactly what the SQLite backend stores (:mod:`knox_server.rowcodec`). Row
versions come from one sequence, so they only grow across all keys: a key deleted and created
again never gets a row version an old reader holds, and a stale update fails. An update names the
row version it read (``WHERE id = %s AND row_version = %s``): of two updates from one read, one
wins.

Every write is one statement, so one transaction, which also announces the key id on
:data:`CHANNEL` (``pg_notify``): every replica listening (:mod:`knox_server.pg_listen`) hears of
each committed change, and of none that rolled back. Nothing is cached: every read asks the
database, so replicas are stateless and a read never returns a row older than the last commit.

I/O runs on a synchronous psycopg pool in trio worker threads, at most ``max_size`` at once, so a
thread never waits for a connection another thread of this store holds. When the calling task is
cancelled, the running statement is cancelled on the server (``cancel_safe``), the call raises
:class:`trio.Cancelled` once the statement has stopped, and the connection is discarded rather
than reused (a late cancel signal could hit its next statement). A write cancelled while its
statement ran may or may not have committed, as with any database client.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import psycopg.conninfo
import psycopg.errors
import trio
from psycopg_pool import ConnectionPool

from knox.errors import ConcurrentChangeError, InternalError, KeyExistsError, KeyNotFoundError
from knox.model import MAX_KEY_ID_LENGTH
from knox_server.rowcodec import decode_meta, decode_row, encode_columns
from knox_server.store import KeyMeta, StoredKey

__all__ = [
    "CHANNEL",
    "SCHEMA_VERSION",
    "Connection",
    "MigrationReport",
    "PostgresKeyStore",
    "connect_error",
    "connection_string",
    "database_error",
    "migrate",
    "run_interruptible",
]

CHANNEL = "knox_key_changes"
SCHEMA_VERSION = 1
CONNECT_TIMEOUT_S = 10
ACQUIRE_TIMEOUT_S = 10.0
CANCEL_TIMEOUT_S = 5.0
# Any value: pg_advisory_xact_lock serialises concurrent migrations of one database.
_MIGRATION_LOCK = 0x4B4E5850

Connection = psycopg.Connection[tuple[Any, ...]]

_VERSION_TABLE = """CREATE TABLE knox_schema_version (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    version INTEGER NOT NULL
)"""

# Statements that bring a schema of version N-1 to version N.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE SEQUENCE knox_row_version AS BIGINT",
        f"""CREATE TABLE knox_keys (
            id TEXT COLLATE "C" PRIMARY KEY CHECK (length(id) <= {MAX_KEY_ID_LENGTH}),
            acl TEXT NOT NULL,
            hash TEXT NOT NULL,
            versions BYTEA NOT NULL,
            row_version BIGINT NOT NULL
        )""",
    ),
}

_GET = "SELECT acl, hash, versions, row_version FROM knox_keys WHERE id = %s"
_META_ALL = "SELECT id, acl, hash FROM knox_keys ORDER BY id"
_META_SOME = "SELECT id, acl, hash FROM knox_keys WHERE id = ANY(%s)"
_EXISTS = "SELECT EXISTS (SELECT 1 FROM knox_keys WHERE id = %s)"
# Each write announces its key on CHANNEL, spelled out here.
_ADD = """WITH added AS (
    INSERT INTO knox_keys (id, acl, hash, versions, row_version)
    VALUES (%s, %s, %s, %s, nextval('knox_row_version'))
    ON CONFLICT (id) DO NOTHING
    RETURNING id, row_version
)
SELECT row_version, pg_notify('knox_key_changes', id) FROM added"""
_UPDATE = """WITH updated AS (
    UPDATE knox_keys
    SET acl = %s, hash = %s, versions = %s, row_version = nextval('knox_row_version')
    WHERE id = %s AND row_version = %s
    RETURNING id, row_version
)
SELECT row_version, pg_notify('knox_key_changes', id) FROM updated"""
_DELETE = """WITH deleted AS (DELETE FROM knox_keys WHERE id = %s RETURNING id)
SELECT pg_notify('knox_key_changes', id) FROM deleted"""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """The schema version a migration found (0: none) and the one it left."""

    before: int
    after: int


def connection_string(dsn: str, *, application_name: str, **defaults: str | int) -> str:
    """``dsn`` (a URL or ``key=value`` string) with a connect timeout, ``application_name`` and
    ``defaults`` for the parameters it does not set. Raises :class:`InternalError` if it does not
    parse; the message never quotes it (it may hold a password)."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        raise InternalError("storage.url: not a valid PostgreSQL connection URL") from None
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    params.setdefault("application_name", application_name)
    for name, value in defaults.items():
        params.setdefault(name, value)
    return psycopg.conninfo.make_conninfo("", **params)


def database_error(exc: psycopg.Error) -> InternalError:
    """An :class:`InternalError` naming the error class only: server messages can quote values."""
    return InternalError(f"PostgreSQL key store: database error {type(exc).__name__}")


def connect_error(exc: psycopg.Error) -> InternalError:
    """An :class:`InternalError` for a failed connection, with libpq's reason (host, port, user;
    libpq never quotes a password)."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InternalError(f"PostgreSQL key store: cannot connect ({reason})")


async def run_interruptible(
    fn: Callable[[], _T],
    interrupt: Callable[[], object],
    *,
    limiter: trio.CapacityLimiter | None = None,
) -> _T:
    """Run ``fn`` in a worker thread. If the calling task is cancelled meanwhile, call
    ``interrupt()`` once, in another worker thread (it may block), so that ``fn`` ends soon; then
    wait for ``fn`` and raise :class:`trio.Cancelled` if it raised. An ``fn`` that completed
    anyway returns its result (the cancellation is seen at the caller's next checkpoint).
    ``interrupt`` must be harmless when ``fn`` has just ended."""
    finished = interrupted = False

    async def interrupt_on_cancel() -> None:
        nonlocal interrupted
        try:
            await trio.sleep_forever()
        finally:
            if not finished:
                interrupted = True
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(interrupt)

    # The outcome leaves the nursery unwrapped: errors raised inside it would become groups.
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(interrupt_on_cancel)
        try:
            result = await trio.to_thread.run_sync(fn, limiter=limiter)
        except BaseException as exc:
            failure = exc
        finally:
            finished = True
            nursery.cancel_scope.cancel()
    if failure is not None:
        if interrupted:
            # The enclosing scope is cancelled: this raises its Cancelled.
            await trio.lowlevel.checkpoint()
        raise failure
    return result


class _CancelledBeforeStart(Exception):
    """The call was cancelled while its thread waited for a connection."""


class _Statement:
    """The connection one call is using, so that another thread can cancel its statement."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._cancelled = False

    def start(self, conn: Connection) -> None:
        with self._lock:
            if self._cancelled:
                raise _CancelledBeforeStart
            self._conn = conn

    def end(self) -> bool:
        """Detach the connection; True if a cancel request was sent for it."""
        with self._lock:
            self._conn = None
            return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._conn is not None:
                # If the request fails, the call ends when its statement does, and its
                # connection is discarded all the same.
                with contextlib.suppress(psycopg.Error):
                    self._conn.cancel_safe(timeout=CANCEL_TIMEOUT_S)


class PostgresKeyStore:
    """A :class:`~knox_server.store.KeyStore` in a PostgreSQL database. Create with :meth:`open`.

    Every method raises :class:`InternalError` on a database fault (naming the error class only)
    or when the store is closed; none keeps rows in memory.
    """

    def __init__(self, pool: ConnectionPool[Connection], max_size: int) -> None:
        self._pool: ConnectionPool[Connection] | None = pool
        self._limiter = trio.CapacityLimiter(max_size)

    def __repr__(self) -> str:
        return f"PostgresKeyStore({'closed' if self._pool is None else 'open'})"

    @classmethod
    async def open(
        cls, dsn: str, *, min_size: int = 1, max_size: int = 10, migrate: bool = False
    ) -> PostgresKeyStore:
        """Connect to the database at ``dsn``, migrate its schema first if ``migrate``, and open
        a pool of ``min_size`` to ``max_size`` connections.

        Raises :class:`InternalError` if the URL does not parse, the server cannot be reached
        (with libpq's reason), or the schema is missing, older than this code (without
        ``migrate``) or newer than it.
        """
        if not 1 <= min_size <= max_size:
            raise InternalError("PostgreSQL key store: need 1 <= min_size <= max_size")
        conninfo = connection_string(dsn, application_name="knox-server")
        await trio.to_thread.run_sync(_prepare_schema, conninfo, migrate)
        pool_log = logging.getLogger("psycopg.pool")
        if pool_log.level == logging.NOTSET:
            # It logs every connection checkout and return at INFO.
            pool_log.setLevel(logging.WARNING)
        pool: ConnectionPool[Connection] = ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True},
            # A connection broken by a database restart is replaced, not handed out.
            check=ConnectionPool.check_connection,
            timeout=ACQUIRE_TIMEOUT_S,
            name="knox-server",
        )
        try:
            await trio.to_thread.run_sync(
                functools.partial(pool.open, wait=True, timeout=CONNECT_TIMEOUT_S)
            )
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(pool.close)
            if isinstance(exc, psycopg.Error):
                raise InternalError("PostgreSQL key store: cannot open the pool") from None
            raise
        return cls(pool, max_size)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(pool.close)

    async def run(self, fn: Callable[[Connection], _T]) -> _T:
        """``fn(conn)`` in a worker thread on a pooled connection in autocommit mode (use
        ``conn.transaction()`` for several statements). Cancelling the caller cancels the running
        statement on the server and raises :class:`trio.Cancelled` (a call still waiting for the
        pool to connect ends within :data:`ACQUIRE_TIMEOUT_S`). A psycopg error becomes an
        :class:`InternalError` naming its class; other exceptions of ``fn`` propagate."""
        pool = self._pool
        if pool is None:
            raise InternalError("key store is closed")
        statement = _Statement()

        def work() -> _T:
            try:
                conn = pool.getconn()
            except psycopg.Error as exc:
                raise database_error(exc) from None
            try:
                statement.start(conn)
                try:
                    return fn(conn)
                except psycopg.Error as exc:
                    raise database_error(exc) from None
                finally:
                    if statement.end():
                        conn.close()
            finally:
                pool.putconn(conn)

        return await run_interruptible(work, statement.cancel, limiter=self._limiter)

    async def get(self, key_id: str) -> StoredKey | None:
        """The key, or None. Raises :class:`~knox_server.rowcodec.CorruptRowError` if its row
        does not decode."""
        if not _can_exist(key_id):
            return None

        def select(conn: Connection) -> StoredKey | None:
            row = conn.execute(_GET, (key_id,), binary=True).fetchone()
            return None if row is None else decode_row(key_id, *row)

        return await self.run(select)

    async def meta(self, key_ids: Sequence[str] | None = None) -> dict[str, KeyMeta]:
        """Hash and ACL of the named keys that exist, in the order asked (all keys, by id, when
        ``key_ids`` is None), in one query. Raises
        :class:`~knox_server.rowcodec.CorruptRowError` if one of them does not decode."""
        if key_ids is None:
            return await self.run(_select_all_meta)
        wanted = [k for k in dict.fromkeys(key_ids) if _can_exist(k)]
        if not wanted:
            return {}

        def select(conn: Connection) -> dict[str, KeyMeta]:
            rows = conn.execute(_META_SOME, (wanted,)).fetchall()
            found = {key_id: (acl, hash_) for key_id, acl, hash_ in rows}
            return {k: decode_meta(k, *found[k]) for k in wanted if k in found}

        return await self.run(select)

    async def add(self, key: StoredKey) -> StoredKey:
        acl, versions = _encode(key)

        def insert(conn: Connection) -> int | None:
            row = conn.execute(_ADD, (key.id, acl, key.hash, versions)).fetchone()
            return None if row is None else int(row[0])

        row_version = await self.run(insert)
        if row_version is None:
            raise KeyExistsError(f"Key {key.id} already exists")
        return decode_row(key.id, acl, key.hash, versions, row_version)

    async def update(self, key: StoredKey) -> StoredKey:
        acl, versions = _encode(key)

        def update(conn: Connection) -> tuple[int | None, bool]:
            """(new row version, True) if updated; (None, whether the key exists) if not."""
            row = conn.execute(
                _UPDATE, (acl, key.hash, versions, key.id, key.row_version)
            ).fetchone()
            if row is not None:
                return int(row[0]), True
            exists = conn.execute(_EXISTS, (key.id,)).fetchone()
            return None, bool(exists and exists[0])

        row_version, exists = await self.run(update)
        if row_version is None:
            if not exists:
                raise KeyNotFoundError(f"No such key {key.id}")
            raise ConcurrentChangeError(f"Key {key.id} changed concurrently; re-read and retry")
        return decode_row(key.id, acl, key.hash, versions, row_version)

    async def delete(self, key_id: str) -> bool:
        if not _can_exist(key_id):
            return False

        def delete(conn: Connection) -> bool:
            return len(conn.execute(_DELETE, (key_id,)).fetchall()) == 1

        return await self.run(delete)


async def migrate(dsn: str) -> MigrationReport:
    """Create or upgrade the schema in the database at ``dsn``; idempotent, and safe when several
    servers migrate at once (they take turns). Raises :class:`InternalError` if the database
    cannot be reached or holds a schema this code cannot migrate (newer, or not knox-server's)."""
    conninfo = connection_string(dsn, application_name="knox-server migrate")
    report = await trio.to_thread.run_sync(_prepare_schema, conninfo, True)
    assert report is not None
    return report


def _can_exist(key_id: str) -> bool:
    """Whether a row can have this id (PostgreSQL text holds no NUL and only valid UTF-8)."""
    if len(key_id) > MAX_KEY_ID_LENGTH or "\x00" in key_id:
        return False
    try:
        key_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _encode(key: StoredKey) -> tuple[str, bytes]:
    if not _can_exist(key.id):
        raise InternalError(f"Key {key.id!r} cannot be stored: not a storable key id")
    return encode_columns(key)


def _select_all_meta(conn: Connection) -> dict[str, KeyMeta]:
    return {
        key_id: decode_meta(key_id, acl, hash_)
        for key_id, acl, hash_ in conn.execute(_META_ALL).fetchall()
    }


def _prepare_schema(conninfo: str, migrate: bool) -> MigrationReport | None:
    """Migrate (if ``migrate``) or check the schema on a connection of its own."""
    try:
        conn = psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        raise connect_error(exc) from None
    try:
        if migrate:
            return _migrate(conn)
        _check_schema(conn)
        return None
    except psycopg.Error as exc:
        raise database_error(exc) from None
    finally:
        conn.close()


def _schema_version(conn: Connection) -> int:
    """The schema version recorded, 0 if there is no schema."""
    row = conn.execute("SELECT to_regclass('knox_schema_version') IS NOT NULL").fetchone()
    if not (row and row[0]):
        return 0
    row = conn.execute("SELECT version FROM knox_schema_version").fetchone()
    if row is None or type(row[0]) is not int:
        raise InternalError("PostgreSQL key store: knox_schema_version holds no version")
    version: int = row[0]
    return version


def _check_schema(conn: Connection) -> None:
    version = _schema_version(conn)
    if version == 0:
        raise InternalError(
            "PostgreSQL key store: the database has no knox-server schema "
            "(run knox-server migrate, or set storage.migrate_on_start)"
        )
    if version < SCHEMA_VERSION:
        raise InternalError(
            f"PostgreSQL key store: schema version {version} is older than this code's "
            f"{SCHEMA_VERSION} (run knox-server migrate)"
        )
    _refuse_newer(version)


def _refuse_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise InternalError(
            f"PostgreSQL key store: schema version {version} is not supported "
            f"(this code knows {SCHEMA_VERSION})"
        )


def _migrate(conn: Connection) -> MigrationReport:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        before = _schema_version(conn)
        _refuse_newer(before)
        if before == 0:
            row = conn.execute("SELECT to_regclass('knox_keys') IS NOT NULL").fetchone()
            if row and row[0]:
                raise InternalError(
                    "PostgreSQL key store: a knox_keys table exists without knox_schema_version "
                    "(not a knox-server schema)"
                )
            conn.execute(_VERSION_TABLE)
            conn.execute("INSERT INTO knox_schema_version (version) VALUES (0)")
        for version in range(before + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
        if before != SCHEMA_VERSION:
            conn.execute("UPDATE knox_schema_version SET version = %s", (SCHEMA_VERSION,))
    return MigrationReport(before=before, after=SCHEMA_VERSION)
