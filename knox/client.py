"""Application client for the knoxd socket (protocol v1, see :mod:`knox.protocol`).

Two shells share one pure core:

* :class:`ClientProtocol` -- the state of one connection (hello, request ids, response order,
  events), bytes in and bytes out, no I/O;
* :class:`KeyCache` -- the in-process copy of keys a watch stream keeps current;
* :class:`Client` (blocking, thread-safe) and :class:`AsyncClient` (trio) -- sockets, timeouts,
  reconnects.

The socket path comes from the ``socket_path`` argument, else ``$KNOXD_SOCKET``, else
:data:`DEFAULT_SOCKET`. Every wait is bounded by the client's ``timeout``. Every failure is a
:class:`DaemonError`: one subclass per protocol error code, plus :class:`DaemonUnavailable` (no
connection) and :class:`DaemonTimeout`. No message or ``repr`` holds secret data.

With ``cache=True`` (the default) a key read once is watched on a dedicated connection, and later
reads of it are answered from memory; an ``update`` event replaces the copy, a ``revoked`` event or
a lost watch connection drops it, so a read never returns a value the daemon no longer holds.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import select
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, NoReturn

import trio

from knox.model import Key
from knox.protocol import (
    MAX_UINT32,
    ErrorCode,
    ErrorReply,
    Event,
    FrameDecoder,
    Get,
    HelloReply,
    List,
    Ok,
    Ping,
    ProtocolError,
    Refresh,
    Register,
    Request,
    RevokedEvent,
    Status,
    Unregister,
    UpdateEvent,
    Watch,
    client_hello,
    encode_frame,
    get_result,
    keys_result,
    parse_hello_reply,
    parse_response,
    request_obj,
)

__all__ = [
    "DEFAULT_SOCKET",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncWatchStream",
    "BadRequestError",
    "BusyError",
    "Client",
    "ClientProtocol",
    "DaemonError",
    "DaemonInternalError",
    "DaemonTimeout",
    "DaemonUnavailable",
    "ForbiddenError",
    "KeyCache",
    "NotFoundError",
    "NotReadyError",
    "NotRegisteredError",
    "ProtocolViolation",
    "StaleError",
    "UnauthorizedError",
    "UpstreamUnavailableError",
    "WatchStream",
    "error_for_reply",
    "socket_path_from",
]

DEFAULT_SOCKET: Final = "/run/knoxd/knoxd.sock"
DEFAULT_TIMEOUT: Final = 5.0
_RECV_SIZE: Final = 65_536
_BACKOFF_FIRST: Final = 0.02
_BACKOFF_MAX: Final = 1.0


# --- errors -------------------------------------------------------------------------------------


class DaemonError(Exception):
    """A request knoxd refused, or a failure to talk to knoxd.

    ``code`` is the protocol error code (``None`` for :class:`DaemonUnavailable` and
    :class:`DaemonTimeout`); ``retry`` says whether the same request may succeed later.
    """

    code: ErrorCode | None = None
    retry: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DaemonUnavailable(DaemonError):
    """knoxd could not be reached, or closed the connection (not running, wrong path, refused)."""

    retry = True


class DaemonTimeout(DaemonError):
    """knoxd did not answer within the client's timeout."""

    retry = True


class ProtocolViolation(DaemonError):
    """The connection broke the protocol (either side) or knoxd speaks another version."""

    code = ErrorCode.PROTOCOL


class BadRequestError(DaemonError):
    code = ErrorCode.BAD_REQUEST


class UnauthorizedError(DaemonError):
    code = ErrorCode.UNAUTHORIZED


class ForbiddenError(DaemonError):
    code = ErrorCode.FORBIDDEN


class NotFoundError(DaemonError):
    code = ErrorCode.NOT_FOUND


class NotRegisteredError(DaemonError):
    code = ErrorCode.NOT_REGISTERED


class NotReadyError(DaemonError):
    code = ErrorCode.NOT_READY
    retry = True


class StaleError(DaemonError):
    code = ErrorCode.STALE
    retry = True


class UpstreamUnavailableError(DaemonError):
    code = ErrorCode.UPSTREAM_UNAVAILABLE
    retry = True


class BusyError(DaemonError):
    code = ErrorCode.BUSY
    retry = True


class DaemonInternalError(DaemonError):
    code = ErrorCode.INTERNAL
    retry = True


_BY_CODE: dict[ErrorCode, type[DaemonError]] = {
    ErrorCode.PROTOCOL: ProtocolViolation,
    ErrorCode.VERSION: ProtocolViolation,
    ErrorCode.BAD_REQUEST: BadRequestError,
    ErrorCode.UNAUTHORIZED: UnauthorizedError,
    ErrorCode.FORBIDDEN: ForbiddenError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.NOT_REGISTERED: NotRegisteredError,
    ErrorCode.NOT_READY: NotReadyError,
    ErrorCode.STALE: StaleError,
    ErrorCode.UPSTREAM_UNAVAILABLE: UpstreamUnavailableError,
    ErrorCode.BUSY: BusyError,
    ErrorCode.INTERNAL: DaemonInternalError,
}


def error_for_reply(reply: ErrorReply) -> DaemonError:
    """The exception for an error frame; ``code`` is the frame's (``version`` stays ``version``)."""
    exc = _BY_CODE[reply.code](f"knoxd: {reply.message} ({reply.code.value})")
    exc.code = reply.code
    exc.retry = reply.retry
    return exc


def _violation(exc: ProtocolError) -> ProtocolViolation:
    err = ProtocolViolation(f"knoxd: {exc}")
    err.code = exc.code
    return err


def socket_path_from(
    socket_path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> str:
    """The socket to use: the argument, else ``$KNOXD_SOCKET`` (if not empty), else the default."""
    if socket_path is not None:
        return os.fspath(socket_path)
    environ = os.environ if env is None else env
    return environ.get("KNOXD_SOCKET") or DEFAULT_SOCKET


# --- the pure core ------------------------------------------------------------------------------

Incoming = HelloReply | Ok | ErrorReply | UpdateEvent | RevokedEvent


class ClientProtocol:
    """One client connection's protocol state, sans I/O.

    Send :meth:`hello` first; turn requests into bytes with :meth:`send`; :meth:`receive_data`
    what the socket gives (``b""`` at end of stream) and drain :meth:`next_incoming`. Guarantees:
    ids are unique among requests in flight; a response whose id is not the oldest one in flight
    is a :class:`ProtocolViolation` (responses come in request order). Raises only
    :class:`ProtocolViolation`.
    """

    __slots__ = ("_decoder", "_hello", "_in_flight", "_next_id")

    def __init__(self) -> None:
        self._decoder = FrameDecoder()
        self._next_id = 1
        self._in_flight: collections.deque[int] = collections.deque()
        self._hello: HelloReply | None = None

    @property
    def hello_reply(self) -> HelloReply | None:
        """knoxd's hello, once received."""
        return self._hello

    def hello(self) -> bytes:
        """The first frame to send."""
        return encode_frame(client_hello())

    def new_id(self) -> int:
        """A request id for the next :meth:`send`."""
        request_id = self._next_id
        self._next_id = request_id + 1 if request_id < MAX_UINT32 else 1
        return request_id

    def send(self, request: Request) -> bytes:
        """The frame for ``request`` (whose id came from :meth:`new_id`)."""
        try:
            frame = encode_frame(request_obj(request))
        except ProtocolError as exc:
            raise _violation(exc) from None
        self._in_flight.append(request.id)
        return frame

    def receive_data(self, data: bytes) -> None:
        """Bytes from the socket; ``b""`` means knoxd closed it."""
        try:
            self._decoder.feed(data)
        except ProtocolError as exc:
            raise _violation(exc) from None

    def next_incoming(self) -> Incoming | None:
        """The next message from knoxd, typed, or ``None`` if more bytes are needed."""
        try:
            msg = self._decoder.next_message()
            if msg is None:
                return None
            if self._hello is None:
                reply = parse_hello_reply(msg)
                if isinstance(reply, HelloReply):
                    self._hello = reply
                return reply
            item = parse_response(msg)
        except ProtocolError as exc:
            raise _violation(exc) from None
        if isinstance(item, (Ok, ErrorReply)) and item.id is not None:
            if not self._in_flight or self._in_flight[0] != item.id:
                raise ProtocolViolation(f"knoxd answered request {item.id} out of order")
            self._in_flight.popleft()
        return item


def check_hello(item: Incoming) -> HelloReply:
    """The hello reply, or the error knoxd sent instead of it, raised."""
    if isinstance(item, HelloReply):
        return item
    if isinstance(item, ErrorReply):
        raise error_for_reply(item)
    raise ProtocolViolation("knoxd did not answer the hello")


def _ok_or_raise(item: Ok | ErrorReply) -> Ok:
    if isinstance(item, ErrorReply):
        raise error_for_reply(item)
    return item


def _get_key(item: Ok | ErrorReply) -> Key:
    try:
        return get_result(_ok_or_raise(item)).key
    except ProtocolError as exc:
        raise _violation(exc) from None


def _keys(item: Ok | ErrorReply, name: str) -> list[str]:
    try:
        return list(keys_result(_ok_or_raise(item), name))
    except ProtocolError as exc:
        raise _violation(exc) from None


def _result(item: Ok | ErrorReply, name: str, kind: type[Any]) -> Any:
    value = _ok_or_raise(item).results.get(name)
    if not isinstance(value, kind):
        raise ProtocolViolation(f"knoxd's {name!r} must be a {kind.__name__}")
    return value


class KeyCache:
    """The in-process copy of watched keys (pure; the shells lock around writes).

    Reads are single dictionary lookups, safe without a lock in CPython. ``live`` says whether a
    watch stream is currently keeping the copy current; while it is not, nothing is stored.
    """

    __slots__ = ("epoch", "keys", "live", "primary", "watched")

    def __init__(self) -> None:
        self.keys: dict[str, Key] = {}
        self.primary: dict[str, bytes] = {}
        self.watched: dict[str, None] = {}
        self.live = False
        #: Counts events and losses, so an answer that raced one is not stored over it.
        self.epoch = 0

    def _store(self, key: Key) -> None:
        self.keys[key.id] = key
        self.primary[key.id] = key.primary.data

    def store_answer(self, key: Key, epoch: int) -> None:
        """Keep a ``get`` answer read when :attr:`epoch` was ``epoch``, if a watch stream is live
        and nothing arrived since (else the answer may already be older than the copy)."""
        if self.live and epoch == self.epoch:
            self._store(key)

    def apply(self, event: Event) -> None:
        """An event from the watch stream: replace the copy, or drop a revoked key."""
        self.epoch += 1
        if isinstance(event, UpdateEvent):
            if self.live and event.key.id in self.watched:
                self._store(event.key)
        else:
            self.drop(event.key_id)

    def drop(self, key_id: str) -> None:
        self.keys.pop(key_id, None)
        self.primary.pop(key_id, None)

    def lost(self) -> None:
        """The watch stream ended: nothing cached can be trusted any more."""
        self.live = False
        self.epoch += 1
        self.keys.clear()
        self.primary.clear()


def _backoff(attempt: int) -> float:
    return float(min(_BACKOFF_MAX, _BACKOFF_FIRST * (2**attempt)))


# --- blocking shell -----------------------------------------------------------------------------


class _SyncConnection:
    """A connected, greeted socket and its protocol state (one sender and one receiver at a
    time, which may be different threads).

    After connecting, the socket is non-blocking and every wait is a ``poll`` bounded by the
    deadline: a request costs a send, a poll and a recv, where a socket timeout would add a
    ``settimeout`` and a poll before each send and each recv.
    """

    def __init__(self, path: str, deadline: float) -> None:
        self.protocol = ClientProtocol()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(_remaining(deadline))
            self.sock.connect(path)
            self.sock.setblocking(False)
            # One poll object per direction: a sender and a receiver may wait at the same time.
            self._readable = select.poll()
            self._readable.register(self.sock, select.POLLIN)
            self._writable = select.poll()
            self._writable.register(self.sock, select.POLLOUT)
            self.send(self.protocol.hello(), deadline)
            self.hello = check_hello(self.receive(deadline))
        except BaseException:
            self.sock.close()
            raise

    def send(self, data: bytes, deadline: float) -> None:
        """Send all of ``data``. Raises :class:`TimeoutError` past ``deadline``, :class:`OSError`
        if the connection broke."""
        view = memoryview(data)
        while True:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                sent = 0
            if sent == len(view):
                return
            view = view[sent:]
            _wait(self._writable, deadline)

    def receive(self, deadline: float | None) -> Incoming:
        """The next message; ``deadline`` ``None`` waits until the socket is shut down."""
        while True:
            item = self.protocol.next_incoming()
            if item is not None:
                return item
            _wait(self._readable, deadline)
            try:
                data = self.sock.recv(_RECV_SIZE)
            except BlockingIOError:
                continue
            if not data:
                raise DaemonUnavailable("knoxd closed the connection")
            self.protocol.receive_data(data)

    def call(self, request: Request, deadline: float) -> Ok | ErrorReply:
        self.send(self.protocol.send(request), deadline)
        while True:
            item = self.receive(deadline)
            if isinstance(item, ErrorReply) and item.id is None:
                raise error_for_reply(item)
            if isinstance(item, (Ok, ErrorReply)):
                return item

    def close(self) -> None:
        self.sock.close()


def _remaining(deadline: float) -> float:
    """Seconds left until ``deadline``. Raises :class:`TimeoutError` if none are."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    return remaining


def _wait(poller: select.poll, deadline: float | None) -> None:
    """Until ``poller``'s socket is ready (or in error, which the next call on it reports).
    Raises :class:`TimeoutError` past ``deadline`` (``None``: wait as long as it takes)."""
    timeout_ms = None if deadline is None else math.ceil(_remaining(deadline) * 1000)
    if not poller.poll(timeout_ms):
        raise TimeoutError


def _connect_sync(path: str, deadline: float, retry_until: float) -> _SyncConnection:
    """Connect, retrying refused or missing sockets with bounded backoff until ``retry_until``."""
    attempt = 0
    while True:
        try:
            return _SyncConnection(path, deadline)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            pause = _backoff(attempt)
            if time.monotonic() + pause >= min(retry_until, deadline):
                raise _unavailable(path, exc) from None
            time.sleep(pause)
            attempt += 1
        except PermissionError:
            raise DaemonUnavailable(f"permission denied connecting to {path}") from None
        except TimeoutError:
            raise DaemonTimeout(f"knoxd at {path} did not answer in time") from None
        except OSError as exc:
            raise _unavailable(path, exc) from None


def _unavailable(path: str, exc: OSError) -> DaemonUnavailable:
    if isinstance(exc, FileNotFoundError):
        return DaemonUnavailable(f"no knoxd socket at {path} (is knoxd running?)")
    if isinstance(exc, ConnectionRefusedError):
        return DaemonUnavailable(f"knoxd is not accepting connections at {path}")
    return DaemonUnavailable(f"cannot reach knoxd at {path}: {exc.strerror or type(exc).__name__}")


class WatchStream:
    """Events for some keys, from a dedicated connection: iterate, and :meth:`close` (or use it
    as a context manager). After a lost connection it reconnects and re-watches; knoxd then
    sends every key's current state, so no change is missed for long.

    Iteration raises :class:`DaemonTimeout` if no event arrives within ``idle_timeout`` (``None``:
    wait forever), the :class:`DaemonError` of a refused watch, and :class:`DaemonUnavailable`
    if knoxd stays unreachable past the client's reconnect window.
    """

    def __init__(
        self,
        path: str,
        keys: Sequence[str],
        timeout: float,
        reconnect_window: float,
        idle_timeout: float | None,
        identity: str | None,
    ) -> None:
        self._path = path
        self._keys = tuple(keys)
        self._timeout = timeout
        self._window = reconnect_window
        self._idle = idle_timeout
        self._identity = identity
        self._conn: _SyncConnection | None = None
        self._closed = False
        self._open()

    def _open(self) -> None:
        now = time.monotonic()
        conn = _connect_sync(self._path, now + self._timeout, now + self._window)
        try:
            request = Watch(conn.protocol.new_id(), self._keys, self._identity)
            _keys(conn.call(request, time.monotonic() + self._timeout), "watching")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        while not self._closed:
            if self._conn is None:
                self._open()
                continue
            deadline = None if self._idle is None else time.monotonic() + self._idle
            try:
                item = self._conn.receive(deadline)
            except TimeoutError:
                raise DaemonTimeout("no watch event within the idle timeout") from None
            except (DaemonUnavailable, OSError):
                self._conn.close()
                self._conn = None
                continue
            if isinstance(item, (UpdateEvent, RevokedEvent)):
                return item
            if isinstance(item, ErrorReply):
                self.close()
                raise error_for_reply(item)
        raise StopIteration

    def close(self) -> None:
        """End the stream and close its connection (idempotent)."""
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Client:
    """A blocking knoxd client: one persistent connection shared by all threads (requests are
    serialized under a lock), reconnected on demand.

    ``timeout`` bounds every call (connecting included); a refused or missing socket is retried
    with bounded backoff for up to ``reconnect_window`` seconds (capped by ``timeout``).
    ``identity`` is sent with every key op (``None``: knoxd's first match for this process).
    With ``cache=True``, keys read are watched on a second connection by a daemon thread and
    served from memory (see the module docstring). Call :meth:`close` (or use ``with``).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        reconnect_window: float = 2.0,
        cache: bool = True,
        identity: str | None = None,
    ) -> None:
        self.socket_path = socket_path_from(socket_path)
        self.timeout = timeout
        self.reconnect_window = reconnect_window
        self.identity = identity
        self._lock = threading.Lock()
        self._conn: _SyncConnection | None = None
        self._closed = False
        self._cache = KeyCache() if cache else None
        self._cache_lock = threading.Lock()
        self._watch_conn: _SyncConnection | None = None
        self._watch_send_lock = threading.Lock()
        self._watch_pending: dict[int, tuple[str, ...]] = {}
        self._watch_thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- requests

    def _call(self, make: Any) -> Ok | ErrorReply:
        """Send the request ``make(id)`` builds and return knoxd's answer. A broken reused
        connection is replaced once; every op is idempotent, so resending is safe."""
        if self._closed:
            raise DaemonUnavailable("the client is closed")
        deadline = time.monotonic() + self.timeout
        with self._lock:
            for attempt in (0, 1):
                fresh = self._conn is None
                if self._conn is None:
                    self._conn = _connect_sync(
                        self.socket_path, deadline, time.monotonic() + self.reconnect_window
                    )
                conn = self._conn
                try:
                    return conn.call(make(conn.protocol.new_id()), deadline)
                except TimeoutError:
                    self._discard()
                    raise DaemonTimeout("knoxd did not answer in time") from None
                except (DaemonUnavailable, OSError) as exc:
                    self._discard()
                    if fresh or attempt:
                        if isinstance(exc, DaemonUnavailable):
                            raise
                        raise _unavailable(self.socket_path, exc) from None
                except DaemonError:
                    self._discard()
                    raise
            raise AssertionError("unreachable")

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def hello(self) -> HelloReply:
        """knoxd's hello on the current connection (connecting if needed)."""
        self.ping()
        with self._lock:
            assert self._conn is not None
            return self._conn.hello

    def ping(self) -> None:
        """Check that knoxd answers."""
        _ok_or_raise(self._call(lambda i: Ping(i, self.identity)))

    def get(self, key: str, *, version: int | None = None, wait_ms: int | None = None) -> Key:
        """The key as knoxd caches it (Primary first, then Actives; empty ACL). With
        ``version``, only if that version is cached; with ``wait_ms``, register the key if it is
        not yet and wait that long for its first fetch. Never served from the in-process cache
        unless neither is given."""
        if version is None and wait_ms is None and self._cache is not None:
            cached = self._cache.keys.get(key)
            if cached is not None:
                return cached
        epoch = self._cache.epoch if self._cache is not None else 0
        result = _get_key(self._call(lambda i: Get(i, key, version, wait_ms, self.identity)))
        if version is None and self._cache is not None:
            self._remember(result, epoch)
        return result

    def get_primary(self, key: str) -> bytes:
        """The Primary version's data (from memory if the key is watched)."""
        if self._cache is not None:
            data = self._cache.primary.get(key)
            if data is not None:
                return data
        return self.get(key).primary.data

    def get_active(self, key: str) -> list[bytes]:
        """The data of the Primary and every Active version, Primary first."""
        return [v.data for v in self.get(key).versions]

    def register(self, keys: Sequence[str], *, identity: str | None = None) -> list[str]:
        """Ask knoxd to keep ``keys`` fresh; returns the keys registered."""
        who = identity or self.identity
        return _keys(self._call(lambda i: Register(i, tuple(keys), who)), "registered")

    def unregister(self, keys: Sequence[str], *, identity: str | None = None) -> list[str]:
        """Stop keeping ``keys`` fresh; returns the keys that were registered."""
        who = identity or self.identity
        return _keys(self._call(lambda i: Unregister(i, tuple(keys), who)), "unregistered")

    def status(self) -> dict[str, Any]:
        """Admin socket: the daemon's status results."""
        results: dict[str, Any] = _ok_or_raise(self._call(Status)).results
        return results

    def list_entries(self, identity: str | None = None) -> list[dict[str, Any]]:
        """Admin socket: the cache entries (never data)."""
        entries: list[dict[str, Any]] = _result(
            self._call(lambda i: List(i, identity)), "entries", list
        )
        return entries

    def refresh(self, keys: Sequence[str] | None = None, identity: str | None = None) -> int:
        """Admin socket: queue a refetch; returns how many keys were queued."""
        chosen = None if keys is None else tuple(keys)
        queued: int = _result(self._call(lambda i: Refresh(i, chosen, identity)), "queued", int)
        return queued

    def watch(self, keys: Sequence[str], *, idle_timeout: float | None = None) -> WatchStream:
        """A stream of ``update``/``revoked`` events for ``keys`` on its own connection."""
        return WatchStream(
            self.socket_path,
            keys,
            self.timeout,
            self.reconnect_window,
            idle_timeout,
            self.identity,
        )

    # -- the cache's watch thread

    def _remember(self, key: Key, epoch: int) -> None:
        cache = self._cache
        assert cache is not None
        with self._cache_lock:
            cache.store_answer(key, epoch)
            new = key.id not in cache.watched
            cache.watched[key.id] = None
        if self._watch_thread is None:
            with self._lock:
                if self._watch_thread is None and not self._closed:
                    self._watch_thread = threading.Thread(
                        target=self._watch_loop, name="knox-client-watch", daemon=True
                    )
                    self._watch_thread.start()
        elif new:
            self._send_watch((key.id,))

    def _send_watch(self, keys: tuple[str, ...]) -> None:
        with self._watch_send_lock:
            conn = self._watch_conn
            if conn is None:
                return  # the watch loop sends every watched key when it connects
            request_id = conn.protocol.new_id()
            try:
                conn.send(
                    conn.protocol.send(Watch(request_id, keys, self.identity)),
                    time.monotonic() + self.timeout,
                )
                self._watch_pending[request_id] = keys
            except (OSError, DaemonError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def _watch_loop(self) -> None:
        cache = self._cache
        assert cache is not None
        attempt = 0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                conn = _connect_sync(self.socket_path, now + self.timeout, now + self.timeout)
            except DaemonError:
                self._stop.wait(_backoff(attempt))
                attempt += 1
                continue
            attempt = 0
            with self._watch_send_lock:
                self._watch_conn = conn
                self._watch_pending.clear()
            if self._stop.is_set():
                break
            with self._cache_lock:
                # Keys read while no stream was live were not kept; knoxd now resends them all.
                cache.live = True
                keys = tuple(cache.watched)
            if keys:
                self._send_watch(keys)
            self._pump(conn, cache)
        self._watch_closed()

    def _pump(self, conn: _SyncConnection, cache: KeyCache) -> None:
        try:
            while True:
                item = conn.receive(None)
                if isinstance(item, (UpdateEvent, RevokedEvent)):
                    with self._cache_lock:
                        cache.apply(item)
                elif isinstance(item, ErrorReply) and item.id is not None:
                    with self._watch_send_lock:
                        refused = self._watch_pending.pop(item.id, ())
                    with self._cache_lock:
                        for key_id in refused:
                            cache.watched.pop(key_id, None)
                            cache.drop(key_id)
                elif isinstance(item, Ok):
                    with self._watch_send_lock:
                        self._watch_pending.pop(item.id, None)
                else:
                    return
        except (OSError, DaemonError):
            return
        finally:
            with self._cache_lock:
                cache.lost()
            with self._watch_send_lock:
                self._watch_conn = None
            conn.close()

    def _watch_closed(self) -> None:
        with self._watch_send_lock:
            if self._watch_conn is not None:
                self._watch_conn.close()
                self._watch_conn = None

    def close(self) -> None:
        """Close both connections and stop the watch thread (bounded by the timeout)."""
        self._stop.set()
        with self._lock:
            self._closed = True
            self._discard()
            thread = self._watch_thread
        with self._watch_send_lock:
            if self._watch_conn is not None:
                with contextlib.suppress(OSError):
                    self._watch_conn.sock.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(self.timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- trio shell ---------------------------------------------------------------------------------


class _AsyncConnection:
    """A connected, greeted trio socket stream and its protocol state (one task at a time)."""

    def __init__(self, stream: trio.SocketStream, protocol: ClientProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self.hello: HelloReply | None = None

    @classmethod
    async def open(cls, path: str) -> _AsyncConnection:
        stream = await trio.open_unix_socket(path)
        conn = cls(stream, ClientProtocol())
        try:
            await stream.send_all(conn.protocol.hello())
            conn.hello = check_hello(await conn.receive())
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return conn

    async def receive(self) -> Incoming:
        while True:
            item = self.protocol.next_incoming()
            if item is not None:
                return item
            data = await self.stream.receive_some(_RECV_SIZE)
            if not data:
                raise DaemonUnavailable("knoxd closed the connection")
            self.protocol.receive_data(data)

    async def call(self, request: Request) -> Ok | ErrorReply:
        await self.stream.send_all(self.protocol.send(request))
        while True:
            item = await self.receive()
            if isinstance(item, ErrorReply) and item.id is None:
                raise error_for_reply(item)
            if isinstance(item, (Ok, ErrorReply)):
                return item

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def _connect_async(path: str, retry_for: float) -> _AsyncConnection:
    """Connect (caller bounds the time), retrying refused or missing sockets with backoff."""
    give_up = trio.current_time() + retry_for
    attempt = 0
    while True:
        try:
            return await _AsyncConnection.open(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            pause = _backoff(attempt)
            if trio.current_time() + pause >= give_up:
                raise _unavailable(path, exc) from None
            await trio.sleep(pause)
            attempt += 1
        except PermissionError:
            raise DaemonUnavailable(f"permission denied connecting to {path}") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise DaemonUnavailable(f"cannot reach knoxd at {path}: {exc}") from None


def _raise_timeout() -> NoReturn:
    raise DaemonTimeout("knoxd did not answer in time")


class AsyncWatchStream:
    """The trio form of :class:`WatchStream`: ``async for`` events, then :meth:`aclose` (or
    ``async with``). Reconnects and re-watches after a lost connection."""

    def __init__(self, client: AsyncClient, keys: Sequence[str], idle_timeout: float | None):
        self._client = client
        self._keys = tuple(keys)
        self._idle = idle_timeout
        self._conn: _AsyncConnection | None = None
        self._closed = False

    async def _open(self) -> None:
        client = self._client
        with trio.move_on_after(client.timeout) as scope:
            conn = await _connect_async(client.socket_path, client.reconnect_window)
            try:
                request = Watch(conn.protocol.new_id(), self._keys, client.identity)
                _keys(await conn.call(request), "watching")
            except BaseException:
                await conn.aclose()
                raise
            self._conn = conn
        if scope.cancelled_caught:
            _raise_timeout()

    def __aiter__(self) -> AsyncWatchStream:
        return self

    async def __anext__(self) -> Event:
        while not self._closed:
            if self._conn is None:
                await self._open()
                continue
            conn = self._conn
            try:
                with trio.fail_after(self._idle if self._idle is not None else float("inf")):
                    item = await conn.receive()
            except trio.TooSlowError:
                raise DaemonTimeout("no watch event within the idle timeout") from None
            except (DaemonUnavailable, OSError, trio.BrokenResourceError):
                self._conn = None
                await conn.aclose()
                continue
            if isinstance(item, (UpdateEvent, RevokedEvent)):
                return item
            if isinstance(item, ErrorReply):
                await self.aclose()
                raise error_for_reply(item)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.aclose()

    async def __aenter__(self) -> AsyncWatchStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncClient:
    """The trio client: the same API as :class:`Client`, awaited. Use ``async with``; the watch
    task that keeps the cache current runs in a nursery the client owns for that block.
    Concurrent calls share one connection, one request at a time."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        reconnect_window: float = 2.0,
        cache: bool = True,
        identity: str | None = None,
    ) -> None:
        self.socket_path = socket_path_from(socket_path)
        self.timeout = timeout
        self.reconnect_window = reconnect_window
        self.identity = identity
        self._lock = trio.Lock()
        self._conn: _AsyncConnection | None = None
        self._cache = KeyCache() if cache else None
        self._nursery_cm: Any = None
        self._nursery: trio.Nursery | None = None
        self._watch_started = False
        self._watch_conn: _AsyncConnection | None = None
        self._watch_send_lock = trio.Lock()
        self._watch_pending: dict[int, tuple[str, ...]] = {}

    async def __aenter__(self) -> AsyncClient:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            await self._nursery_cm.__aexit__(exc_type, exc, tb)
        finally:
            self._nursery = None
            if self._conn is not None:
                await self._conn.aclose()
                self._conn = None

    async def _call(self, make: Any) -> Ok | ErrorReply:
        with trio.move_on_after(self.timeout) as scope:
            async with self._lock:
                for attempt in (0, 1):
                    fresh = self._conn is None
                    if self._conn is None:
                        self._conn = await _connect_async(self.socket_path, self.reconnect_window)
                    conn = self._conn
                    try:
                        return await conn.call(make(conn.protocol.new_id()))
                    except (DaemonUnavailable, OSError, trio.BrokenResourceError) as exc:
                        self._conn = None
                        await conn.aclose()
                        if fresh or attempt:
                            if isinstance(exc, DaemonUnavailable):
                                raise
                            raise DaemonUnavailable(f"lost knoxd at {self.socket_path}") from None
                    except BaseException:
                        self._conn = None
                        await conn.aclose()
                        raise
        assert scope.cancelled_caught
        _raise_timeout()

    async def ping(self) -> None:
        _ok_or_raise(await self._call(lambda i: Ping(i, self.identity)))

    async def get(self, key: str, *, version: int | None = None, wait_ms: int | None = None) -> Key:
        """As :meth:`Client.get`."""
        if version is None and wait_ms is None and self._cache is not None:
            cached = self._cache.keys.get(key)
            if cached is not None:
                return cached
        epoch = self._cache.epoch if self._cache is not None else 0
        result = _get_key(await self._call(lambda i: Get(i, key, version, wait_ms, self.identity)))
        if version is None and self._cache is not None:
            await self._remember(result, epoch)
        return result

    async def get_primary(self, key: str) -> bytes:
        if self._cache is not None:
            data = self._cache.primary.get(key)
            if data is not None:
                return data
        return (await self.get(key)).primary.data

    async def get_active(self, key: str) -> list[bytes]:
        return [v.data for v in (await self.get(key)).versions]

    async def register(self, keys: Sequence[str], *, identity: str | None = None) -> list[str]:
        who = identity or self.identity
        return _keys(await self._call(lambda i: Register(i, tuple(keys), who)), "registered")

    async def unregister(self, keys: Sequence[str], *, identity: str | None = None) -> list[str]:
        who = identity or self.identity
        return _keys(await self._call(lambda i: Unregister(i, tuple(keys), who)), "unregistered")

    def watch(self, keys: Sequence[str], *, idle_timeout: float | None = None) -> AsyncWatchStream:
        """A stream of events for ``keys`` on its own connection (opened on first iteration)."""
        return AsyncWatchStream(self, keys, idle_timeout)

    async def _remember(self, key: Key, epoch: int) -> None:
        cache = self._cache
        assert cache is not None
        cache.store_answer(key, epoch)
        new = key.id not in cache.watched
        cache.watched[key.id] = None
        if not self._watch_started:
            if self._nursery is None:
                return  # outside ``async with``: no task may run, so nothing is kept
            self._watch_started = True
            self._nursery.start_soon(self._watch_loop)
        elif new:
            await self._send_watch((key.id,))

    async def _send_watch(self, keys: tuple[str, ...]) -> None:
        async with self._watch_send_lock:
            conn = self._watch_conn
            if conn is None:
                return
            request_id = conn.protocol.new_id()
            frame = conn.protocol.send(Watch(request_id, keys, self.identity))
            self._watch_pending[request_id] = keys
            with trio.move_on_after(self.timeout):
                with contextlib.suppress(
                    OSError, trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    await conn.stream.send_all(frame)

    async def _watch_loop(self) -> None:
        cache = self._cache
        assert cache is not None
        attempt = 0
        while True:
            conn: _AsyncConnection | None = None
            with trio.move_on_after(self.timeout):
                with contextlib.suppress(DaemonError):
                    conn = await _connect_async(self.socket_path, self.timeout)
            if conn is None:
                await trio.sleep(_backoff(attempt))
                attempt += 1
                continue
            attempt = 0
            self._watch_conn = conn
            self._watch_pending.clear()
            cache.live = True
            try:
                if cache.watched:
                    await self._send_watch(tuple(cache.watched))
                await self._pump(conn, cache)
            finally:
                cache.lost()
                self._watch_conn = None
                await conn.aclose()

    async def _pump(self, conn: _AsyncConnection, cache: KeyCache) -> None:
        try:
            while True:
                item = await conn.receive()
                if isinstance(item, (UpdateEvent, RevokedEvent)):
                    cache.apply(item)
                elif isinstance(item, ErrorReply) and item.id is not None:
                    for key_id in self._watch_pending.pop(item.id, ()):
                        cache.watched.pop(key_id, None)
                        cache.drop(key_id)
                elif isinstance(item, Ok):
                    self._watch_pending.pop(item.id, None)
                else:
                    return
        except (OSError, DaemonError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
