"""systemd's ``LoadCredential=`` over a Unix socket: a Knox key for a unit at start, with no code.

A unit with ``LoadCredential=db_password:/run/knoxd/credentials.sock`` makes systemd, while it
starts the unit, connect to that socket once, shut down its sending side and read the credential
until EOF. Before connecting, systemd binds its end to the abstract address
``\\0<random hex>/unit/<unit>/<credential name>``, so the server learns the unit and the credential
from the peer's address (systemd ``src/core/exec-credential.c``, ``load_credential``). knoxd answers
with the primary data of the key that a ``[[credential]]`` table assigns to that unit and name, as
the table's identity holds it, and closes.

Trust: anyone can bind an abstract address that claims any unit, so the claim counts only when the
kernel confirms it: the peer connected as uid 0 (``SO_PEERCRED``), and its cgroup, read through a
pidfd while the process is still alive, is the claimed unit's. That is where systemd connects from:
the process it forks to start the unit (already in the unit's cgroup, still root; systemd >= 254
forks once more, ``(sd-mkdcreds)``), never PID 1 itself. Without ``SO_PEERPIDFD`` (Linux < 6.5)
or cgroup v2, no claim is believed. A socket knoxd binds is also root-only (0600).

Answers: the protocol has no error channel, so a refused request is closed without data (the unit
sees an empty credential) and the reason is logged. A key not fetched yet is registered if needed
and waited for, within a bound, since systemd holds the unit's start until the answer. Key data is
never logged.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from knox.model import InvalidKeyError
from knoxd.cache.view import CacheView, Change, Removed, ViewEntry
from knoxd.config import Config, CredentialConfig
from knoxd.fetch import FetchRequester, Refusal
from knoxd.socket_api.listener import ListenerError, accept, bind_unix
from knoxd.socket_api.peer import PeerFacts, read_peer

__all__ = [
    "DEFAULT_WAIT_SECONDS",
    "CredentialPolicy",
    "CredentialRequest",
    "Refused",
    "parse_peer_address",
    "serve_credentials",
]

DEFAULT_WAIT_SECONDS = 10.0
SEND_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 64
_SOCKET_MODE = 0o600
_DIR_MODE = 0o755

log = structlog.get_logger("knoxd.credentials")


# --- the pure part ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CredentialRequest:
    """What a peer's address claims: the unit being started and the credential it asks for."""

    unit: str
    name: str


class Refused(Exception):
    """A request that gets no data. The message says why (for the log) and holds no secret."""


def parse_peer_address(address: object) -> CredentialRequest | None:
    """The unit and credential name of systemd's ``\\0RANDOM/unit/UNIT/NAME`` address (as
    ``accept``/``getpeername`` return it: ``bytes`` for an abstract address), or None for any
    other address. Every part must be non-empty printable ASCII."""
    if not isinstance(address, bytes) or not address.startswith(b"\0"):
        return None
    try:
        text = address[1:].decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = text.split("/")
    if len(parts) != 4 or parts[1] != "unit" or not all(p and p.isprintable() for p in parts):
        return None
    return CredentialRequest(unit=parts[2], name=parts[3])


def _describe_address(address: object) -> str:
    """A loggable form of any peer address (bounded: a Unix address is at most 108 bytes)."""
    return repr(address)[:160]


class CredentialPolicy:
    """Who gets what, from the ``[[credential]]`` tables."""

    def __init__(self, credentials: Sequence[CredentialConfig]) -> None:
        self._grants = {(c.unit, c.name): c for c in credentials}

    def __len__(self) -> int:
        return len(self._grants)

    def decide(self, request: CredentialRequest | None, facts: PeerFacts) -> CredentialConfig:
        """The grant for a peer whose address made ``request`` (None: not systemd's form).

        Raises :class:`Refused` unless the peer is root, the kernel places it in the claimed unit,
        and a ``[[credential]]`` gives that unit that credential.
        """
        if request is None:
            raise Refused("the peer's address is not systemd's \\0RANDOM/unit/UNIT/NAME")
        if facts.uid != 0:
            raise Refused(f"peer uid {facts.uid} is not root; only systemd may claim a unit")
        if facts.unit is None:
            raise Refused("the kernel did not tell the peer's unit (needs a pidfd and cgroup v2)")
        if facts.unit != request.unit:
            raise Refused(f"the peer runs in {facts.unit!r}, not in the unit it claims")
        grant = self._grants.get((request.unit, request.name))
        if grant is None:
            raise Refused("no [[credential]] gives this unit this credential")
        return grant


# --- the I/O shell ------------------------------------------------------------------------------


@dataclass(slots=True)
class _State:
    policy: CredentialPolicy
    view: CacheView
    fetch: FetchRequester
    max_stale_seconds: float
    wait_seconds: float
    active: int = 0


async def serve_credentials(
    config: Config,
    view: CacheView,
    fetch: FetchRequester,
    *,
    listener: socket.socket | None = None,
    wait_seconds: float = DEFAULT_WAIT_SECONDS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``LoadCredential=`` connections until cancelled.

    ``listener`` is a listening socket systemd passed (it stays the caller's to close); without
    one, a socket is bound at ``config.daemon.credentials_socket`` with mode 0600 (its directory
    created 0755 if missing) and closed on return. With neither there is nothing to serve:
    ``task_status.started()`` is called and this returns at once. ``wait_seconds`` bounds the
    wait for a key's first fetch. Raises :class:`ListenerError` before ``started`` if the socket
    cannot be set up.
    """
    path = config.daemon.credentials_socket
    if listener is None and path is None:
        task_status.started()
        return
    owned: socket.socket | None = None
    if listener is None:
        assert path is not None
        try:
            path.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise ListenerError(f"cannot create {path.parent}: {exc.strerror or exc}") from None
        listener = owned = bind_unix(path, mode=_SOCKET_MODE)
    listener.setblocking(False)
    state = _State(
        CredentialPolicy(config.credentials),
        view,
        fetch,
        config.daemon.max_stale_seconds,
        wait_seconds,
    )
    try:
        log.info("serving systemd credentials", socket=str(path), credentials=len(state.policy))
        async with trio.open_nursery() as nursery:
            task_status.started()
            await _accept_loop(state, listener, nursery)
    finally:
        if owned is not None:
            owned.close()


async def _accept_loop(state: _State, listener: socket.socket, nursery: trio.Nursery) -> None:
    while True:
        sock, address = await accept(listener)
        if state.active >= MAX_CONNECTIONS:
            log.warning("credential request refused: too many at once", limit=MAX_CONNECTIONS)
            sock.close()
            continue
        sock.setblocking(False)
        state.active += 1
        nursery.start_soon(_serve_one, state, sock, address)


async def _serve_one(state: _State, sock: socket.socket, address: Any) -> None:
    request = parse_peer_address(address)
    where: dict[str, object] = (
        {"unit": request.unit, "credential": request.name}
        if request is not None
        else {"address": _describe_address(address)}
    )
    try:
        try:
            peer = read_peer(sock)
        except OSError as exc:
            log.warning("credential request without peer credentials", error=str(exc), **where)
            return
        try:
            where["pid"] = peer.pid
            grant = state.policy.decide(request, peer.facts)
            where.update(identity=grant.identity, key_id=grant.key)
            with trio.move_on_after(state.wait_seconds) as waiting:
                entry = await _entry(state, grant)
            if waiting.cancelled_caught:
                raise Refused(f"the key was not fetched within {state.wait_seconds:g} s")
            data = _primary(state, entry)
            with trio.move_on_after(SEND_TIMEOUT_SECONDS) as sending:
                await _send_all(sock, data)
            if sending.cancelled_caught:
                log.warning("credential not delivered: the peer did not read it", **where)
                return
            log.info("credential served", **where)
        except Refused as exc:
            log.warning("credential request refused", reason=str(exc), uid=peer.facts.uid, **where)
        except OSError as exc:
            log.warning("credential not delivered", error=exc.strerror or str(exc), **where)
        finally:
            peer.close()
    finally:
        sock.close()
        state.active -= 1


async def _entry(state: _State, grant: CredentialConfig) -> ViewEntry:
    """The view's entry for the grant's key, waiting for its first fetch if it has none (the
    caller bounds the wait). Raises :class:`Refused` if the upstream refuses the key."""
    identity, key_id = grant.identity, grant.key
    entry = state.view.get(identity, key_id)
    if entry is not None:
        return entry
    _check_refusal(state.fetch.refusal(identity, key_id), identity)
    changed = trio.Event()
    removed: list[Removed] = []

    def on_change(change: Change) -> None:
        if isinstance(change, Removed):
            removed.append(change)
        changed.set()

    state.view.subscribe(identity, key_id, on_change)
    try:
        if not state.fetch.is_registered(identity, key_id):
            await state.fetch.register(identity, [key_id])
        while True:
            entry = state.view.get(identity, key_id)
            if entry is not None:
                return entry
            if removed:
                raise Refused(
                    f"the key left the cache for identity {identity!r} ({removed[-1].reason.value})"
                )
            await changed.wait()
            changed = trio.Event()
    finally:
        state.view.unsubscribe(identity, key_id, on_change)


def _check_refusal(refusal: Refusal | None, identity: str) -> None:
    # UNREACHABLE is transient: the wait goes on.
    if refusal is Refusal.FORBIDDEN or refusal is Refusal.NOT_FOUND:
        raise Refused(f"the server refuses the key to identity {identity!r} ({refusal.value})")


def _primary(state: _State, entry: ViewEntry) -> bytes:
    age = time.time() - entry.fetched_at
    limit = state.max_stale_seconds
    if limit > 0 and age > limit:
        raise Refused(f"the cached value is {age:.0f} s old (limit {limit:g} s)")
    try:
        return entry.key.primary.data
    except InvalidKeyError:
        raise Refused("the cached key has no primary version") from None


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
