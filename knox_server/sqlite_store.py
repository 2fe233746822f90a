"""The SQLite :class:`~knox_server.store.KeyStore`: the embedded, single-node default.

One table, one row per key::

    knox_keys(id TEXT PRIMARY KEY, acl TEXT, hash TEXT, versions BLOB, row_version INTEGER)

``acl`` is the ACL in Knox's JSON form (readable with the ``sqlite3`` shell), ``versions`` the
version list in the compact msgpack form of :mod:`knox_server.rowcodec` (each version's data stays
sealed). ``row_version`` comes from a counter shared by all rows, so it only ever grows: a key
deleted and created again never gets a row version an old reader holds, and a stale update fails.

One connection (``check_same_thread=False``) serves the store, behind a :class:`trio.Lock`; writes
run in :func:`trio.to_thread.run_sync`, and a cancelled caller waits for its statement to finish,
so the connection is never left mid-transaction. The file is in WAL mode with ``synchronous=FULL``
(a returned write is on disk). Another process may use the same file (a second server, or
``knox-server rewrap`` while the server serves); writers wait up to ``busy_timeout`` for each other.

Reads are served from memory: the store holds the whole table decoded (metadata and sealed data,
e.g. 10,000 keys of 1 KiB take some 10-20 MB), loaded at open and kept current by the store's own
writes once they have committed. Before each read, ``PRAGMA data_version`` (a look at the WAL
index on the trio thread, no disk I/O) tells whether another connection committed since the last
load; if so the table is loaded again in a worker thread first, so a read never returns a row
older than the last commit of any connection. A write that fails also forces a reload. The
PostgreSQL backend, made for several servers sharing a database, keeps no such copy.

The column codecs live in :mod:`knox_server.rowcodec`, shared with the PostgreSQL backend (which
stores the same bytes); they are re-exported here.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from knox.errors import ConcurrentChangeError, InternalError, KeyExistsError, KeyNotFoundError
from knox_server.rowcodec import (
    ColumnFormatError,
    CorruptRowError,
    decode_acl,
    decode_meta,
    decode_row,
    decode_row_version_column,
    decode_versions,
    decode_versions_column,
    encode_acl,
    encode_columns,
    encode_versions,
)
from knox_server.store import KeyMeta, StoredKey

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "ColumnFormatError",
    "CorruptRowError",
    "SQLiteKeyStore",
    "decode_acl",
    "decode_meta",
    "decode_row",
    "decode_versions",
    "encode_acl",
    "encode_versions",
]

APPLICATION_ID = 0x4B4E5853  # "KNXS", so a knoxd cache or another program's file is recognised
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 5.0

_SCHEMA = (
    """CREATE TABLE knox_keys (
        id TEXT PRIMARY KEY NOT NULL,
        acl TEXT NOT NULL,
        hash TEXT NOT NULL,
        versions BLOB NOT NULL,
        row_version INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE knox_counter (
        only_row INTEGER PRIMARY KEY CHECK (only_row = 0),
        last_row_version INTEGER NOT NULL
    )""",
    "INSERT INTO knox_counter VALUES (0, 0)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _Corrupt:
    """A row (or its metadata) that did not decode: reading it raises :class:`CorruptRowError`."""

    message: str


@dataclass(frozen=True, slots=True)
class _Table:
    """The decoded table and the ``data_version`` of the snapshot it was read from."""

    keys: dict[str, StoredKey | _Corrupt]
    meta: dict[str, KeyMeta | _Corrupt]
    stray_rows: int  # rows whose id is not text: no read can name them, a full listing fails
    data_version: int


class SQLiteKeyStore:
    """A :class:`~knox_server.store.KeyStore` in one SQLite file. Create with :meth:`open`.

    :meth:`get` and :meth:`meta` answer from memory without a worker thread (and without a trio
    checkpoint) when the copy is current and no write of this store is in progress.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, table: _Table) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._lock = trio.Lock()
        self._keys = table.keys
        self._meta = table.meta
        self._stray_rows = table.stray_rows
        # None: the copy may be stale and is reloaded before the next read.
        self._data_version: int | None = table.data_version
        # Reloads begun, and which one the copy comes from: readers queued behind a reload that
        # began after they did take its result instead of each starting another.
        self._loads_started = self._loaded = 0

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"SQLiteKeyStore({str(self._path)!r}, {state})"

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> SQLiteKeyStore:
        """Open (creating if needed, mode 0600) the database at ``path`` and its schema, and load
        the table into memory. Rows that do not decode do not fail the open: reading them raises
        :class:`CorruptRowError`.

        Raises :class:`~knox.errors.InternalError` with a message naming the file if it cannot be
        opened, is not an SQLite database, belongs to another application, has a schema version
        this code does not know, or cannot use WAL mode.
        """
        target = Path(path)
        conn, table = await trio.to_thread.run_sync(_open, target)
        return cls(conn, target, table)

    async def aclose(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            self._keys, self._meta, self._data_version = {}, {}, None
            if conn is not None:
                await trio.to_thread.run_sync(conn.close)

    async def get(self, key_id: str) -> StoredKey | None:
        """The key, or None. Raises :class:`CorruptRowError` if its row does not decode."""
        await self._make_current()
        entry = self._keys.get(key_id)
        if isinstance(entry, _Corrupt):
            raise CorruptRowError(entry.message)
        return entry

    async def meta(self, key_ids: Sequence[str] | None = None) -> dict[str, KeyMeta]:
        """Hash and ACL of the named keys that exist (all keys when ``key_ids`` is None), in the
        order asked. Raises :class:`CorruptRowError` if one of them has an ACL or hash that does
        not decode."""
        await self._make_current()
        known = self._meta
        if key_ids is None:
            if self._stray_rows:
                raise CorruptRowError(f"SQLite key store: {self._stray_rows} key ids are not text")
            key_ids = list(known)
        out: dict[str, KeyMeta] = {}
        for key_id in key_ids:
            entry = known.get(key_id)
            if entry is not None:
                if isinstance(entry, _Corrupt):
                    raise CorruptRowError(entry.message)
                out[key_id] = entry
        return out

    async def add(self, key: StoredKey) -> StoredKey:
        acl, versions = encode_columns(key)

        def insert(c: sqlite3.Connection) -> int | None:
            with _transaction(c):
                row_version = _next_row_version(c)
                try:
                    c.execute(
                        "INSERT INTO knox_keys (id, acl, hash, versions, row_version) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (key.id, acl, key.hash, versions, row_version),
                    )
                except sqlite3.IntegrityError as e:
                    if e.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
                        return None
                    raise
            return row_version

        async with self._lock:
            row_version = await self._write(insert)
            if row_version is None:
                if key.id not in self._keys:
                    # Another connection added it: the copy is stale.
                    self._data_version = None
                raise KeyExistsError(f"Key {key.id} already exists")
            return self._remember(key.id, acl, key.hash, versions, row_version)

    async def update(self, key: StoredKey) -> StoredKey:
        acl, versions = encode_columns(key)

        def update(c: sqlite3.Connection) -> tuple[int | None, bool]:
            """(new row version, True) if updated; (None, whether the key still exists) if not."""
            with _transaction(c):
                row_version = _next_row_version(c)
                cur = c.execute(
                    "UPDATE knox_keys SET acl = ?, hash = ?, versions = ?, row_version = ? "
                    "WHERE id = ? AND row_version = ?",
                    (acl, key.hash, versions, row_version, key.id, key.row_version),
                )
                if cur.rowcount == 1:
                    return row_version, True
                exists = c.execute("SELECT 1 FROM knox_keys WHERE id = ?", (key.id,)).fetchone()
                # Nothing changed: end the transaction without moving the counter.
                c.execute("ROLLBACK")
                return None, exists is not None

        async with self._lock:
            row_version, exists = await self._write(update)
            if row_version is None:
                # If the copy agrees with the caller's stale read, it is stale too. (Conflicts
                # with this store's own writes leave it alone, so they cost no reload.)
                cached = self._keys.get(key.id)
                if not (exists and isinstance(cached, StoredKey)) or (
                    cached.row_version == key.row_version
                ):
                    self._data_version = None
                if not exists:
                    raise KeyNotFoundError(f"No such key {key.id}")
                raise ConcurrentChangeError(f"Key {key.id} changed concurrently; re-read and retry")
            return self._remember(key.id, acl, key.hash, versions, row_version)

    async def delete(self, key_id: str) -> bool:
        def delete(c: sqlite3.Connection) -> bool:
            with _transaction(c):
                return c.execute("DELETE FROM knox_keys WHERE id = ?", (key_id,)).rowcount == 1

        async with self._lock:
            deleted = await self._write(delete)
            known = self._keys.pop(key_id, None) is not None
            self._meta.pop(key_id, None)
            if deleted != known:
                self._data_version = None
            return deleted

    async def _make_current(self) -> None:
        """Reload the copy if another connection committed since it was loaded (or it was
        invalidated). Without a wait or a checkpoint when it is current and the lock is free."""
        if not self._lock.locked() and self._is_current():
            return
        asked = self._loads_started
        async with self._lock:
            # A reload that began after this call did read a snapshot at least as new as any
            # this call could read, so it answers this call too.
            if self._loaded > asked and self._data_version is not None:
                return
            if not self._is_current():
                conn = self._conn
                assert conn is not None  # _is_current raised otherwise
                self._loads_started += 1
                generation = self._loads_started
                self._install(await trio.to_thread.run_sync(_guarded, _load, conn))
                self._loaded = generation

    def _is_current(self) -> bool:
        """Whether the copy matches the database. Only while no worker thread uses the
        connection (the lock is free or held by the caller); raises if the store is closed."""
        conn = self._conn
        if conn is None:
            raise InternalError("key store is closed")
        if self._data_version is None:
            return False
        try:
            row = conn.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            # The reload in a worker thread waits out a busy database or reports the error.
            return False
        return bool(row[0] == self._data_version)

    def _install(self, table: _Table) -> None:
        self._keys, self._meta = table.keys, table.meta
        self._stray_rows, self._data_version = table.stray_rows, table.data_version

    async def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` in a worker thread; the caller holds the lock. Any failure invalidates the
        copy (a failed commit may or may not have reached the file)."""
        conn = self._conn
        if conn is None:
            raise InternalError("key store is closed")
        try:
            return await trio.to_thread.run_sync(_guarded, fn, conn)
        except BaseException:
            self._data_version = None
            raise

    def _remember(
        self, key_id: str, acl: str, hash_: str, versions: bytes, row_version: int
    ) -> StoredKey:
        """Record a committed row, decoded from the columns written so that it is exactly what a
        reload would read."""
        try:
            key = decode_row(key_id, acl, hash_, versions, row_version)
        except CorruptRowError:
            self._data_version = None
            raise
        self._keys[key_id] = key
        self._meta[key_id] = KeyMeta(hash=key.hash, acl=key.acl)
        return key


def _guarded(fn: Callable[[sqlite3.Connection], _T], conn: sqlite3.Connection) -> _T:
    """Run ``fn``, turning any SQLite failure into an :class:`InternalError` that names the error
    class only (SQLite messages can quote values)."""
    try:
        return fn(conn)
    except sqlite3.Error as e:
        name = getattr(e, "sqlite_errorname", type(e).__name__)
        raise InternalError(f"SQLite key store: database error {name}") from None


class _transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on error. The connection is in autocommit
    mode (``isolation_level=None``), so transactions are exactly these."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._conn.in_transaction:
            return
        if exc_type is None:
            self._conn.execute("COMMIT")
        else:
            self._conn.execute("ROLLBACK")


def _next_row_version(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "UPDATE knox_counter SET last_row_version = last_row_version + 1 RETURNING last_row_version"
    ).fetchone()
    if row is None or type(row[0]) is not int:
        raise CorruptRowError("SQLite key store: the row version counter is missing")
    value: int = row[0]
    return value


def _load(conn: sqlite3.Connection) -> _Table:
    """The whole table, decoded, with the ``data_version`` of the same snapshot."""
    conn.execute("BEGIN")
    try:
        rows = conn.execute("SELECT id, acl, hash, versions, row_version FROM knox_keys").fetchall()
        data_version = conn.execute("PRAGMA data_version").fetchone()[0]
    finally:
        conn.execute("COMMIT")
    keys: dict[str, StoredKey | _Corrupt] = {}
    meta: dict[str, KeyMeta | _Corrupt] = {}
    stray_rows = 0
    for key_id, acl, hash_, versions, row_version in rows:
        if not isinstance(key_id, str):
            stray_rows += 1
            continue
        try:
            meta[key_id] = m = decode_meta(key_id, acl, hash_)
            keys[key_id] = StoredKey(
                id=key_id,
                acl=m.acl,
                versions=decode_versions_column(key_id, versions),
                hash=m.hash,
                row_version=decode_row_version_column(key_id, row_version),
            )
        except CorruptRowError as e:
            # Bad versions or row_version leave the metadata readable: keep it if it decoded.
            meta.setdefault(key_id, _Corrupt(str(e)))
            keys[key_id] = _Corrupt(str(e))
    return _Table(keys=keys, meta=meta, stray_rows=stray_rows, data_version=data_version)


def _open(path: Path) -> tuple[sqlite3.Connection, _Table]:
    conn = _connect(path)
    try:
        return conn, _guarded(_load, conn)
    except BaseException:
        conn.close()
        raise


def _connect(path: Path) -> sqlite3.Connection:
    try:
        # Created here with 0600 (SQLite gives its -wal and -shm files the same mode): the file
        # holds the ACLs in the clear.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except (OSError, sqlite3.Error) as e:
        reason = e.strerror if isinstance(e, OSError) else type(e).__name__
        raise InternalError(f"{path}: cannot open key store ({reason})") from None
    try:
        _init(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _init(conn: sqlite3.Connection, path: Path) -> None:
    try:
        conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError:
        raise InternalError(f"{path}: not an SQLite database") from None
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise InternalError(f"{path}: cannot use WAL mode (journal mode is {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        with _transaction(conn):
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            if app_id == 0:
                if conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                    raise InternalError(f"{path}: is an SQLite database of another program")
                # Not executescript(): it would commit the open transaction first.
                for statement in _SCHEMA:
                    conn.execute(statement)
            elif app_id != APPLICATION_ID:
                raise InternalError(f"{path}: is an SQLite database of another program")
            else:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version != SCHEMA_VERSION:
                    raise InternalError(
                        f"{path}: key store schema version {version} is not supported "
                        f"(this code knows {SCHEMA_VERSION})"
                    )
    except sqlite3.Error as e:
        name = getattr(e, "sqlite_errorname", type(e).__name__)
        raise InternalError(f"{path}: cannot open key store (database error {name})") from None
