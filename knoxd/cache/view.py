"""The in-memory view of the cache: what the socket API serves from (pure, no I/O).

The view holds one :class:`ViewEntry` per (identity, key id), decoded, so a ``get`` is a dictionary
lookup. Whoever refreshes the cache writes here (and to :class:`~knoxd.cache.store.CacheStore`);
the socket side reads and listens.

Change notification: listeners registered per (identity, key id) are called synchronously, in
registration order, with an :class:`Updated` or :class:`Removed` after each change that a client
could notice: a new value, a new hash, an error appearing or clearing, a removal. A confirmation
that only moves ``fetched_at`` forward is not an event (every refresh would wake every watcher
for nothing). Listeners must not raise and must not change the view.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace

from knox.model import Key
from knoxd.cache.entry import CacheEntry

__all__ = [
    "CacheView",
    "Change",
    "Listener",
    "RemovalReason",
    "Removed",
    "Updated",
    "ViewEntry",
]


class RemovalReason(enum.Enum):
    """Why a key left the view. DELETED and FORBIDDEN are the protocol's ``revoked`` reasons."""

    DELETED = "deleted"
    FORBIDDEN = "forbidden"
    UNREGISTERED = "unregistered"


class ViewEntry:
    """The served state of one key of one identity.

    The view updates it in place (one object per key while it stays in the view): read ``key``,
    ``fetched_at``, ``last_error`` when answering, not earlier. :meth:`encode` memoizes a
    pre-encoded form of the key (the socket layer's response bytes) until the key changes.
    """

    __slots__ = ("_encoded", "_entry")

    def __init__(self, entry: CacheEntry) -> None:
        self._entry = entry
        self._encoded: bytes | None = None

    @property
    def entry(self) -> CacheEntry:
        """The current state as a :class:`CacheEntry` (what ``CacheStore.put`` persists)."""
        return self._entry

    @property
    def identity(self) -> str:
        return self._entry.identity

    @property
    def key_id(self) -> str:
        return self._entry.key.id

    @property
    def key(self) -> Key:
        return self._entry.key

    @property
    def hash(self) -> str:
        return self._entry.hash

    @property
    def fetched_at(self) -> float:
        """Unix time the value was last confirmed upstream."""
        return self._entry.fetched_at

    @property
    def last_error(self) -> str | None:
        return self._entry.last_error

    @property
    def encoded(self) -> bytes | None:
        """The memoized encoding of the current key, or None if none was built since it changed."""
        return self._encoded

    def encode(self, encoder: Callable[[Key], bytes]) -> bytes:
        """The memoized encoding of the current key, built with ``encoder`` if there is none.

        ``encoder`` must be a pure function of the key: the memo is shared by every reader.
        """
        if self._encoded is None:
            self._encoded = encoder(self._entry.key)
        return self._encoded

    def _replace(self, entry: CacheEntry) -> None:
        if entry.key != self._entry.key:
            self._encoded = None
        self._entry = entry

    def __repr__(self) -> str:
        return f"ViewEntry({self._entry!r}, encoded={self._encoded is not None})"


@dataclass(frozen=True, slots=True)
class Updated:
    """The key has a (new) state; read it from ``entry`` when delivering."""

    entry: ViewEntry

    @property
    def identity(self) -> str:
        return self.entry.identity

    @property
    def key_id(self) -> str:
        return self.entry.key_id


@dataclass(frozen=True, slots=True)
class Removed:
    """The key left the view and must no longer be served."""

    identity: str
    key_id: str
    reason: RemovalReason


Change = Updated | Removed
Listener = Callable[[Change], None]
_Slot = tuple[str, str]


class CacheView:
    """Decoded cache entries by (identity, key id), with change listeners."""

    def __init__(self) -> None:
        self._entries: dict[_Slot, ViewEntry] = {}
        self._listeners: dict[_Slot, list[Listener]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, identity: str, key_id: str) -> ViewEntry | None:
        return self._entries.get((identity, key_id))

    def entries(self, identity: str | None = None) -> list[ViewEntry]:
        """A snapshot list of the entries (of one identity, if given)."""
        return [e for e in self._entries.values() if identity is None or e.identity == identity]

    def set(self, entry: CacheEntry) -> ViewEntry:
        """Serve ``entry`` from now on. Notifies unless only ``fetched_at`` changed."""
        slot = (entry.identity, entry.key_id)
        current = self._entries.get(slot)
        if current is None:
            current = self._entries[slot] = ViewEntry(entry)
            self._notify(slot, Updated(current))
            return current
        old = current.entry
        current._replace(entry)
        if (old.key, old.hash, old.last_error) != (entry.key, entry.hash, entry.last_error):
            self._notify(slot, Updated(current))
        return current

    def confirm(self, identity: str, key_id: str, at: float) -> bool:
        """The upstream confirmed the value unchanged at ``at``: ``fetched_at`` moves forward to it
        (never back) and ``last_error`` clears. Only memory changes (see ``store.py`` on what is
        persisted). Notifies if an error cleared. False if the key is not in the view."""
        current = self._entries.get((identity, key_id))
        if current is None:
            return False
        old = current.entry
        current._replace(replace(old, fetched_at=max(old.fetched_at, at), last_error=None))
        if old.last_error is not None:
            self._notify((identity, key_id), Updated(current))
        return True

    def record_error(self, identity: str, key_id: str, error: str) -> bool:
        """A refresh failed: keep serving the value, with ``error`` as its ``last_error``.
        Notifies if the error text changed. False if the key is not in the view."""
        current = self._entries.get((identity, key_id))
        if current is None:
            return False
        old = current.entry
        if old.last_error != error:
            current._replace(replace(old, last_error=error))
            self._notify((identity, key_id), Updated(current))
        return True

    def remove(self, identity: str, key_id: str, reason: RemovalReason) -> bool:
        """Stop serving the key and tell its listeners why, whether or not it was held (a key
        refused before its first fetch is news to a watcher too). True if an entry went."""
        slot = (identity, key_id)
        removed = self._entries.pop(slot, None) is not None
        self._notify(slot, Removed(identity, key_id, reason))
        return removed

    def subscribe(self, identity: str, key_id: str, listener: Listener) -> None:
        """Call ``listener`` on every change of the key, until :meth:`unsubscribe`."""
        self._listeners.setdefault((identity, key_id), []).append(listener)

    def unsubscribe(self, identity: str, key_id: str, listener: Listener) -> None:
        """Remove one registration of ``listener``; no error if there is none."""
        slot = (identity, key_id)
        listeners = self._listeners.get(slot)
        if listeners is None:
            return
        try:
            listeners.remove(listener)
        except ValueError:
            return
        if not listeners:
            del self._listeners[slot]

    def listener_count(self, identity: str, key_id: str) -> int:
        return len(self._listeners.get((identity, key_id), ()))

    def _notify(self, slot: _Slot, change: Change) -> None:
        for listener in tuple(self._listeners.get(slot, ())):
            listener(change)
