"""Waiting for changes of watched keys, with at most one pending state per key.

A :class:`Watcher` is what one ``watch`` connection holds. It listens to a
:class:`~knoxd.cache.view.CacheView` for the keys it watches and keeps, per key, only the newest
pending change: a reader that falls behind finds one change per key waiting, never a backlog. Keys
are delivered in the order they first became pending (a key changing constantly keeps its place
and does not starve the others). The pending set is bounded by ``max_keys``.
"""

from __future__ import annotations

from types import TracebackType

import trio

from knoxd.cache.view import CacheView, Change, Updated

__all__ = ["DEFAULT_MAX_WATCHED_KEYS", "TooManyWatchesError", "Watcher"]

DEFAULT_MAX_WATCHED_KEYS = 1024

_Slot = tuple[str, str]


class TooManyWatchesError(Exception):
    """A watch beyond the watcher's ``max_keys``."""


class Watcher:
    """Pending changes of a set of (identity, key id) pairs. Close it (or use ``with``) to stop
    listening; a closed watcher's :meth:`next` raises :class:`trio.ClosedResourceError`."""

    def __init__(self, view: CacheView, *, max_keys: int = DEFAULT_MAX_WATCHED_KEYS) -> None:
        self._view = view
        self._max_keys = max_keys
        self._watched: set[_Slot] = set()
        self._pending: dict[_Slot, Change] = {}
        self._wakeup: trio.Event | None = None
        self._closed = False

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def watching(self) -> list[_Slot]:
        return sorted(self._watched)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def watch(self, identity: str, key_id: str) -> None:
        """Start watching the key, and queue its current state if the view holds it (so a client
        starts from the current state). Watching a watched key again only re-queues that state.

        Raises :class:`TooManyWatchesError` beyond ``max_keys``, :class:`trio.ClosedResourceError`
        once closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("the watcher is closed")
        slot = (identity, key_id)
        if slot not in self._watched:
            if len(self._watched) >= self._max_keys:
                raise TooManyWatchesError(f"at most {self._max_keys} keys can be watched")
            self._watched.add(slot)
            self._view.subscribe(identity, key_id, self._on_change)
        current = self._view.get(identity, key_id)
        if current is not None:
            self._on_change(Updated(current))

    def unwatch(self, identity: str, key_id: str) -> None:
        """Stop watching the key and forget its pending change; no error if it was not watched."""
        slot = (identity, key_id)
        if slot in self._watched:
            self._watched.discard(slot)
            self._view.unsubscribe(identity, key_id, self._on_change)
        self._pending.pop(slot, None)

    def poll(self) -> Change | None:
        """The next pending change, or None."""
        if not self._pending:
            return None
        slot = next(iter(self._pending))
        return self._pending.pop(slot)

    async def next(self) -> Change:
        """Wait for the next pending change. Raises :class:`trio.ClosedResourceError` if the
        watcher is or gets closed. Cancellation loses no change."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            change = self.poll()
            if change is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return change
            if self._closed:
                raise trio.ClosedResourceError("the watcher is closed")
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    def close(self) -> None:
        """Stop listening and drop pending changes; wakes a waiting :meth:`next`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for identity, key_id in self._watched:
            self._view.unsubscribe(identity, key_id, self._on_change)
        self._watched.clear()
        self._pending.clear()
        self._wake()

    def _on_change(self, change: Change) -> None:
        # Assigning to a present key keeps its position: newest state, original turn.
        self._pending[(change.identity, change.key_id)] = change
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
