"""The refresher: keeps one identity's registered keys fresh in the cache.

Two layers, h11-style:

* :class:`RefreshState` decides, without I/O: which keys to fetch, when to run the bulk change
  check, when a full revalidation is due, how long to back off after a failure, and what an
  answer means (:func:`judge`). Its clock is whatever ``now`` the caller passes (trio's clock in
  the shell, plain numbers in tests).
* :class:`Refresher` is the trio shell: it asks the state for the next :data:`Step`, performs it
  with the identity's client (only through :mod:`knox.http_client`, so only the Knox v0 API is
  used), writes results to the disk first and then to the view, and reports back.

One cycle against the v0 API (Go Knox or ours):

1. ``GET /v0/keys/?id1=h1&…`` with the hash of every cached key (chunked by the HTTP client so no
   URL is too long) answers which changed. A ``Prefer: wait=N`` header asks for a long-poll; a
   server that applies it (``Preference-Applied``) holds the answer until something changes, so
   the next check follows at once (but at most two checks are sent within any
   ``long_poll_floor_seconds``); a server that ignores it (Go Knox) is polled every
   ``refresh_seconds``. New work (a registration, a request, new credentials) cuts a held check
   short once it has lasted the floor.
2. ``GET /v0/keys/ID/?status="Inactive"`` for every changed key, every newly registered key, and
   on the slower ``revalidate_seconds`` every registered key (a deleted key or a revoked ACL does
   not change the hash, so only a revalidation sees it). All versions are fetched so that the
   version hash can be checked (:func:`knox.http_client.parse_key`); Inactive versions are then
   dropped, the protocol never serves them.

What an answer means (:func:`judge`): 404 code 4 → the key was deleted; 403 → access revoked; in
both cases the key leaves the cache and the view and is refused from then on (it stays
registered, so a later revalidation brings it back if it reappears). An unusable answer for one
key (garbage, the wrong key, a hash that does not match) keeps the old value and records the
error. Anything else (no server reachable, 5xx after the client's retries, 401, a garbage change
check) fails the identity's cycle: every cached key of the identity records the error, the value
is still served, and the identity backs off exponentially with full jitter, capped. Each identity
has its own task, client and backoff, so one identity's failures never delay another's.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import structlog
import trio

from knox import wire
from knox.errors import KeyNotFoundError, KnoxError, UnauthorizedError
from knox.http_client import KnoxHTTPClient
from knox.model import Key, VersionStatus
from knoxd.cache.entry import CacheEntry
from knoxd.cache.store import CacheStore, CacheWriteError
from knoxd.cache.view import CacheView, RemovalReason
from knoxd.config import DaemonConfig
from knoxd.fetch import Refusal
from knoxd.upstream.identity import Identity

__all__ = [
    "Check",
    "Fetch",
    "RefreshSettings",
    "RefreshState",
    "Refresher",
    "Step",
    "Verdict",
    "Wait",
    "full_jitter_backoff",
    "judge",
]

log = structlog.get_logger("knoxd.upstream")


@dataclass(frozen=True, slots=True)
class RefreshSettings:
    """Timing and bounds of the refreshers (durations in seconds).

    ``jitter`` shortens each interval (and each long-poll window) by a random fraction up to it,
    so hosts started together spread out and no check comes later than its interval.
    ``refusal_ttl_seconds`` is how long a 403/404 answer is trusted before a request from the
    socket side may ask again. ``fetch_batch`` bounds how many keys one fetch step takes, so
    that new registrations get their turn during a long revalidation sweep.
    """

    refresh_seconds: float = 60.0
    revalidate_seconds: float = 600.0
    jitter: float = 0.1
    backoff_min_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    refusal_ttl_seconds: float = 30.0
    fetch_concurrency: int = 8
    fetch_batch: int = 256
    long_poll_floor_seconds: float = 1.0

    @classmethod
    def from_config(cls, daemon: DaemonConfig) -> RefreshSettings:
        return cls(
            refresh_seconds=daemon.refresh_seconds,
            revalidate_seconds=daemon.revalidate_seconds,
            jitter=daemon.jitter,
            backoff_min_seconds=daemon.backoff_min_seconds,
            backoff_max_seconds=daemon.backoff_max_seconds,
        )

    @property
    def long_poll_wait(self) -> int | None:
        """The ``Prefer: wait`` of a change check: the refresh interval, in whole seconds."""
        wait = int(self.refresh_seconds)
        return wait if wait >= 1 else None


def full_jitter_backoff(failures: int, settings: RefreshSettings, rng: random.Random) -> float:
    """Seconds to wait after ``failures`` consecutive failures (1 or more): uniform in
    ``[0, min(backoff_max, backoff_min * 2**(failures-1))]`` ("full jitter")."""
    exponent = min(max(failures - 1, 0), 64)
    ceiling = min(settings.backoff_max_seconds, settings.backoff_min_seconds * 2.0**exponent)
    return rng.uniform(0.0, ceiling)


class Verdict(enum.Enum):
    """What a failed key fetch means."""

    DELETED = "deleted"
    FORBIDDEN = "forbidden"
    BAD_ANSWER = "bad_answer"
    UPSTREAM_DOWN = "upstream_down"


def judge(error: KnoxError) -> Verdict:
    """Classify the error of ``GET /v0/keys/ID/``: the key's own fate, or the identity's."""
    if isinstance(error, KeyNotFoundError):
        return Verdict.DELETED
    if isinstance(error, UnauthorizedError):
        return Verdict.FORBIDDEN
    if isinstance(error, wire.WireError):
        return Verdict.BAD_ANSWER
    return Verdict.UPSTREAM_DOWN


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do before ``until`` (or a wake-up)."""

    until: float


@dataclass(frozen=True, slots=True)
class Fetch:
    """GET these keys."""

    key_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Check:
    """Run the change check for ``hashes``; a long-poll (``wait`` set) ends by ``until``."""

    hashes: Mapping[str, str]
    wait: int | None
    until: float


Step = Wait | Fetch | Check


class RefreshState:
    """One identity's refresh decisions. Pure: every method takes ``now`` where time matters.

    ``registered`` is what the identity keeps fresh; ``hashes`` the version hash of each key the
    cache holds. Keys queue for a fetch in two tiers: urgent (new registrations, explicit
    requests, keys the change check reported) before the revalidation sweep.
    """

    def __init__(
        self,
        settings: RefreshSettings,
        *,
        now: float,
        registered: Iterable[str] = (),
        hashes: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self.registered: set[str] = set(registered)
        self.hashes: dict[str, str] = {
            k: h for k, h in (hashes or {}).items() if k in self.registered
        }
        self._urgent: dict[str, None] = dict.fromkeys(
            sorted(k for k in self.registered if k not in self.hashes)
        )
        self._sweep: dict[str, None] = {}
        self._later: set[str] = set()
        self._unanswered: set[str] = set()
        self._refused: dict[str, tuple[Refusal, float]] = {}
        # When the last held check was sent (None after one that was not held).
        self._held_since: float | None = None
        self.check_at = now
        self.revalidate_at = now + self._jittered(settings.revalidate_seconds)
        self.retry_at: float | None = None
        self.failures = 0
        self.last_error: str | None = None

    def _jittered(self, interval: float) -> float:
        return interval * (1.0 - self.settings.jitter * self._rng.random())

    # --- what to do next ---------------------------------------------------------------------

    def next_step(self, now: float) -> Step:
        """The next thing to do. Starting a due revalidation queues every registered key."""
        if self.retry_at is not None and now < self.retry_at:
            return Wait(self.retry_at)
        if now >= self.revalidate_at:
            self._sweep.update(dict.fromkeys(sorted(self.registered)))
            self.revalidate_at = now + self._jittered(self.settings.revalidate_seconds)
        if self._urgent or self._sweep:
            return Fetch(self._batch())
        if now >= self.check_at:
            if self.hashes:
                return Check(dict(self.hashes), self._long_poll_wait(), self.revalidate_at)
            self._checked_nothing(now)
        return Wait(min(self.check_at, self.revalidate_at))

    def _long_poll_wait(self) -> int | None:
        """The ``Prefer: wait`` of the next check: the refresh interval shortened by up to
        ``jitter``, rounded to whole seconds (at least 1, at most the interval's whole seconds).
        Each re-armed long-poll gets its own window, so a fleet whose polls started together
        (after a server restart) ends them apart."""
        longest = self.settings.long_poll_wait
        if longest is None:
            return None
        return max(1, min(longest, round(self._jittered(self.settings.refresh_seconds))))

    def _batch(self) -> tuple[str, ...]:
        batch: list[str] = []
        for tier in (self._urgent, self._sweep):
            for key_id in tier:
                if len(batch) == self.settings.fetch_batch:
                    return tuple(batch)
                if key_id not in batch:
                    batch.append(key_id)
        return tuple(batch)

    def _checked_nothing(self, now: float) -> None:
        self._urgent.update(dict.fromkeys(sorted(self._later)))
        self._later.clear()
        self.check_at = now + self._jittered(self.settings.refresh_seconds)

    @property
    def queued(self) -> int:
        """Keys waiting for a fetch."""
        return len(self._urgent.keys() | self._sweep.keys())

    # --- registrations and requests ----------------------------------------------------------

    def is_registered(self, key_id: str) -> bool:
        return key_id in self.registered

    def register(self, key_ids: Iterable[str], now: float) -> list[str]:
        """Register keys; new ones, and refused ones whose refusal expired (which is then
        forgotten), queue for a fetch at once. Returns the ids that were not registered before."""
        new: list[str] = []
        for key_id in key_ids:
            if key_id not in self.registered:
                self.registered.add(key_id)
                self._urgent[key_id] = None
                new.append(key_id)
            elif key_id in self._refused and self._refusal_expired(key_id, now):
                # Forgotten, so that the answer is news again for whoever registered it.
                del self._refused[key_id]
                self._urgent[key_id] = None
        return new

    def unregister(self, key_ids: Iterable[str]) -> list[str]:
        """Forget keys entirely; returns those that were registered."""
        gone = [k for k in key_ids if k in self.registered]
        for key_id in gone:
            self.registered.discard(key_id)
            self.hashes.pop(key_id, None)
            self._urgent.pop(key_id, None)
            self._sweep.pop(key_id, None)
            self._later.discard(key_id)
            self._unanswered.discard(key_id)
            self._refused.pop(key_id, None)
        return gone

    def request(self, key_ids: Collection[str] | None) -> int:
        """Queue registered keys (all when None) for a fetch now; returns how many."""
        wanted = sorted(self.registered if key_ids is None else set(key_ids) & self.registered)
        self._urgent.update(dict.fromkeys(wanted))
        return len(wanted)

    # --- what the upstream said --------------------------------------------------------------

    def fetched(self, key_id: str, key_hash: str) -> None:
        """The key was fetched and is now cached with ``key_hash``."""
        self._done(key_id)
        self._refused.pop(key_id, None)
        self._unanswered.discard(key_id)
        if key_id in self.registered:
            self.hashes[key_id] = key_hash

    def refused(self, key_id: str, refusal: Refusal, now: float) -> bool:
        """The upstream refused the key (deleted or forbidden): it is no longer cached. True if
        this is news (the key was cached, or was refused differently or not at all)."""
        self._done(key_id)
        self._unanswered.discard(key_id)
        was_cached = self.hashes.pop(key_id, None) is not None
        previous = self._refused.get(key_id)
        self._refused[key_id] = (refusal, now)
        return was_cached or previous is None or previous[0] is not refusal

    def unanswered(self, key_id: str) -> None:
        """No usable answer for the key (bad content, or it could not be stored). A cached key is
        reported again by the next change check; an uncached one is retried with it."""
        self._done(key_id)
        if key_id in self.registered and key_id not in self.hashes:
            self._later.add(key_id)
            self._unanswered.add(key_id)

    def _done(self, key_id: str) -> None:
        self._urgent.pop(key_id, None)
        self._sweep.pop(key_id, None)

    def checked(
        self, changed: Iterable[str], now: float, *, held_since: float | None = None
    ) -> None:
        """The change check answered: ``changed`` keys queue for a fetch. ``held_since`` is when
        a check the server held (it applied the long-poll) was sent: the next one may follow at
        once, but no sooner than ``long_poll_floor_seconds`` after the held check sent before
        this one. So two changes in quick succession (add a version, promote it) each travel at
        once, and a server which claims to hold and answers at once gets at most two checks per
        floor, never a tight loop."""
        self._urgent.update(dict.fromkeys(sorted(set(changed) & self.registered)))
        self._urgent.update(dict.fromkeys(sorted(self._later)))
        self._later.clear()
        previous, self._held_since = self._held_since, held_since
        if held_since is None:
            self.check_at = now + self._jittered(self.settings.refresh_seconds)
        elif previous is None:
            self.check_at = now
        else:
            floor = min(self.settings.long_poll_floor_seconds, self.settings.refresh_seconds)
            self.check_at = max(now, previous + floor)

    def succeeded(self) -> None:
        """A step reached the upstream and got answers: backoff ends."""
        self.failures = 0
        self.retry_at = None
        self.last_error = None

    def failed(self, now: float, error: str) -> float:
        """The identity's step failed; returns the backoff delay before the next attempt."""
        self.failures += 1
        self.last_error = error
        delay = full_jitter_backoff(self.failures, self.settings, self._rng)
        self.retry_at = now + delay
        return delay

    # --- what the socket side may learn ------------------------------------------------------

    def _refusal_expired(self, key_id: str, now: float) -> bool:
        _, at = self._refused[key_id]
        return now - at >= self.settings.refusal_ttl_seconds

    def refusal(self, key_id: str, now: float) -> Refusal | None:
        """Why an uncached key cannot be served now, if the upstream said so: a recent 403/404
        (within the TTL), or an upstream that is failing or answered this key unusably."""
        if key_id not in self.registered or key_id in self.hashes:
            return None
        if key_id in self._refused and not self._refusal_expired(key_id, now):
            return self._refused[key_id][0]
        if self.failures or key_id in self._unanswered:
            return Refusal.UNREACHABLE
        return None


class Refresher:
    """The task that keeps one identity's keys fresh: ``await refresher.run()`` in a nursery.

    Writes go to the :class:`CacheStore` first and then to the :class:`CacheView`; a failed disk
    write is logged and the view keeps the previous value. ``write_lock`` serializes those writes
    with unregistrations, so an unregistered key is never written back.
    """

    def __init__(
        self,
        identity: Identity,
        state: RefreshState,
        *,
        store: CacheStore,
        view: CacheView,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.state = state
        self._store = store
        self._view = view
        self._wall_clock = wall_clock
        self.write_lock = trio.Lock()
        self.last_refresh_at: float | None = None
        # Upstream requests answered (change checks, key fetches) and not answered, for metrics.
        self.checks = 0
        self.fetches = 0
        self.failed_requests = 0
        # The wait the server applied to the last change check; None while it polls.
        self.long_poll_applied: int | None = None
        self._wakeup: trio.Event | None = None
        # The change check in flight, if it may be held (a long-poll), and when it started.
        self._long_poll: tuple[trio.CancelScope, float] | None = None
        identity.add_listener(self._on_rotation)

    @property
    def name(self) -> str:
        return self.identity.name

    def wake(self) -> None:
        """Re-plan soon: ends a wait at once, and a change check in flight once it has run for
        ``long_poll_floor_seconds`` (an ordinary check has answered by then; a long-poll the
        server holds is cut short). So a stream of wake-ups can delay a check, never starve it.
        """
        if self._wakeup is not None:
            self._wakeup.set()
        if self._long_poll is not None:
            scope, started = self._long_poll
            scope.deadline = min(
                scope.deadline, started + self.state.settings.long_poll_floor_seconds
            )

    def _on_rotation(self, principal_changed: bool) -> None:
        if principal_changed:
            # Another principal may read other keys: ask about all of them.
            self.state.request(None)
        self.wake()

    async def run(self) -> None:
        """Refresh until cancelled. A step that fails in an unexpected way (a bug) is logged
        with its traceback and backed off like an upstream failure: the cache keeps serving."""
        while True:
            step = self.state.next_step(trio.current_time())
            if isinstance(step, Wait):
                self._wakeup = trio.Event()
                with trio.move_on_at(step.until):
                    await self._wakeup.wait()
                self._wakeup = None
                continue
            try:
                if isinstance(step, Fetch):
                    await self._fetch(step.key_ids)
                else:
                    await self._check(step)
            except Exception as exc:
                # A daemon on every host must not die of one bad step.
                log.exception("refresh step failed unexpectedly", identity=self.name)
                self.state.failed(trio.current_time(), f"internal error: {type(exc).__name__}")

    # --- the change check --------------------------------------------------------------------

    async def _check(self, step: Check) -> None:
        scope = trio.CancelScope(deadline=step.until if step.wait is not None else math.inf)
        started = trio.current_time()
        try:
            async with self.identity.lease() as client:
                with scope:
                    if step.wait is not None:
                        self._long_poll = (scope, started)
                    result = await client.check_keys(step.hashes, wait=step.wait)
        except KnoxError as exc:
            self.failed_requests += 1
            self._failed(exc)
            return
        finally:
            self._long_poll = None
        if scope.cancelled_caught:
            return
        self.checks += 1
        self.long_poll_applied = result.preference_applied
        held_since = started if result.preference_applied is not None else None
        self.state.checked(result.ids, trio.current_time(), held_since=held_since)
        self._succeeded()
        changed = set(result.ids)
        at = self._wall_clock()
        for key_id in step.hashes:
            if key_id not in changed:
                self._view.confirm(self.name, key_id, at)

    # --- fetching keys -----------------------------------------------------------------------

    async def _fetch(self, key_ids: tuple[str, ...]) -> None:
        down: list[KnoxError] = []
        limiter = trio.CapacityLimiter(self.state.settings.fetch_concurrency)
        async with self.identity.lease() as client, trio.open_nursery() as nursery:
            for key_id in key_ids:
                nursery.start_soon(self._fetch_one, client, key_id, limiter, down, nursery)
        if down:
            self._failed(down[0])
        else:
            self._succeeded()

    async def _fetch_one(
        self,
        client: KnoxHTTPClient,
        key_id: str,
        limiter: trio.CapacityLimiter,
        down: list[KnoxError],
        nursery: trio.Nursery,
    ) -> None:
        async with limiter:
            try:
                outcome: Key | KnoxError = await client.get_key(key_id, VersionStatus.INACTIVE)
            except KnoxError as exc:
                if judge(exc) is Verdict.UPSTREAM_DOWN:
                    self.failed_requests += 1
                    down.append(exc)
                    nursery.cancel_scope.cancel()
                    return
                outcome = exc
            self.fetches += 1
            # Applying an answer is one short disk transaction: it completes even when a sibling
            # fetch fails and cancels the rest, so disk, view and state never disagree.
            with trio.CancelScope(shield=True):
                await self._settle(key_id, outcome)

    async def _settle(self, key_id: str, outcome: Key | KnoxError) -> None:
        if isinstance(outcome, Key):
            await self._apply(outcome)
            return
        verdict = judge(outcome)
        if verdict is Verdict.BAD_ANSWER:
            self._bad_answer(key_id, outcome)
        else:
            await self._refuse(key_id, verdict)

    async def _apply(self, key: Key) -> None:
        entry = CacheEntry(
            self.name, key.filtered(VersionStatus.ACTIVE), key.hash, self._wall_clock()
        )
        async with self.write_lock:
            if not self.state.is_registered(key.id):
                return
            current = self._view.get(self.name, key.id)
            if current is not None and (current.key, current.hash) == (entry.key, entry.hash):
                self._view.confirm(self.name, key.id, entry.fetched_at)
                self.state.fetched(key.id, key.hash)
                return
            failure = await _cache_write(self._store.put(entry))
            if failure is not None:
                log.error(
                    "cache write failed; still serving the previous value",
                    identity=self.name,
                    key_id=key.id,
                    error=failure,
                )
                self._view.record_error(self.name, key.id, "cache write failed")
                self.state.unanswered(key.id)
                return
            self._view.set(entry)
            self.state.fetched(key.id, key.hash)

    def _bad_answer(self, key_id: str, error: KnoxError) -> None:
        message = f"upstream: {error}"
        log.warning(
            "unusable answer for a key; keeping the cached value",
            identity=self.name,
            key_id=key_id,
            error=message,
        )
        self._view.record_error(self.name, key_id, message)
        self.state.unanswered(key_id)

    async def _refuse(self, key_id: str, verdict: Verdict) -> None:
        refusal, reason = (
            (Refusal.NOT_FOUND, RemovalReason.DELETED)
            if verdict is Verdict.DELETED
            else (Refusal.FORBIDDEN, RemovalReason.FORBIDDEN)
        )
        async with self.write_lock:
            if not self.state.is_registered(key_id):
                return
            news = self.state.refused(key_id, refusal, trio.current_time())
            if self._view.get(self.name, key_id) is not None:
                failure = await _cache_write(self._store.delete(self.name, key_id))
                if failure is not None:
                    log.error(
                        "could not delete a refused key from the cache file; not serving it",
                        identity=self.name,
                        key_id=key_id,
                        error=failure,
                    )
            if news:
                log.info(
                    "the upstream refused a key; no longer served",
                    identity=self.name,
                    key_id=key_id,
                    reason=reason.value,
                )
                self._view.remove(self.name, key_id, reason)

    # --- outcome of a step -------------------------------------------------------------------

    def _succeeded(self) -> None:
        if self.state.failures:
            log.info("upstream reachable again", identity=self.name)
        self.state.succeeded()
        self.last_refresh_at = self._wall_clock()

    def _failed(self, error: KnoxError) -> None:
        message = f"upstream: {error}"
        delay = self.state.failed(trio.current_time(), message)
        log.warning(
            "upstream refresh failed; backing off",
            identity=self.name,
            error=message,
            failures=self.state.failures,
            retry_in_seconds=round(delay, 3),
        )
        for entry in self._view.entries(self.name):
            self._view.record_error(self.name, entry.key_id, message)


async def _cache_write(write: Awaitable[None]) -> str | None:
    """Run a cache write; the :class:`CacheWriteError` text if it failed (nothing changed)."""
    try:
        await write
    except CacheWriteError as exc:
        return str(exc)
    return None
