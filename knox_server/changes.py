"""The change hub: wakes long-polling change checks when a key they watch changes.

One :class:`ChangeHub` per server process. Writers announce changes with :meth:`ChangeHub.notify`
(the app after each of its own writes, the PostgreSQL listener for every replica's writes) and
:meth:`ChangeHub.notify_all` (after the change feed was interrupted, when any change may have been
missed). A long-poll takes a :class:`Subscription` *before* it checks the store, so that a change
committed between its check and its wait is never missed:

.. code-block:: python

    subscription = hub.subscribe(key_ids)
    if subscription is None:
        ...  # too many waiters: answer at once
    with subscription:
        while not (changed := await check()) and await subscription.wait(deadline):
            pass

Everything runs in the trio thread: a listener in a worker thread hands its notifications over
with ``trio.from_thread.run_sync``. Registering a subscription costs O(its key ids), a
notification O(subscriptions on that key); nothing polls.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType

import trio

__all__ = ["DEFAULT_MAX_WAITERS", "ChangeHub", "Subscription"]

# Each waiter is an open HTTP request (a connection or an HTTP/2 stream) held by the server.
DEFAULT_MAX_WAITERS = 10_000


class Subscription:
    """Interest in a set of key ids, registered with its hub until :meth:`close` (or the end of
    its ``with`` block). A change announced while it is registered is remembered until a
    :meth:`wait` consumes it."""

    __slots__ = ("_event", "_hub", "_key_ids")

    def __init__(self, hub: ChangeHub, key_ids: frozenset[str]) -> None:
        self._hub: ChangeHub | None = hub
        self._key_ids = key_ids
        self._event = trio.Event()

    @property
    def key_ids(self) -> frozenset[str]:
        return self._key_ids

    @property
    def closed(self) -> bool:
        return self._hub is None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Unregister; idempotent. A closed subscription hears nothing more."""
        hub, self._hub = self._hub, None
        if hub is not None:
            hub._remove(self)

    async def wait(self, deadline: float) -> bool:
        """Wait until a change to one of the key ids is announced, or until ``deadline`` (trio
        time). True if a change was announced since the subscription began or since the last
        ``wait`` that returned True (so none is lost between two waits); False at the deadline.
        Raises ``RuntimeError`` on a closed subscription."""
        if self._hub is None:
            raise RuntimeError("wait on a closed subscription")
        with trio.move_on_at(deadline):
            await self._event.wait()
        if not self._event.is_set():
            return False
        self._event = trio.Event()
        return True

    def _fire(self) -> None:
        self._event.set()


class ChangeHub:
    """Who waits for which keys, at most ``max_waiters`` subscriptions at once."""

    def __init__(self, max_waiters: int = DEFAULT_MAX_WAITERS) -> None:
        if max_waiters < 0:
            raise ValueError("max_waiters must not be negative")
        self.max_waiters = max_waiters
        self._by_key: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()

    @property
    def waiting(self) -> int:
        """Subscriptions registered now."""
        return len(self._all)

    @property
    def full(self) -> bool:
        return len(self._all) >= self.max_waiters

    def subscribe(self, key_ids: Iterable[str]) -> Subscription | None:
        """Register interest in ``key_ids`` now; None if ``max_waiters`` are already registered
        (the caller answers without waiting, it is never queued)."""
        if self.full:
            return None
        subscription = Subscription(self, frozenset(key_ids))
        self._all.add(subscription)
        for key_id in subscription.key_ids:
            self._by_key.setdefault(key_id, set()).add(subscription)
        return subscription

    def notify(self, key_id: str) -> None:
        """``key_id`` changed (versions, ACL, created or deleted): wake its subscriptions."""
        for subscription in self._by_key.get(key_id, ()):
            subscription._fire()

    def notify_all(self) -> None:
        """Any key may have changed (the change feed was interrupted): wake every subscription
        registered now, so that each re-checks."""
        for subscription in self._all:
            subscription._fire()

    def _remove(self, subscription: Subscription) -> None:
        self._all.discard(subscription)
        for key_id in subscription.key_ids:
            waiting = self._by_key.get(key_id)
            if waiting is None:
                continue
            waiting.discard(subscription)
            if not waiting:
                del self._by_key[key_id]
