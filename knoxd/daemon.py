"""knoxd's composition root: from a :class:`~knoxd.config.Config` to a running daemon.

Start-up, in order (every step before serving; a failure is a :class:`StartupError` naming what is
wrong, and nothing is left running):

1. each identity's cert and key files are read and checked, and its client is built;
2. the cache key is found or created and the cache database opened (a lost key means a cold
   start: rows that no longer open are dropped);
3. identities that left the configuration lose their rows and registrations;
4. the rows are loaded into the in-memory view; registrations are the persisted ones plus the
   configuration's keys, and a row nobody registers any more is dropped;
5. the refreshers and the identities' file watchers start, and ``task_status.started`` receives
   the :class:`DaemonContext`. The cache is served from here on, before the upstream answered:
   with the upstream down, every cached key stays available, its error recorded (so it shows as
   stale, with its age) by the first failed check.

The socket side plugs in through ``serve_sockets``, which receives the context and runs for as long
as the daemon should; when it returns (or raises, or the caller cancels), the daemon shuts down:
the watchers' stop events are set, the tasks cancelled, the clients closed and then the store
(always, even under cancellation: a cache write in progress completes first).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog
import trio

from knox.model import is_valid_key_id
from knoxd.cache.cache_key import CacheKeyError, load_cache_key
from knoxd.cache.entry import CacheEntry
from knoxd.cache.store import CacheOpenError, CacheStore, CacheWriteError
from knoxd.cache.view import CacheView
from knoxd.config import Config
from knoxd.fetch import FetchRequester
from knoxd.upstream.identity import Identity
from knoxd.upstream.identity_files import IdentityFileError
from knoxd.upstream.manager import UpstreamManager
from knoxd.upstream.refresher import Refresher, RefreshSettings, RefreshState

__all__ = ["DaemonContext", "StartupError", "run_daemon"]

log = structlog.get_logger("knoxd")


class StartupError(Exception):
    """The daemon cannot start; the message says why (and names the identity or file)."""


@dataclass(frozen=True, slots=True)
class DaemonContext:
    """What the socket side serves from: the configuration, the view of the cache, the way to ask
    the upstream side for fetches, and the daemon's start time (unix seconds)."""

    config: Config
    view: CacheView
    fetcher: FetchRequester
    started_at: float


ServeSockets = Callable[[DaemonContext], Awaitable[None]]


async def run_daemon(
    config: Config,
    *,
    serve_sockets: ServeSockets | None = None,
    environ: Mapping[str, str] | None = None,
    cache_max_bytes: int | None = None,
    refusal_ttl_seconds: float = 30.0,
    task_status: trio.TaskStatus[DaemonContext] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until ``serve_sockets`` returns or the caller cancels (without
    ``serve_sockets``: until cancelled).

    ``environ`` is where ``CREDENTIALS_DIRECTORY`` is looked up (default: the process
    environment); ``cache_max_bytes`` bounds the cache database file. Raises
    :class:`StartupError`.
    """
    started_at = time.time()
    state_dir = config.daemon.state_dir
    try:
        identities = await trio.to_thread.run_sync(_load_identities, config)
    except IdentityFileError as exc:
        raise StartupError(str(exc)) from None
    try:
        try:
            await trio.to_thread.run_sync(_make_state_dir, config)
            cache_key = await trio.to_thread.run_sync(load_cache_key, state_dir, environ)
            store = await CacheStore.open(state_dir, cache_key, max_bytes=cache_max_bytes)
        except (OSError, CacheKeyError, CacheOpenError) as exc:
            raise StartupError(_describe(exc)) from None
        try:
            view, registered = await _load_cache(config, store)
            settings = dataclasses.replace(
                RefreshSettings.from_config(config.daemon),
                refusal_ttl_seconds=refusal_ttl_seconds,
            )
            now = trio.current_time()
            refreshers = {
                name: Refresher(
                    identity,
                    RefreshState(
                        settings,
                        now=now,
                        registered=registered[name],
                        hashes={e.key_id: e.hash for e in view.entries(name)},
                    ),
                    store=store,
                    view=view,
                )
                for name, identity in identities.items()
            }
            manager = UpstreamManager(refreshers, store=store, view=view)
            context = DaemonContext(config, view, manager, started_at)
            async with trio.open_nursery() as nursery:
                try:
                    for identity in identities.values():
                        nursery.start_soon(identity.watch)
                    for refresher in refreshers.values():
                        nursery.start_soon(refresher.run)
                    log.info(
                        "knoxd started",
                        identities=[i.facts.principal for i in identities.values()],
                        cached_keys=len(view),
                        cache_key=cache_key.source.value,
                    )
                    task_status.started(context)
                    if serve_sockets is None:
                        await trio.sleep_forever()
                    else:
                        await serve_sockets(context)
                finally:
                    for identity in identities.values():
                        identity.stop()
                    nursery.cancel_scope.cancel()
        finally:
            # Even when the stop is cut short: the close waits for a write in progress, so the
            # file is left closed and every answer already applied is in it.
            with trio.CancelScope(shield=True):
                await store.aclose()
    finally:
        for identity in identities.values():
            await identity.aclose()
        log.info("knoxd stopped")


def _load_identities(config: Config) -> dict[str, Identity]:
    now = dt.datetime.now(dt.UTC)
    return {i.name: Identity.load(i, config.upstream, now=now) for i in config.identities}


def _make_state_dir(config: Config) -> None:
    config.daemon.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return f"{exc.filename or 'state directory'}: {exc.strerror or exc}"
    return str(exc)


async def _load_cache(config: Config, store: CacheStore) -> tuple[CacheView, dict[str, set[str]]]:
    """The view and each identity's registrations, after dropping what no identity keeps."""
    names = [i.name for i in config.identities]
    try:
        gone = await store.retain_identities(names)
    except CacheWriteError as exc:
        log.warning("could not prune identities that left the configuration", error=str(exc))
    else:
        if gone:
            log.info("dropped the cache of identities no longer configured", keys=gone)
    persisted = await store.registrations()
    registered: dict[str, set[str]] = {}
    for identity in config.identities:
        keys = set(identity.keys)
        for key_id in persisted.get(identity.name, set()):
            if is_valid_key_id(key_id):
                keys.add(key_id)
            else:
                log.warning("ignoring an invalid registered key id", identity=identity.name)
        registered[identity.name] = keys
    view = CacheView()
    orphans: list[CacheEntry] = []
    for entry in await store.load_all():
        if entry.key_id in registered.get(entry.identity, set()):
            view.set(entry)
        else:
            orphans.append(entry)
    for entry in orphans:
        try:
            await store.delete(entry.identity, entry.key_id)
        except CacheWriteError as exc:
            log.warning(
                "could not drop an unregistered key from the cache file",
                identity=entry.identity,
                key_id=entry.key_id,
                error=str(exc),
            )
    log.info("cache loaded", entries=len(view), dropped_unregistered=len(orphans))
    return view, registered
