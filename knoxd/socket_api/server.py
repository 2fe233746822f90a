"""The socket server: accept loops and the lean per-connection loop (the I/O shell).

Each connection is served on its raw non-blocking socket: wait until readable, read, answer every
complete frame in the buffer, write the answers in one send, then one checkpoint per batch (the
fast path that ``bench/ipc_limits.md`` measured). A watch adds a second task that writes events;
both write through one :class:`_Writer`, which keeps frames whole and in order. Nothing that
happens on one connection (bad input, a bug, a slow reader) touches another.
"""

from __future__ import annotations

import grp
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from knox import protocol as p
from knoxd.cache.view import CacheView
from knoxd.config import Config
from knoxd.fetch import FetchRequester
from knoxd.socket_api.handler import ServerState, Session
from knoxd.socket_api.listener import ListenerError, accept, activated_sockets, bind_unix
from knoxd.socket_api.peer import read_peer
from knoxd.socket_api.policy import Policy, Unauthorized

__all__ = ["SocketContext", "build_state", "open_listeners", "serve_listener", "serve_sockets"]

log = structlog.get_logger("knoxd.socket_api")

_RECV = 65536
_WORKLOAD_MODE = 0o666
_ADMIN_MODE_GROUP = 0o660
_ADMIN_MODE_ROOT = 0o600


@dataclass(slots=True)
class SocketContext:
    """What the daemon root hands the socket side. ``activated``: sockets from systemd by name
    (``"workload"``, ``"admin"``); None reads them from the environment."""

    config: Config
    view: CacheView
    fetch: FetchRequester
    version: str
    started_at: float = field(default_factory=time.time)
    fetch_rate: float = 20.0
    fetch_burst: float = 100.0
    activated: dict[str, socket.socket] | None = None


def _group_ids(names: set[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for name in names:
        try:
            ids[name] = grp.getgrnam(name).gr_gid
        except KeyError:
            log.warning("group not found; its selectors never match", group=name)
    return ids


def build_state(ctx: SocketContext) -> ServerState:
    """The shared server state: the policy built from the config (group names resolved now)."""
    cfg = ctx.config
    names = {g for i in cfg.identities for g in i.peers.group}
    if cfg.daemon.admin_group is not None:
        names.add(cfg.daemon.admin_group)
    ids = _group_ids(names)
    admin_gid = ids.get(cfg.daemon.admin_group) if cfg.daemon.admin_group else None
    policy = Policy(cfg.identities, ids, admin_gid)
    return ServerState(
        cfg.daemon,
        ctx.view,
        ctx.fetch,
        policy,
        ctx.version,
        ctx.started_at,
        fetch_rate=ctx.fetch_rate,
        fetch_burst=ctx.fetch_burst,
    )


class _Writer:
    """Writes whole frames to a non-blocking socket, in call order, from any task."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = trio.StrictFIFOLock()
        self._queued = 0

    def send_now(self, data: bytes) -> bytes:
        """Send what the socket takes without waiting; returns the rest, which must go through
        :meth:`write_rest` before anything else is written. Raises :class:`OSError` if the peer
        went away."""
        if self._queued:
            return data
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            return data
        return data[sent:] if sent < len(data) else b""

    async def write(self, data: bytes) -> None:
        """Raises :class:`OSError` if the peer went away."""
        rest = self.send_now(data)
        if rest:
            await self.write_rest(rest)

    async def write_rest(self, data: bytes) -> None:
        """Write the rest :meth:`send_now` left, after every frame queued before it."""
        # Counted before the lock so that no later frame is sent directly ahead of this rest.
        self._queued += 1
        try:
            async with self._lock:
                view = memoryview(data)
                while view:
                    await trio.lowlevel.wait_writable(self._sock)
                    try:
                        view = view[self._sock.send(view) :]
                    except BlockingIOError:
                        continue
        finally:
            self._queued -= 1


class _Connection:
    """One connection's loop. The idle deadline is pushed forward at most once per eighth of the
    idle timeout (moving a trio deadline costs more than answering a get), always to at least
    the timeout past the latest activity: a connection is closed after between 1 and 1.125
    idle timeouts of silence, never sooner."""

    def __init__(self, state: ServerState, sock: socket.socket, session: Session) -> None:
        self.state = state
        self.sock = sock
        self.session = session
        self.writer = _Writer(sock)
        self.idle = trio.CancelScope()
        self.pumping = False
        self._timeout = state.config.idle_timeout_seconds
        self._slack = self._timeout / 8
        self._rearm_at = -math.inf

    def _touch(self) -> None:
        now = trio.current_time()
        if now >= self._rearm_at:
            self.idle.deadline = now + self._timeout + self._slack
            self._rearm_at = now + self._slack

    async def run(self, nursery: trio.Nursery) -> None:
        with self.idle:
            self._touch()
            await self._serve(nursery)

    async def _serve(self, nursery: trio.Nursery) -> None:
        sock, session, writer = self.sock, self.session, self.writer
        recv, fd = sock.recv, sock.fileno()
        decoder = p.FrameDecoder()
        wait_readable, checkpoint = trio.lowlevel.wait_readable, trio.lowlevel.checkpoint
        greeted = False
        while True:
            # Look before waiting: under load the next request is usually there once the other
            # connections had their turn, and waiting would re-arm the fd in epoll for nothing.
            try:
                data = recv(_RECV)
            except BlockingIOError:
                await wait_readable(fd)
                continue
            out: list[bytes] = []
            try:
                decoder.feed(data)
                if not data:
                    # The stream ended: a partial frame left over is still a protocol error.
                    decoder.next_message()
                    return
                if not session.recheck():
                    out.append(_conn_error(p.ErrorCode.UNAUTHORIZED, "the peer process is gone"))
                    return
                while (msg := decoder.next_message()) is not None:
                    if not greeted:
                        out.append(session.hello(msg))
                        greeted = True
                        continue
                    answer = session.answer_now(msg)
                    if not isinstance(answer, bytes):
                        if out:
                            await writer.write(b"".join(out))
                            out.clear()
                        answer = await session.answer_later(answer)
                    out.append(answer)
                if session.watcher is not None and not self.pumping:
                    self.pumping = True
                    nursery.start_soon(self._pump)
            except p.ProtocolError as exc:
                out.append(_conn_error(exc.code, str(exc)))
                return
            finally:
                if out:
                    rest = writer.send_now(out[0] if len(out) == 1 else b"".join(out))
                    if rest:
                        await writer.write_rest(rest)
            self._touch()
            # The batch's schedule point: no connection can starve the others.
            await checkpoint()

    async def _pump(self) -> None:
        watcher = self.session.watcher
        assert watcher is not None
        while True:
            try:
                change = await watcher.next()
            except trio.ClosedResourceError:
                return
            frame: bytes | None
            if not self.session.recheck():
                frame, end = _conn_error(p.ErrorCode.UNAUTHORIZED, "the peer process is gone"), True
            else:
                try:
                    frame, end = self.session.event_frame(change), False
                except p.ProtocolError:
                    log.exception("cannot encode event")
                    continue
                except Unauthorized as exc:
                    frame, end = _conn_error(p.ErrorCode.UNAUTHORIZED, str(exc)), True
            if frame is not None:
                await self.writer.write(frame)
                self._touch()
            if end:
                self.idle.cancel()
                return


def _conn_error(code: p.ErrorCode, message: str) -> bytes:
    return p.encode_frame(p.error(None, code, message))


def _send_now(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.send(frame)
    except OSError:
        return


async def _handle(state: ServerState, sock: socket.socket, admin: bool) -> None:
    try:
        peer = read_peer(sock)
    except OSError:
        sock.close()
        return
    uid = peer.facts.uid
    cfg = state.config
    if state.connections >= cfg.max_connections or (
        state.per_uid.get(uid, 0) >= cfg.max_connections_per_uid
    ):
        _send_now(sock, _conn_error(p.ErrorCode.BUSY, "too many connections; back off"))
        peer.close()
        sock.close()
        return
    state.connections += 1
    state.per_uid[uid] = state.per_uid.get(uid, 0) + 1
    session = Session(state, peer, admin_socket=admin)
    try:
        async with trio.open_nursery() as nursery:
            await _Connection(state, sock, session).run(nursery)
            nursery.cancel_scope.cancel()
    except* OSError:
        # The peer went away (reset, broken pipe): nothing to answer.
        pass
    except* Exception:
        # A bug: this connection ends, the server and every other connection go on.
        log.exception("connection failed", uid=uid, admin=admin)
    finally:
        session.close()
        peer.close()
        sock.close()
        state.connections -= 1
        left = state.per_uid[uid] - 1
        if left:
            state.per_uid[uid] = left
        else:
            del state.per_uid[uid]
            state.buckets.pop(uid, None)


async def serve_listener(
    state: ServerState,
    listener: socket.socket,
    *,
    admin: bool,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept and serve connections on a non-blocking listening socket until cancelled. The
    listener stays the caller's to close."""
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            sock, _ = await accept(listener)
            sock.setblocking(False)
            nursery.start_soon(_handle, state, sock, admin)


def _ensure_dir(path: Path, mode: int, gid: int) -> None:
    if not path.exists():
        path.mkdir(parents=True, mode=mode)
        os.chown(path, -1, gid)
        os.chmod(path, mode)


def open_listeners(ctx: SocketContext, state: ServerState) -> dict[str, socket.socket]:
    """The workload and admin listening sockets: systemd's if it passed them, else bound at the
    configured paths. Raises :class:`ListenerError`."""
    activated = activated_sockets() if ctx.activated is None else dict(ctx.activated)
    daemon = ctx.config.daemon
    admin_gid = -1
    if daemon.admin_group is not None:
        try:
            admin_gid = grp.getgrnam(daemon.admin_group).gr_gid
        except KeyError:
            raise ListenerError(f"admin_group {daemon.admin_group!r} does not exist") from None
    result: dict[str, socket.socket] = {}
    try:
        for name, path, mode, gid, dir_mode in (
            ("workload", daemon.workload_socket, _WORKLOAD_MODE, -1, 0o755),
            (
                "admin",
                daemon.admin_socket,
                _ADMIN_MODE_GROUP if admin_gid != -1 else _ADMIN_MODE_ROOT,
                admin_gid,
                0o770 if admin_gid != -1 else 0o700,
            ),
        ):
            given = activated.pop(name, None)
            if given is not None:
                result[name] = given
                continue
            _ensure_dir(path.parent, dir_mode, gid)
            result[name] = bind_unix(path, mode=mode, gid=gid)
    except BaseException:
        for sock in (*result.values(), *activated.values()):
            sock.close()
        raise
    for extra in activated.values():
        extra.close()
    return result


async def serve_sockets(
    ctx: SocketContext, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the workload and admin sockets until cancelled. ``task_status.started()`` is called
    (with the :class:`ServerState`) once both accept connections. Raises :class:`ListenerError`
    before that if a socket cannot be set up."""
    state = build_state(ctx)
    listeners = open_listeners(ctx, state)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda **kw: serve_listener(state, listeners["workload"], admin=False, **kw)
            )
            await nursery.start(
                lambda **kw: serve_listener(state, listeners["admin"], admin=True, **kw)
            )
            task_status.started(state)
    finally:
        for sock in listeners.values():
            sock.close()
