"""The upstream side of :class:`knoxd.fetch.FetchRequester`, over the identities' refreshers.

Registrations made here are persisted in the cache database (so they survive a restart) and
queue an immediate fetch. Registrations from the configuration are kept in memory only: the file
re-registers them at every start, and a key dropped from it is then dropped from the cache.

The negative cache: after the upstream answered 403 or 404 for a key, :meth:`refusal` reports it
for ``refusal_ttl_seconds``, and registering the key again within that time causes no upstream
request; after it, a new registration asks again. While an identity's upstream is failing, its
uncached keys report :attr:`~knoxd.fetch.Refusal.UNREACHABLE`.

A registration while the identity is backing off does not cut the backoff short: a flood of
registrations must not turn into a flood of requests to a struggling server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import structlog
import trio

from knox.model import is_valid_key_id
from knoxd.cache.store import CacheStore, CacheWriteError
from knoxd.cache.view import CacheView, RemovalReason
from knoxd.fetch import FetchRequester, IdentityStatus, Refusal
from knoxd.upstream.refresher import Refresher

__all__ = ["MAX_KEYS_PER_IDENTITY", "UpstreamManager"]

#: Most keys one identity may keep registered.
MAX_KEYS_PER_IDENTITY = 100_000

log = structlog.get_logger("knoxd.upstream")


class UpstreamManager(FetchRequester):
    """Routes the socket side's requests to the refresher of each identity."""

    def __init__(
        self,
        refreshers: Mapping[str, Refresher],
        *,
        store: CacheStore,
        view: CacheView,
        max_keys_per_identity: int = MAX_KEYS_PER_IDENTITY,
    ) -> None:
        self._refreshers = dict(refreshers)
        self._store = store
        self._view = view
        self._max_keys = max_keys_per_identity

    def _refresher(self, identity: str) -> Refresher:
        try:
            return self._refreshers[identity]
        except KeyError:
            raise KeyError(f"no identity named {identity!r}") from None

    async def register(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        """Register ``key_ids`` for ``identity``; new ones are fetched at once.

        Raises ``KeyError`` for an unknown identity and ``ValueError`` for an invalid key id or
        when the identity would exceed its registration limit (nothing is registered then). A
        registration that cannot be persisted (disk full) is logged and holds until restart.
        """
        refresher = self._refresher(identity)
        ids = list(dict.fromkeys(key_ids))
        for key_id in ids:
            if not is_valid_key_id(key_id):
                raise ValueError(f"invalid key id {key_id[:64]!r}")
        state = refresher.state
        new = [k for k in ids if not state.is_registered(k)]
        if len(state.registered) + len(new) > self._max_keys:
            raise ValueError(f"identity {identity!r} may register at most {self._max_keys} keys")
        state.register(ids, trio.current_time())
        refresher.wake()
        if new:
            try:
                await self._store.add_registrations(identity, new)
            except CacheWriteError as exc:
                log.warning(
                    "could not persist registrations; they hold until the daemon restarts",
                    identity=identity,
                    keys=len(new),
                    error=str(exc),
                )
        return ids

    async def unregister(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        """Drop registrations and their cached values (view and disk); returns the ids that were
        registered. Raises ``KeyError`` for an unknown identity."""
        refresher = self._refresher(identity)
        async with refresher.write_lock:
            gone = [k for k in dict.fromkeys(key_ids) if refresher.state.is_registered(k)]
            if not gone:
                return []
            try:
                await self._store.remove_registrations(identity, gone)
            except CacheWriteError as exc:
                log.warning(
                    "could not remove registrations from the cache file; they are dropped from "
                    "memory and may come back after a restart",
                    identity=identity,
                    keys=len(gone),
                    error=str(exc),
                )
            refresher.state.unregister(gone)
            for key_id in gone:
                self._view.remove(identity, key_id, RemovalReason.UNREGISTERED)
        return gone

    def is_registered(self, identity: str, key_id: str) -> bool:
        refresher = self._refreshers.get(identity)
        return refresher is not None and refresher.state.is_registered(key_id)

    def refusal(self, identity: str, key_id: str) -> Refusal | None:
        refresher = self._refreshers.get(identity)
        if refresher is None:
            return None
        return refresher.state.refusal(key_id, trio.current_time())

    def request_refresh(self, identity: str | None, key_ids: Sequence[str] | None) -> int:
        """Queue registered keys for a fetch now. Raises ``KeyError`` for an unknown identity."""
        targets = (
            list(self._refreshers.values()) if identity is None else [self._refresher(identity)]
        )
        queued = 0
        for refresher in targets:
            queued += refresher.state.request(key_ids)
            refresher.wake()
        return queued

    def status(self) -> list[IdentityStatus]:
        return [
            IdentityStatus(
                name=r.name,
                principal=r.identity.facts.principal,
                keys=len(r.state.registered),
                last_refresh_at=r.last_refresh_at,
                last_error=r.state.last_error,
                upstream_ok=r.state.failures == 0,
                requests_answered=r.checks + r.fetches,
                requests_failed=r.failed_requests,
            )
            for r in self._refreshers.values()
        ]
