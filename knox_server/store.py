"""The storage interface of the server: what every backend (SQLite, PostgreSQL) implements.

A backend stores keys exactly as the server hands them over: the ACL and version metadata in the
clear (so authorization and change checks never decrypt anything), each version's data sealed by
:mod:`knox_server.crypto`. Writes are guarded optimistically by ``row_version``: an update names the
row version it read and fails with :class:`~knox.errors.ConcurrentChangeError` if the row changed
since. Backends do no business logic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from knox.model import ACL, VersionStatus

__all__ = ["KeyMeta", "KeyStore", "StoredKey", "StoredVersion"]


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One version as stored: metadata in the clear, ``sealed`` = the crypto module's envelope."""

    id: int
    sealed: bytes = field(repr=False)
    status: VersionStatus
    ts: int


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A key as stored. ``row_version`` is assigned by the backend on every add and update."""

    id: str
    acl: ACL
    versions: tuple[StoredVersion, ...]
    hash: str
    row_version: int = 0


@dataclass(frozen=True, slots=True)
class KeyMeta:
    """What the list and change-check routes need: no version data at all."""

    hash: str
    acl: ACL


class KeyStore(Protocol):
    """A key store. Every method may raise :class:`~knox.errors.InternalError` on a backend fault;
    none blocks the trio thread (backends run their I/O in worker threads)."""

    async def get(self, key_id: str) -> StoredKey | None:
        """The key, or None if there is no such key."""

    async def meta(self, key_ids: Sequence[str] | None = None) -> dict[str, KeyMeta]:
        """Hash and ACL of the named keys that exist (all keys when ``key_ids`` is None)."""

    async def add(self, key: StoredKey) -> StoredKey:
        """Insert a new key; returns it with its row version.

        Raises :class:`~knox.errors.KeyExistsError` if the id is taken."""

    async def update(self, key: StoredKey) -> StoredKey:
        """Replace the key if its stored row version is still ``key.row_version``; returns the new
        row. Raises :class:`~knox.errors.ConcurrentChangeError` if it changed meanwhile, or
        :class:`~knox.errors.KeyNotFoundError` if it was deleted."""

    async def delete(self, key_id: str) -> bool:
        """Remove the key; False if there was none."""

    async def aclose(self) -> None:
        """Release connections and threads; idempotent."""
