"""Answering one connection's requests (pure apart from awaiting the FetchRequester).

A :class:`Session` is the state of one connection: the peer's facts, which socket it came on,
its watcher. It turns parsed requests into response frames; the server shell does the I/O. Every
cached answer carries ``age_ms`` and ``stale``: a value is stale once it has not been confirmed
upstream for ``revalidate_seconds`` or its last refresh failed, and with ``max_stale_seconds`` > 0
a value older than that is refused with ``stale`` instead. Admin answers never carry key data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import structlog
import trio

from knox import protocol as p
from knox.model import VersionStatus
from knoxd.cache.view import CacheView, Change, RemovalReason, Removed, ViewEntry
from knoxd.cache.watch import TooManyWatchesError, Watcher
from knoxd.config import DaemonConfig
from knoxd.fetch import FetchRequester, Refusal
from knoxd.socket_api.peer import Peer, PeerFacts
from knoxd.socket_api.policy import Policy, Unauthorized

__all__ = ["ServerState", "Session", "TokenBucket"]

log = structlog.get_logger("knoxd.socket_api")

_REFUSAL_CODES = {
    Refusal.FORBIDDEN: (p.ErrorCode.FORBIDDEN, "the upstream refused this identity the key"),
    Refusal.NOT_FOUND: (p.ErrorCode.NOT_FOUND, "the key does not exist upstream"),
    Refusal.UNREACHABLE: (p.ErrorCode.UPSTREAM_UNAVAILABLE, "nothing cached; upstream unreachable"),
}
# The op labels of the request counts; a message naming none of these counts as "invalid".
_OPS = frozenset(cls.op for cls in get_args(p.Request))
_REVOKE = {
    RemovalReason.DELETED: p.RevokeReason.DELETED,
    RemovalReason.FORBIDDEN: p.RevokeReason.FORBIDDEN,
}


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(slots=True)
class ServerState:
    """What every connection shares. ``clock`` is Unix time (ages); rate limits use trio's."""

    config: DaemonConfig
    view: CacheView
    fetch: FetchRequester
    policy: Policy
    version: str
    started_at: float
    fetch_rate: float = 20.0
    fetch_burst: float = 100.0
    max_watched_keys: int = 1024
    clock: Callable[[], float] = time.time
    connections: int = 0
    per_uid: dict[int, int] = field(default_factory=dict)
    buckets: dict[int, TokenBucket] = field(default_factory=dict)
    #: Requests answered, by (op, ``"ok"`` or the error code); read by :mod:`knoxd.metrics`.
    answered: dict[tuple[str, str], int] = field(default_factory=dict)

    def age_ms(self, entry: ViewEntry, now: float) -> int:
        return max(0, int((now - entry.fetched_at) * 1000))

    def is_stale(self, entry: ViewEntry, age_ms: int) -> bool:
        return entry.last_error is not None or age_ms > self.config.revalidate_seconds * 1000

    def count(self, op: str, answer: bytes) -> None:
        """Count one answered request of ``op`` (its result read from the answer frame)."""
        # A plain dict: a Counter's += costs twice as much, on every request.
        key = (op, _result(answer))
        self.answered[key] = self.answered.get(key, 0) + 1

    def allow_fetch(self, uid: int) -> bool:
        """Spend one of ``uid``'s fetch-causing request tokens."""
        now = trio.current_time()
        bucket = self.buckets.get(uid)
        if bucket is None:
            bucket = self.buckets[uid] = TokenBucket(self.fetch_rate, self.fetch_burst, now)
        return bucket.take(now)


def _error(request_id: int | None, code: p.ErrorCode, message: str) -> bytes:
    return p.encode_frame(p.error(request_id, code, message))


def _result(frame: bytes) -> str:
    """``"ok"``, or the error code of an error answer (always a 3-entry map, so any other
    frame is an ok answer and is not decoded)."""
    if frame[4] != 0x83:
        return "ok"
    reply = p.decode_body(frame[4:])
    return "ok" if reply["ok"] else str(reply["error"]["code"])


class Session:
    """One connection's protocol state after its hello."""

    def __init__(self, state: ServerState, peer: Peer, *, admin_socket: bool) -> None:
        self.state = state
        self.peer = peer
        self.admin_socket = admin_socket
        self.watcher: Watcher | None = None
        self._set_facts(peer.facts)

    def _set_facts(self, facts: PeerFacts) -> None:
        self.facts = facts
        # What a request naming no identity acts as, resolved once per set of facts.
        self._default_identity = self.state.policy.default_identity(facts)

    # --- connection-level ---------------------------------------------------------------------

    def hello(self, msg: dict[str, Any]) -> bytes:
        """The reply to the first frame. Raises :class:`ProtocolError` if it is not a hello."""
        p.parse_hello(msg)
        f = self.facts
        return p.encode_frame(
            p.hello_reply(
                f"knoxd/{self.state.version}",
                f.uid,
                f.gid,
                f.unit,
                self._default_identity,
            )
        )

    def recheck(self) -> bool:
        """Refresh the peer's facts before answering: False once the connecting process is gone
        (or, with unit selectors in use, its unit can no longer be read)."""
        if not self.peer.alive():
            return False
        if self.state.policy.uses_units and self.peer.pidfd is not None:
            f = self.facts
            unit = self.peer.current_unit()
            if unit is None:
                return False
            if unit != f.unit:
                self._set_facts(PeerFacts(f.uid, f.gid, f.groups, unit))
        return True

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()

    # --- requests -----------------------------------------------------------------------------

    def answer_now(self, msg: dict[str, Any]) -> bytes | p.Request:
        """The response frame for one request message, or the parsed request if answering it
        must wait (pass it to :meth:`answer_later`)."""
        answer = self._answer_now(msg)
        if type(answer) is bytes:
            op = msg.get("op")
            label = op if type(op) is str and op in _OPS else "invalid"
            self.state.count(label, answer)
        return answer

    def _answer_now(self, msg: dict[str, Any]) -> bytes | p.Request:
        if len(msg) == 3 and msg.get("op") == "get":
            try:
                answer = self._plain_get(msg)
            except p.ProtocolError:
                # A key that cannot be encoded: the full path below answers and logs it.
                answer = None
            if answer is not None:
                return answer
        try:
            request = p.parse_request(msg, admin=self.admin_socket)
        except p.BadRequest as exc:
            return _error(exc.request_id, exc.code, exc.message)
        try:
            return self._dispatch(request)
        except Unauthorized as exc:
            return _error(request.id, p.ErrorCode.UNAUTHORIZED, str(exc))
        except p.ProtocolError:
            log.exception("cannot encode answer", op=request.op)
            return _error(request.id, p.ErrorCode.INTERNAL, "the answer could not be encoded")

    async def answer_later(self, request: p.Request) -> bytes:
        """The response frame of a request :meth:`answer_now` could not answer at once."""
        answer = await self._answer_later(request)
        self.state.count(request.op, answer)
        return answer

    async def _answer_later(self, request: p.Request) -> bytes:
        try:
            if isinstance(request, p.Get):
                return await self._get_wait(request)
            if isinstance(request, p.Register):
                return await self._register(request)
            if isinstance(request, p.Unregister):
                return await self._unregister(request)
        except Unauthorized as exc:
            return _error(request.id, p.ErrorCode.UNAUTHORIZED, str(exc))
        except p.ProtocolError:
            log.exception("cannot encode answer", op=request.op)
            return _error(request.id, p.ErrorCode.INTERNAL, "the answer could not be encoded")
        raise AssertionError(f"op {request.op} is answered at once")

    def _identity(self, requested: str | None) -> str:
        if requested is None and self._default_identity is not None:
            return self._default_identity
        return self.state.policy.resolve(self.facts, requested)

    def _dispatch(self, request: p.Request) -> bytes | p.Request:
        if isinstance(request, p.Get):
            return self._get(request)
        if isinstance(request, p.Ping):
            return p.encode_frame(p.ok(request.id))
        if isinstance(request, p.Register | p.Unregister):
            if self.admin_socket:
                self.state.policy.check_admin(self.facts)
            else:
                self._identity(request.identity)
            return request
        if isinstance(request, p.Watch):
            return self._watch(request)
        if isinstance(request, p.Unwatch):
            return self._unwatch(request)
        self.state.policy.check_admin(self.facts)
        if isinstance(request, p.Status):
            return self._status(request)
        if isinstance(request, p.List):
            return self._list(request)
        return self._refresh(request)

    # --- get ----------------------------------------------------------------------------------

    def _plain_get(self, msg: dict[str, Any]) -> bytes | None:
        """The answer to the commonest request, a ``get`` of a cached key naming nothing but
        ``id``, ``op`` and ``key``, without building a :class:`~knox.protocol.Get`; None for
        anything else (the caller parses it). A message answered here parses to
        ``Get(id, key)``: its fields are exactly those, the id is checked as parsing checks it,
        and a key id found in the view is valid (a :class:`CacheEntry` holds only valid ids)."""
        request_id = msg.get("id")
        key_id = msg.get("key")
        identity = self._default_identity
        if (
            type(request_id) is not int
            or not 0 <= request_id <= p.MAX_UINT32
            or type(key_id) is not str
            or identity is None
        ):
            return None
        entry = self.state.view.get(identity, key_id)
        if entry is None:
            return None
        return self._answer(request_id, entry, None)

    def _cached(self, request: p.Get, identity: str) -> bytes | None:
        """The answer from what is known now, or None if the key is simply not fetched yet."""
        state = self.state
        entry = state.view.get(identity, request.key)
        if entry is None:
            refusal = state.fetch.refusal(identity, request.key)
            if refusal is None:
                return None
            code, message = _REFUSAL_CODES[refusal]
            return _error(request.id, code, message)
        return self._answer(request.id, entry, request.version)

    def _answer(self, request_id: int, entry: ViewEntry, version: int | None) -> bytes:
        """The answer to a get of ``entry`` (of one ``version`` if not None)."""
        state = self.state
        age_ms = state.age_ms(entry, state.clock())
        max_stale = state.config.max_stale_seconds
        if max_stale > 0 and age_ms > max_stale * 1000:
            return _error(
                request_id,
                p.ErrorCode.STALE,
                f"the cached value is {age_ms // 1000} s old (limit {max_stale:g} s)",
            )
        if version is not None and not any(
            v.id == version and v.status is not VersionStatus.INACTIVE for v in entry.key.versions
        ):
            return _error(request_id, p.ErrorCode.NOT_FOUND, "that version is not cached")
        return p.encode_get_ok(
            request_id,
            entry.encode(p.encode_cached_key),
            age_ms,
            state.is_stale(entry, age_ms),
        )

    def _get(self, request: p.Get) -> bytes | p.Request:
        identity = self._identity(request.identity)
        answer = self._cached(request, identity)
        if answer is not None:
            return answer
        if request.wait_ms is not None:
            return request
        if self.state.fetch.is_registered(identity, request.key):
            return _error(request.id, p.ErrorCode.NOT_READY, "the first fetch is not done yet")
        return _error(
            request.id,
            p.ErrorCode.NOT_REGISTERED,
            f"key {request.key!r} is not registered for identity {identity!r}",
        )

    async def _get_wait(self, request: p.Get) -> bytes:
        state = self.state
        identity = self._identity(request.identity)
        if not state.fetch.is_registered(identity, request.key):
            if not state.allow_fetch(self.facts.uid):
                return _error(request.id, p.ErrorCode.BUSY, "too many fetch-causing requests")
            await state.fetch.register(identity, [request.key])
        changed = trio.Event()

        def on_change(change: Change) -> None:
            changed.set()

        state.view.subscribe(identity, request.key, on_change)
        try:
            answer = self._cached(request, identity)
            if answer is None:
                with trio.move_on_after((request.wait_ms or 0) / 1000):
                    await changed.wait()
                answer = self._cached(request, identity)
        finally:
            state.view.unsubscribe(identity, request.key, on_change)
        if answer is None:
            return _error(request.id, p.ErrorCode.NOT_READY, "the first fetch is not done yet")
        return answer

    # --- registration -------------------------------------------------------------------------

    async def _register(self, request: p.Register) -> bytes:
        identity = request.identity if self.admin_socket else self._identity(request.identity)
        assert identity is not None
        if not self.state.allow_fetch(self.facts.uid):
            return _error(request.id, p.ErrorCode.BUSY, "too many fetch-causing requests")
        try:
            registered = await self.state.fetch.register(identity, request.keys)
        except KeyError:
            return _error(request.id, p.ErrorCode.BAD_REQUEST, f"no identity {identity[:64]!r}")
        return p.encode_frame(p.ok(request.id, registered=registered))

    async def _unregister(self, request: p.Unregister) -> bytes:
        identity = request.identity if self.admin_socket else self._identity(request.identity)
        assert identity is not None
        try:
            dropped = await self.state.fetch.unregister(identity, request.keys)
        except KeyError:
            return _error(request.id, p.ErrorCode.BAD_REQUEST, f"no identity {identity[:64]!r}")
        return p.encode_frame(p.ok(request.id, unregistered=dropped))

    # --- watch --------------------------------------------------------------------------------

    def _watching(self) -> list[str]:
        if self.watcher is None:
            return []
        return list(dict.fromkeys(key_id for _, key_id in self.watcher.watching))

    def _watch(self, request: p.Watch) -> bytes:
        identity = self._identity(request.identity)
        if self.watcher is None:
            self.watcher = Watcher(self.state.view, max_keys=self.state.max_watched_keys)
        try:
            for key_id in request.keys:
                self.watcher.watch(identity, key_id)
        except TooManyWatchesError as exc:
            return _error(request.id, p.ErrorCode.BAD_REQUEST, str(exc))
        return p.encode_frame(p.ok(request.id, watching=self._watching()))

    def _unwatch(self, request: p.Unwatch) -> bytes:
        identity = self._identity(request.identity)
        if self.watcher is not None:
            for key_id in request.keys:
                self.watcher.unwatch(identity, key_id)
        return p.encode_frame(p.ok(request.id, watching=self._watching()))

    def event_frame(self, change: Change) -> bytes | None:
        """The event frame for a watched key's change (None: nothing to tell the client).
        Raises :class:`Unauthorized` if the peer no longer maps to the watched identity."""
        self.state.policy.resolve(self.facts, change.identity)
        if isinstance(change, Removed):
            reason = _REVOKE.get(change.reason)
            if reason is None:
                return None
            return p.encode_frame(p.revoked_event(change.key_id, reason))
        entry = change.entry
        if self.state.view.get(entry.identity, entry.key_id) is not entry:
            return None
        age_ms = self.state.age_ms(entry, self.state.clock())
        return p.encode_update_event(
            entry.encode(p.encode_cached_key), age_ms, self.state.is_stale(entry, age_ms)
        )

    # --- admin --------------------------------------------------------------------------------

    def _status(self, request: p.Status) -> bytes:
        state = self.state
        now = state.clock()
        entries = state.view.entries()
        ages = [state.age_ms(e, now) for e in entries]
        stale = sum(1 for e, a in zip(entries, ages, strict=True) if state.is_stale(e, a))
        identities = [
            {
                "name": s.name,
                "principal": s.principal,
                "keys": s.keys,
                "last_refresh_at": s.last_refresh_at,
                "last_error": s.last_error,
                "upstream_ok": s.upstream_ok,
            }
            for s in state.fetch.status()
        ]
        return p.encode_frame(
            p.ok(
                request.id,
                version=state.version,
                started_at=state.started_at,
                identities=identities,
                cache={
                    "entries": len(entries),
                    "stale": stale,
                    "oldest_age_ms": max(ages, default=0),
                },
                connections=state.connections,
            )
        )

    def _list(self, request: p.List) -> bytes:
        state = self.state
        now = state.clock()
        listed: list[dict[str, Any]] = []
        for entry in state.view.entries(request.identity):
            age_ms = state.age_ms(entry, now)
            listed.append(
                {
                    "identity": entry.identity,
                    "key_id": entry.key_id,
                    "hash": entry.hash,
                    "versions": _version_list(entry),
                    "fetched_at": entry.fetched_at,
                    "age_ms": age_ms,
                    "stale": state.is_stale(entry, age_ms),
                    "last_error": entry.last_error,
                }
            )
        return p.encode_frame(p.ok(request.id, entries=listed))

    def _refresh(self, request: p.Refresh) -> bytes:
        if not self.state.allow_fetch(self.facts.uid):
            return _error(request.id, p.ErrorCode.BUSY, "too many fetch-causing requests")
        keys: Sequence[str] | None = request.keys
        queued = self.state.fetch.request_refresh(request.identity, keys)
        return p.encode_frame(p.ok(request.id, queued=queued))


def _version_list(entry: ViewEntry) -> list[dict[str, Any]]:
    key = entry.key
    actives = [v for v in key.versions if v.status is VersionStatus.ACTIVE]
    return [{"id": v.id, "status": v.status.value} for v in (key.primary, *actives)]
