"""The on-disk cache: ``<state_dir>/cache.db``, SQLite in WAL mode with ``synchronous=FULL``.

Tables:

* ``keys(identity, key_id, sealed)``: one row per cached key of an identity, ``sealed`` as
  :mod:`knoxd.cache.rows` makes it (AES-256-GCM under the cache key, AAD binding identity and key
  id). Nothing in this table is readable without the cache key.
* ``registrations(identity, key_id)``: which keys each identity keeps fresh. Not secret, plain.

Guarantees:

* every write is one transaction committed with fsync before the call returns: after a crash or
  power loss each row holds either its old or its new value, never a torn one;
* a write that fails (disk full, I/O error) raises :class:`CacheWriteError` and changes nothing;
  the caller keeps serving what it had;
* :meth:`CacheStore.load_all` never serves a row it cannot open (another cache key, a tampered or
  moved row, a format it does not know): such rows are logged by identity and key id only,
  deleted, and skipped;
* a ``cache.db`` that is not a usable database at all (corrupt, or from a newer knoxd) is moved
  aside to ``cache.db.unusable`` and a new one is started: a cold start, not an outage.

What is not persisted on every refresh: ``fetched_at`` moves forward in memory
(:meth:`knoxd.cache.view.CacheView.confirm`) and reaches the disk with the entry's next
:meth:`~CacheStore.put`. After a restart an entry's age can therefore be over-stated, never
under-stated, until its first refresh; a caller that wants tighter ages after restarts can ``put``
``ViewEntry.entry`` now and then (for instance once per revalidation sweep).

All SQLite work runs in a worker thread (``trio.to_thread``) on one connection, one call at a time
(a :class:`trio.Lock`). A cancelled call still finishes its transaction before returning, so
cancellation never leaves a write half done.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import structlog
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from knoxd.cache.cache_key import CacheKey
from knoxd.cache.entry import CacheEntry
from knoxd.cache.rows import RowError, open_entry, seal_entry

__all__ = [
    "DB_NAME",
    "SCHEMA_VERSION",
    "UNUSABLE_SUFFIX",
    "CacheOpenError",
    "CacheStore",
    "CacheWriteError",
]

DB_NAME = "cache.db"
UNUSABLE_SUFFIX = ".unusable"
SCHEMA_VERSION = 1
_BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    identity TEXT NOT NULL,
    key_id TEXT NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (identity, key_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS registrations (
    identity TEXT NOT NULL,
    key_id TEXT NOT NULL,
    PRIMARY KEY (identity, key_id)
) WITHOUT ROWID;
"""

log = structlog.get_logger("knoxd.cache")

T = TypeVar("T")


class CacheWriteError(Exception):
    """A write did not happen (disk full, I/O error). Nothing was changed; the message names the
    operation and SQLite's error, never data."""


class CacheOpenError(Exception):
    """The cache database cannot be opened or created at all (permissions, missing directory)."""


class _Unusable(Exception):
    """The file exists but is not a database this version can use."""


class CacheStore:
    """The cache database. Create with :meth:`open`, close with :meth:`aclose` or ``async with``."""

    def __init__(self, conn: sqlite3.Connection, aead: AESGCM, path: Path) -> None:
        self._conn = conn
        self._aead = aead
        self._lock = trio.Lock()
        self._closed = False
        self.path = path

    @classmethod
    async def open(
        cls, state_dir: Path, cache_key: CacheKey | bytes, *, max_bytes: int | None = None
    ) -> CacheStore:
        """Open or create ``<state_dir>/cache.db``.

        ``max_bytes`` bounds the database file (SQLite's ``max_page_count``): a write that would
        grow it further fails with :class:`CacheWriteError`. Raises :class:`CacheOpenError`.
        """
        key = cache_key.key if isinstance(cache_key, CacheKey) else cache_key
        aead = AESGCM(key)
        path = state_dir / DB_NAME
        conn = await trio.to_thread.run_sync(_open_db, path, max_bytes)
        return cls(conn, aead, path)

    async def __aenter__(self) -> CacheStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the database. Idempotent; later calls raise :class:`trio.ClosedResourceError`."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            await trio.to_thread.run_sync(self._conn.close)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            if self._closed:
                raise trio.ClosedResourceError("the cache store is closed")
            return await trio.to_thread.run_sync(fn, self._conn)

    async def load_all(self) -> list[CacheEntry]:
        """Every row that opens. Rows that do not are logged, deleted and left out."""
        aead = self._aead

        def load(conn: sqlite3.Connection) -> tuple[list[CacheEntry], list[tuple[str, str, str]]]:
            good: list[CacheEntry] = []
            bad: list[tuple[str, str, str]] = []
            for identity, key_id, sealed in conn.execute(
                "SELECT identity, key_id, sealed FROM keys ORDER BY identity, key_id"
            ):
                try:
                    good.append(open_entry(aead, identity, key_id, sealed))
                except RowError as e:
                    bad.append((identity, key_id, str(e)))
            return good, bad

        entries, bad = await self._run(load)
        for identity, key_id, reason in bad:
            log.warning(
                "dropping a cache row that does not open",
                identity=identity,
                key_id=key_id,
                reason=reason,
            )
        if bad:
            try:
                await self._write(
                    "drop unreadable rows",
                    lambda conn: conn.executemany(
                        "DELETE FROM keys WHERE identity = ? AND key_id = ?",
                        [(identity, key_id) for identity, key_id, _ in bad],
                    ),
                )
            except CacheWriteError as e:
                # They stay on disk but are never served; the next load tries again.
                log.warning("could not delete unreadable cache rows", error=str(e))
        return entries

    async def put(self, entry: CacheEntry) -> None:
        """Store ``entry``, replacing the row of (identity, key id). Durable when it returns.

        Raises :class:`CacheWriteError` (the previous row is intact).
        """
        sealed = seal_entry(self._aead, entry)
        await self._write(
            f"store key {entry.key_id!r} of identity {entry.identity!r}",
            lambda conn: conn.execute(
                "INSERT INTO keys (identity, key_id, sealed) VALUES (?, ?, ?) "
                "ON CONFLICT (identity, key_id) DO UPDATE SET sealed = excluded.sealed",
                (entry.identity, entry.key_id, sealed),
            ),
        )

    async def delete(self, identity: str, key_id: str) -> None:
        """Remove the cached row of (identity, key id), if any. Raises :class:`CacheWriteError`."""
        await self._write(
            f"delete key {key_id!r} of identity {identity!r}",
            lambda conn: conn.execute(
                "DELETE FROM keys WHERE identity = ? AND key_id = ?", (identity, key_id)
            ),
        )

    async def registrations(self) -> dict[str, set[str]]:
        """Every identity's registered key ids."""

        def read(conn: sqlite3.Connection) -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            for identity, key_id in conn.execute("SELECT identity, key_id FROM registrations"):
                out.setdefault(identity, set()).add(key_id)
            return out

        return await self._run(read)

    async def add_registrations(self, identity: str, key_ids: Iterable[str]) -> None:
        """Register ``key_ids`` for ``identity`` (already registered ones are kept).

        Raises :class:`CacheWriteError`.
        """
        rows = [(identity, k) for k in key_ids]
        await self._write(
            f"register keys for identity {identity!r}",
            lambda conn: conn.executemany(
                "INSERT OR IGNORE INTO registrations (identity, key_id) VALUES (?, ?)", rows
            ),
        )

    async def remove_registrations(self, identity: str, key_ids: Iterable[str]) -> None:
        """Unregister ``key_ids`` for ``identity`` and drop their cached rows, in one transaction:
        a key nobody keeps fresh does not linger on disk. Raises :class:`CacheWriteError`."""
        rows = [(identity, k) for k in key_ids]

        def remove(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM registrations WHERE identity = ? AND key_id = ?", rows)
            conn.executemany("DELETE FROM keys WHERE identity = ? AND key_id = ?", rows)

        await self._write(f"unregister keys for identity {identity!r}", remove)

    async def retain_identities(self, names: Iterable[str]) -> int:
        """Delete the rows and registrations of every identity not in ``names`` (identities that
        left the configuration); returns how many cached keys went. Raises :class:`CacheWriteError`.
        """
        keep = sorted(set(names))

        def prune(conn: sqlite3.Connection) -> int:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS keep_identities (name TEXT PRIMARY KEY)")
            conn.execute("DELETE FROM keep_identities")
            conn.executemany("INSERT INTO keep_identities (name) VALUES (?)", [(n,) for n in keep])
            gone = conn.execute(
                "DELETE FROM keys WHERE identity NOT IN (SELECT name FROM keep_identities)"
            ).rowcount
            conn.execute(
                "DELETE FROM registrations WHERE identity NOT IN (SELECT name FROM keep_identities)"
            )
            return gone

        return await self._write("remove identities that left the configuration", prune)

    async def _write(self, what: str, body: Callable[[sqlite3.Connection], T]) -> T:
        def transaction(conn: sqlite3.Connection) -> T:
            try:
                conn.execute("BEGIN IMMEDIATE")
                result = body(conn)
                conn.execute("COMMIT")
                return result
            except sqlite3.Error as e:
                _rollback(conn)
                name = getattr(e, "sqlite_errorname", type(e).__name__)
                raise CacheWriteError(f"cache write failed ({what}): {name}: {e}") from None

        return await self._run(transaction)


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls some failed transactions back by itself (SQLITE_FULL does); a ROLLBACK then
    # would fail with "no transaction is active".
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.warning("rollback failed; SQLite discards the transaction on its own")


def _open_db(path: Path, max_bytes: int | None) -> sqlite3.Connection:
    try:
        return _connect(path, max_bytes)
    except _Unusable as e:
        aside = path.with_name(path.name + UNUSABLE_SUFFIX)
        log.warning(
            "the cache database is unusable; moving it aside and starting cold",
            path=str(path),
            moved_to=str(aside),
            reason=str(e),
        )
        try:
            os.replace(path, aside)
            for suffix in ("-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
        except OSError as err:
            raise CacheOpenError(f"{path}: cannot move aside: {err.strerror or err}") from None
        try:
            return _connect(path, max_bytes)
        except _Unusable as again:
            raise CacheOpenError(f"{path}: a new database is unusable too: {again}") from None


def _connect(path: Path, max_bytes: int | None) -> sqlite3.Connection:
    try:
        # Created by hand first so that SQLite, which gives its -wal and -shm files the mode of the
        # database file, never makes any of them readable by others whatever the umask.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as e:
        message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CacheOpenError(f"{path}: cannot open: {message}") from None
    try:
        _prepare(conn, max_bytes)
    except _Unusable:
        conn.close()
        raise
    except sqlite3.Error as e:
        conn.close()
        if isinstance(e, sqlite3.DatabaseError) and getattr(e, "sqlite_errorname", "") in (
            "SQLITE_NOTADB",
            "SQLITE_CORRUPT",
        ):
            raise _Unusable(str(e)) from None
        raise CacheOpenError(f"{path}: cannot open: {e}") from None
    return conn


def _prepare(conn: sqlite3.Connection, max_bytes: int | None) -> None:
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if mode != "wal":
        raise sqlite3.OperationalError(f"cannot switch to WAL (journal mode {mode})")
    conn.execute("PRAGMA synchronous = FULL")
    (check,) = conn.execute("PRAGMA quick_check").fetchone()
    if check != "ok":
        raise _Unusable(f"integrity check failed: {check}")
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise _Unusable(f"schema version {version} is newer than this knoxd's {SCHEMA_VERSION}")
    conn.executescript(
        f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
    )
    if max_bytes is not None:
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        conn.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page_size)}")
