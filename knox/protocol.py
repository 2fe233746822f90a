"""The knoxd socket protocol, version 1: frames, messages, limits and error codes (pure, sans-IO).

This docstring is the contract. A client in any language can be written from it alone; the code
below implements it and nothing else.

Transport and framing
=====================

A Unix stream socket. knoxd serves two: the *workload socket* (applications) and the *admin
socket* (operators). Both speak this protocol; the admin socket also accepts the admin ops.

Every message, in either direction, is one **frame**: a 4-byte unsigned big-endian length ``N``,
then ``N`` bytes holding exactly one msgpack **map** with ``str`` keys, ``1 <= N <= 1,048,576``.

* Text is msgpack ``str`` (UTF-8), secret data is msgpack ``bin``, integers are msgpack ints.
* No ext types (timestamps included), no non-``str`` map keys, no bytes after the map.
* Per-frame limits: a ``str`` (map keys included) holds at most 4,096 bytes; a ``bin`` at most
  262,144 bytes; an array at most 1,024 items; a map at most 64 entries; nesting at most 8 levels
  (the frame's own map is level 1, a map or array inside it level 2, and so on).

A frame that breaks a rule is a *protocol error*: knoxd answers with one error frame
(``"id": nil``, code ``protocol``) if it can, then closes the connection.

In the schemas below ``?`` marks an optional field, which may be absent or ``nil`` (the same
thing); ``uint32`` is an int in ``0..4294967295``; ``key id`` is a ``str`` matching
``^[a-zA-Z0-9_:]+$`` of at most 512 characters.

Opening a connection
====================

The first client frame must be a hello; anything else is a protocol error::

    client -> {"op": "hello", "magic": "knoxd", "v": 1}
    knoxd  -> {"op": "hello", "magic": "knoxd", "v": 1, "server": "knoxd/<version>",
               "peer": {"uid": int, "gid": int, "unit": str | nil},
               "identity": str | nil}

Other fields of the client's hello are ignored (later versions may add some). A wrong ``magic``
or a missing ``v`` is a protocol error; a ``v`` knoxd does not speak gets error ``version`` and a
close. ``identity`` is the local identity knoxd maps this peer to; ``nil`` means none, so every key
op will be refused with ``unauthorized``.

Requests and responses
======================

::

    request  -> {"id": uint32, "op": str, ...arguments}
    response <- {"id": <same>, "ok": true, ...results}
             <- {"id": <same> | nil, "ok": false,
                 "error": {"code": str, "message": str, "retry": bool}}

A request with a missing or unknown op, an argument its op does not take, or a missing or
invalid argument, and a second hello, are answered with ``bad_request`` (with ``"id": nil`` if
the request's own ``id`` was missing or invalid); the connection stays open. Requests may be
pipelined; responses come back in request order.
``message`` is for people and never holds secret data; programs act on ``code`` and ``retry``.
Clients ignore result fields they do not know.

Key ops (both sockets). Each also takes ``identity?: str``: act as that identity instead of the
peer's first match (the peer must match it too, or the answer is ``unauthorized``).

=============  ==============================================  ===================================
op             arguments                                       results
=============  ==============================================  ===================================
``get``        ``key: key id``, ``version?: int`` (that        ``key: cached key``,
               version, if cached; ``0..2**64-1``),            ``age_ms: int >= 0`` (since the
               ``wait_ms?: int`` (``0..30000``: if the key     value was last confirmed
               is not registered for the identity, register    upstream), ``stale: bool``
               it and wait that long for its first fetch)
``register``   ``keys: [key id]``                              ``registered: [key id]``
``unregister`` ``keys: [key id]``                              ``unregistered: [key id]``
``watch``      ``keys: [key id]``                              ``watching: [key id]``, then events
``unwatch``    ``keys: [key id]``                              ``watching: [key id]`` (what remains)
``ping``       (none)                                          (none)
=============  ==============================================  ===================================

``keys`` holds 1 to 1,024 key ids; a repeated id counts once (order of first appearance).

Admin ops (admin socket only; on the workload socket they are answered ``bad_request``):

=============  ==============================================  ===================================
op             arguments                                       results
=============  ==============================================  ===================================
``status``     (none)                                          ``version``, ``started_at``,
                                                               ``identities``: [{``name``,
                                                               ``principal``, ``keys``,
                                                               ``last_refresh_at``, ``last_error``,
                                                               ``upstream_ok``}], ``cache``:
                                                               {``entries``, ``stale``,
                                                               ``oldest_age_ms``}, ``connections``
``list``       ``identity?: str``                              ``entries``: [{``identity``,
                                                               ``key_id``, ``hash``, ``versions``:
                                                               [{``id``, ``status``}],
                                                               ``fetched_at``, ``age_ms``,
                                                               ``stale``, ``last_error``}], never
                                                               data
``refresh``    ``keys?: [key id]``, ``identity?: str``         ``queued: int``
``register``,  ``keys: [key id]``, ``identity: str``           as above
``unregister`` (required on the admin socket)
=============  ==============================================  ===================================

A **cached key** is::

    {"id": key id, "hash": str,
     "versions": [{"id": int, "status": "Primary" | "Active", "ts": int (ns), "data": bin}, ...]}

The Primary comes first, then the Actives in the order the server gave. Inactive versions are not
cached. ``hash`` is the Knox version hash of the key's full version list (Inactives included).

Events
======

After ``watch``, event frames arrive between responses. They carry no ``id``; they carry
``event``::

    <- {"event": "update", "key": cached key, "age_ms": int, "stale": bool}
    <- {"event": "revoked", "key_id": key id, "reason": "deleted" | "forbidden"}

An ``update`` follows a ``watch`` for every watched key knoxd holds, and carries a key's full
state, never a delta; a newer state replaces an older one not yet written. After ``revoked`` the
key must not be used; it stays watched. If the peer stops matching the identity, the watch ends
with an error frame (``"id": nil``, code ``unauthorized``) and a close.

Error codes
===========

========================  =====  ==========================================================
code                      retry  meaning
========================  =====  ==========================================================
``protocol``              false  framing or hello broken; the connection closes
``version``               false  protocol version not spoken; the connection closes
``bad_request``           false  a well-formed frame with a bad op or argument
``unauthorized``          false  the peer maps to no identity, not to the one asked for, or
                                 is not an admin
``forbidden``             false  the identity may not read this key (the server said 403)
``not_found``             false  the key does not exist upstream, or the version is not cached
``not_registered``        false  not registered for this identity and no ``wait_ms`` given
``not_ready``             true   registered, first fetch not done (or ``wait_ms`` ran out)
``stale``                 true   the cached value is older than the configured maximum
``upstream_unavailable``  true   nothing cached and the upstream cannot be reached
``busy``                  true   a limit was hit (connections, fetch rate); back off
``internal``              true   a bug; logged with a request id
========================  =====  ==========================================================

Python API
==========

Framing: :func:`encode_frame`, :class:`FrameDecoder`, :func:`decode_body`. Server side:
:func:`parse_hello`, :func:`parse_request` (raising :class:`BadRequest`), the builders
:func:`hello_reply`, :func:`ok`, :func:`error`, :func:`update_event`, :func:`revoked_event`,
:func:`cached_key_obj`, and the get fast path :func:`encode_cached_key` with
:func:`encode_get_ok` / :func:`encode_update_event`, which splice a key packed once per change into
a frame. Client side: :func:`client_hello`, :func:`parse_hello_reply`, :func:`request_obj`,
:func:`parse_response`, :func:`get_result`, :func:`keys_result`, :func:`key_from_cached`.
Everything that reads the wire raises :class:`ProtocolError` (never anything else) on bad input,
and no error message ever holds secret data.
"""

from __future__ import annotations

import enum
import re
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, NoReturn

import msgpack

from knox.model import Key, KeyVersion, VersionStatus, is_valid_key_id, validate_versions

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_ARRAY_LEN",
    "MAX_BIN_LEN",
    "MAX_BUFFER",
    "MAX_DEPTH",
    "MAX_FRAME",
    "MAX_MAP_LEN",
    "MAX_STR_LEN",
    "MAX_UINT32",
    "MAX_UINT64",
    "MAX_WAIT_MS",
    "MIN_FRAME",
    "VERSION",
    "BadRequest",
    "ErrorCode",
    "ErrorReply",
    "Event",
    "Get",
    "GetResult",
    "Hello",
    "HelloReply",
    "List",
    "Ok",
    "Ping",
    "ProtocolError",
    "Refresh",
    "Register",
    "Request",
    "Response",
    "RevokeReason",
    "RevokedEvent",
    "Status",
    "Unregister",
    "Unwatch",
    "UpdateEvent",
    "Watch",
    "cached_key_obj",
    "client_hello",
    "decode_body",
    "encode_cached_key",
    "encode_frame",
    "encode_get_ok",
    "encode_update_event",
    "error",
    "frame_length",
    "get_result",
    "hello_reply",
    "key_from_cached",
    "keys_result",
    "ok",
    "parse_hello",
    "parse_hello_reply",
    "parse_request",
    "parse_response",
    "request_obj",
    "revoked_event",
    "update_event",
]

MAGIC: Final = "knoxd"
VERSION: Final = 1

HEADER_SIZE: Final = 4
MIN_FRAME: Final = 1
MAX_FRAME: Final = 1_048_576
MAX_STR_LEN: Final = 4_096
MAX_BIN_LEN: Final = 262_144
MAX_ARRAY_LEN: Final = 1_024
MAX_MAP_LEN: Final = 64
MAX_DEPTH: Final = 8
MAX_WAIT_MS: Final = 30_000
MAX_UINT32: Final = 2**32 - 1
MAX_UINT64: Final = 2**64 - 1
MIN_INT64: Final = -(2**63)
MAX_INT64: Final = 2**63 - 1
#: What a :class:`FrameDecoder` holds at most by default: two maximal frames.
MAX_BUFFER: Final = 2 * (HEADER_SIZE + MAX_FRAME)

_HEADER = struct.Struct(">I")


class ErrorCode(enum.StrEnum):
    """The ``code`` of an error frame."""

    PROTOCOL = "protocol"
    VERSION = "version"
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    NOT_REGISTERED = "not_registered"
    NOT_READY = "not_ready"
    STALE = "stale"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    BUSY = "busy"
    INTERNAL = "internal"

    @property
    def retry(self) -> bool:
        """Whether the same request may succeed later (the ``retry`` flag of the codes table)."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorCode.NOT_READY,
        ErrorCode.STALE,
        ErrorCode.UPSTREAM_UNAVAILABLE,
        ErrorCode.BUSY,
        ErrorCode.INTERNAL,
    }
)
_ERROR_CODES = {c.value: c for c in ErrorCode}


class RevokeReason(enum.StrEnum):
    """Why a ``revoked`` event says a key must no longer be used."""

    DELETED = "deleted"
    FORBIDDEN = "forbidden"


_REVOKE_REASONS = {r.value: r for r in RevokeReason}


class ProtocolError(Exception):
    """A frame or message that breaks the protocol; the connection cannot go on.

    ``code`` is :attr:`ErrorCode.PROTOCOL`, or :attr:`ErrorCode.VERSION` for a hello in a version
    this side does not speak. The message says what was wrong and never holds secret data.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


class BadRequest(Exception):
    """A well-formed frame with a bad op or argument; answer it and keep the connection.

    ``request_id`` is the request's ``id`` when it was a valid uint32, else ``None``.
    """

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# --- framing ------------------------------------------------------------------------------------

_MSGPACK_NAMES = {
    dict: "map",
    list: "array",
    tuple: "array",
    str: "str",
    bytes: "bin",
    bytearray: "bin",
    int: "int",
    bool: "bool",
    float: "float",
    type(None): "nil",
}


def _kind(value: object) -> str:
    """The msgpack name of a value's type, for messages (never the value itself)."""
    return _MSGPACK_NAMES.get(type(value), type(value).__name__)


def _reject_ext(code: int, data: bytes) -> object:
    raise ProtocolError(f"ext type {code} is not allowed")


_UNPACK_OPTIONS: Final[dict[str, Any]] = {
    "raw": False,
    "strict_map_key": True,
    "use_list": True,
    "max_str_len": MAX_STR_LEN,
    "max_bin_len": MAX_BIN_LEN,
    "max_array_len": MAX_ARRAY_LEN,
    "max_map_len": MAX_MAP_LEN,
    "max_ext_len": 0,
    "ext_hook": _reject_ext,
}

# msgpack reports its size limits as "<n> exceeds max_<kind>_len(<limit>)".
_LIMIT_RE = re.compile(r"(\d+) exceeds max_(str|bin|array|map|ext)_len\(\d+\)")
_MAP_KEY_RE = re.compile(r"(\w+) is not allowed for map key")
_LIMIT_TEXT = {
    "str": ("string of {} bytes", MAX_STR_LEN),
    "bin": ("bin of {} bytes", MAX_BIN_LEN),
    "array": ("array of {} items", MAX_ARRAY_LEN),
    "map": ("map of {} entries", MAX_MAP_LEN),
}
_PY_TO_MSGPACK = {
    "int": "int",
    "float": "float",
    "bool": "bool",
    "NoneType": "nil",
    "list": "array",
    "tuple": "array",
    "dict": "map",
}


def _unpack_error(exc: ValueError) -> ProtocolError:
    """A precise :class:`ProtocolError` for an error of ``msgpack.unpackb``."""
    if isinstance(exc, msgpack.ExtraData):
        return ProtocolError(f"{len(exc.extra)} bytes of trailing data after the map")
    if isinstance(exc, msgpack.exceptions.StackError):
        return ProtocolError(f"nesting deeper than {MAX_DEPTH} levels")
    if isinstance(exc, UnicodeDecodeError):
        # Its own text quotes a byte of the string: never repeat it.
        return ProtocolError("a str is not valid UTF-8")
    if isinstance(exc, msgpack.exceptions.FormatError):
        return ProtocolError("malformed msgpack: invalid type byte")
    text = str(exc)
    if match := _LIMIT_RE.fullmatch(text):
        size, kind = match.groups()
        if kind == "ext":
            return ProtocolError("ext types are not allowed")
        what, limit = _LIMIT_TEXT[kind]
        return ProtocolError(f"{what.format(size)} exceeds the limit of {limit}")
    if match := _MAP_KEY_RE.match(text):
        return ProtocolError(
            f"map keys must be str, not {_PY_TO_MSGPACK.get(match.group(1), match.group(1))}"
        )
    if "incomplete input" in text:
        return ProtocolError("truncated msgpack: the frame ends inside the map")
    if "timestamp" in text:
        return ProtocolError("ext types are not allowed")
    return ProtocolError("malformed msgpack")


_CONTAINERS = frozenset({dict, list})


def _check_tree(obj: dict[Any, Any] | list[Any], depth: int) -> None:
    """Check what msgpack's options cannot: map keys are ``str`` (not ``bin``) and nesting."""
    if depth > MAX_DEPTH:
        raise ProtocolError(f"nesting deeper than {MAX_DEPTH} levels")
    if type(obj) is dict:
        for key, value in obj.items():
            if type(key) is not str:
                raise ProtocolError(f"map keys must be str, not {_kind(key)}")
            if type(value) in _CONTAINERS:
                _check_tree(value, depth + 1)
    else:
        for value in obj:
            if type(value) in _CONTAINERS:
                _check_tree(value, depth + 1)


def decode_body(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode one frame body (the bytes after the length) into its map.

    Raises :class:`ProtocolError` for bad msgpack, anything but one map, trailing bytes, ext
    types, non-``str`` keys, invalid UTF-8, or any limit exceeded.
    """
    try:
        obj = msgpack.unpackb(body, **_UNPACK_OPTIONS)
    except ValueError as exc:
        raise _unpack_error(exc) from None
    if type(obj) is not dict:
        raise ProtocolError(f"a frame must hold a map, not {_kind(obj)}")
    _check_tree(obj, 1)
    return obj


def frame_length(header: bytes | bytearray) -> int:
    """The body length a 4-byte frame header announces.

    Raises :class:`ProtocolError` if it is outside ``MIN_FRAME..MAX_FRAME``.
    """
    (length,) = _HEADER.unpack_from(header)
    if length < MIN_FRAME:
        raise ProtocolError("frame length 0: a frame holds at least one byte")
    if length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} exceeds the limit of {MAX_FRAME} bytes")
    return int(length)


class _Packer(threading.local):
    """One msgpack packer per thread: reusing it is 3-4x cheaper than ``packb``, but a packer
    is not safe to share between threads."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)


_packers = _Packer()


def _check_outgoing(obj: object, depth: int) -> None:
    """Hold a value we are about to send to the limits the peer will enforce."""
    if isinstance(obj, str):
        # Four bytes per character at most, so short strings need no encoding to measure.
        if len(obj) > MAX_STR_LEN // 4 and len(obj.encode()) > MAX_STR_LEN:
            raise ProtocolError(f"cannot send a str of more than {MAX_STR_LEN} bytes")
    elif isinstance(obj, (bytes, bytearray)):
        if len(obj) > MAX_BIN_LEN:
            raise ProtocolError(f"cannot send a bin of more than {MAX_BIN_LEN} bytes")
    elif isinstance(obj, dict):
        if depth > MAX_DEPTH:
            raise ProtocolError(f"cannot send nesting deeper than {MAX_DEPTH} levels")
        if len(obj) > MAX_MAP_LEN:
            raise ProtocolError(f"cannot send a map of more than {MAX_MAP_LEN} entries")
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ProtocolError(f"cannot send a map key of type {_kind(key)}")
            _check_outgoing(key, depth)
            _check_outgoing(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        if depth > MAX_DEPTH:
            raise ProtocolError(f"cannot send nesting deeper than {MAX_DEPTH} levels")
        if len(obj) > MAX_ARRAY_LEN:
            raise ProtocolError(f"cannot send an array of more than {MAX_ARRAY_LEN} items")
        for value in obj:
            _check_outgoing(value, depth + 1)
    elif obj is not None and not isinstance(obj, (int, float)):
        raise ProtocolError(f"cannot send a value of type {type(obj).__name__}")


def _pack(obj: object) -> bytes:
    try:
        packed: bytes = _packers.packer.pack(obj)
    except OverflowError:
        raise ProtocolError("cannot send an integer outside the msgpack range") from None
    return packed


def encode_frame(obj: Mapping[str, Any]) -> bytes:
    """One frame: the 4-byte big-endian length, then ``obj`` as a msgpack map.

    Raises :class:`ProtocolError` if the frame would break a limit the peer enforces (size, str,
    bin, array, map, nesting), or holds a value msgpack cannot carry.
    """
    as_dict = obj if isinstance(obj, dict) else dict(obj)
    _check_outgoing(as_dict, 1)
    body = _pack(as_dict)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"cannot send a frame of {len(body)} bytes (limit {MAX_FRAME})")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream into messages, h11-style: :meth:`feed` bytes, then call
    :meth:`next_message` until it returns ``None``.

    Guarantees: a hostile length is rejected as soon as its 4-byte header is in, without waiting
    for (or buffering) the body; at most ``max_buffer`` bytes are ever held; every violation is a
    :class:`ProtocolError`, after which the decoder stays failed and every call raises it again.
    ``feed(b"")`` marks the end of the stream: the frames already complete are still returned,
    then a partial frame left over is a :class:`ProtocolError`.
    """

    __slots__ = ("_buffer", "_eof", "_error", "_max_buffer")

    def __init__(self, max_buffer: int = MAX_BUFFER) -> None:
        self._buffer = bytearray()
        self._max_buffer = max_buffer
        self._eof = False
        self._error: ProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; ``b""`` means the peer closed its side.

        Raises :class:`ProtocolError` if the decoder failed before or the buffer would exceed
        its bound (read messages out before feeding more), :class:`RuntimeError` if bytes come
        after the end of the stream.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("bytes fed after the end of the stream")
        if len(self._buffer) + len(data) > self._max_buffer:
            self._fail(
                ProtocolError(f"more than {self._max_buffer} bytes received and not yet read")
            )
        self._buffer += data

    def next_message(self) -> dict[str, Any] | None:
        """The next complete message, or ``None`` if more bytes are needed (or the stream
        ended cleanly). Raises :class:`ProtocolError`."""
        if self._error is not None:
            # A fresh traceback each time, or it would grow with every call.
            raise self._error.with_traceback(None)
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            if self._eof and buffer:
                self._fail(ProtocolError("the stream ended inside a frame header"))
            return None
        try:
            end = HEADER_SIZE + frame_length(buffer)
        except ProtocolError as exc:
            self._fail(exc)
        if len(buffer) < end:
            if self._eof:
                self._fail(
                    ProtocolError(
                        f"the stream ended inside a frame ({len(buffer) - HEADER_SIZE} of "
                        f"{end - HEADER_SIZE} bytes)"
                    )
                )
            return None
        body = buffer[HEADER_SIZE:end]
        del buffer[:end]
        try:
            return decode_body(body)
        except ProtocolError as exc:
            self._fail(exc)

    def _fail(self, exc: ProtocolError) -> NoReturn:
        self._error = exc
        self._buffer = bytearray()
        raise exc


def _quote(text: str) -> str:
    """``text`` quoted for a message, cut short: names and ids only, never secret data."""
    return repr(text if len(text) <= 64 else text[:64] + "...")


# --- hello --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """A client's hello, as knoxd accepted it."""

    v: int
    magic: str


@dataclass(frozen=True, slots=True)
class HelloReply:
    """knoxd's answer to a hello: who it is and who it takes the peer for."""

    server: str
    uid: int
    gid: int
    unit: str | None
    identity: str | None


def client_hello() -> dict[str, Any]:
    """The hello a client sends first."""
    return {"op": "hello", "magic": MAGIC, "v": VERSION}


def parse_hello(msg: Mapping[str, Any]) -> Hello:
    """Check a connection's first client message.

    Raises :class:`ProtocolError`: code ``version`` for a well-formed hello in another protocol
    version, code ``protocol`` for anything else that is not a hello of this protocol.
    """
    op = msg.get("op")
    if op != "hello":
        what = f"op {_quote(op)}" if isinstance(op, str) else "a frame without an op"
        raise ProtocolError(f"the first frame must be a hello, not {what}")
    if msg.get("magic") != MAGIC:
        raise ProtocolError(f"wrong magic in hello (this is the {MAGIC} protocol)")
    v = msg.get("v")
    if type(v) is not int:
        raise ProtocolError(f"hello 'v' must be an int, not {_kind(v)}")
    if v != VERSION:
        raise ProtocolError(
            f"protocol version {v} is not spoken here (this side speaks {VERSION})",
            ErrorCode.VERSION,
        )
    return Hello(v, MAGIC)


def hello_reply(
    server: str, peer_uid: int, peer_gid: int, unit: str | None, identity: str | None
) -> dict[str, Any]:
    """knoxd's answer to an accepted hello."""
    return {
        "op": "hello",
        "magic": MAGIC,
        "v": VERSION,
        "server": server,
        "peer": {"uid": peer_uid, "gid": peer_gid, "unit": unit},
        "identity": identity,
    }


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Get:
    """Read a cached key, or one of its versions; optionally register it and wait."""

    op: ClassVar[str] = "get"
    id: int
    key: str
    version: int | None = None
    wait_ms: int | None = None
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Register:
    """Keep these keys fresh for the identity."""

    op: ClassVar[str] = "register"
    id: int
    keys: tuple[str, ...]
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Unregister:
    """Stop keeping these keys fresh for the identity."""

    op: ClassVar[str] = "unregister"
    id: int
    keys: tuple[str, ...]
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Watch:
    """Receive events for these keys on this connection."""

    op: ClassVar[str] = "watch"
    id: int
    keys: tuple[str, ...]
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Unwatch:
    """Stop receiving events for these keys."""

    op: ClassVar[str] = "unwatch"
    id: int
    keys: tuple[str, ...]
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    """Keep the connection alive; the answer has no results."""

    op: ClassVar[str] = "ping"
    id: int
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Status:
    """Admin: the daemon's health, identities, cache and connections."""

    op: ClassVar[str] = "status"
    id: int


@dataclass(frozen=True, slots=True)
class List:
    """Admin: the cache entries (of one identity, or all), never their data."""

    op: ClassVar[str] = "list"
    id: int
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Refresh:
    """Admin: queue a refetch of some keys (``None``: all) of one identity (``None``: all)."""

    op: ClassVar[str] = "refresh"
    id: int
    keys: tuple[str, ...] | None = None
    identity: str | None = None


Request = Get | Register | Unregister | Watch | Unwatch | Ping | Status | List | Refresh

_ARGUMENTS: dict[type[Request], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls) if f.name != "id")
    for cls in (Get, Register, Unregister, Watch, Unwatch, Ping, Status, List, Refresh)
}


def _bad(request_id: int | None, message: str) -> BadRequest:
    return BadRequest(ErrorCode.BAD_REQUEST, message, request_id)


def _arg_key_id(request_id: int, value: object, where: str) -> str:
    if type(value) is not str:
        raise _bad(request_id, f"{where} must be a str, not {_kind(value)}")
    if not is_valid_key_id(value):
        raise _bad(
            request_id,
            f"{where} {_quote(value)} is not a key id (letters, digits, '_' and ':', at most 512)",
        )
    return value


def _arg_key(request_id: int, msg: Mapping[str, Any]) -> str:
    value = msg.get("key")
    if value is None:
        raise _bad(request_id, "'key' is required")
    return _arg_key_id(request_id, value, "'key'")


def _arg_keys(request_id: int, msg: Mapping[str, Any]) -> tuple[str, ...]:
    value = msg.get("keys")
    if value is None:
        raise _bad(request_id, "'keys' is required")
    if type(value) is not list and type(value) is not tuple:
        raise _bad(request_id, f"'keys' must be an array of key ids, not {_kind(value)}")
    if not value:
        raise _bad(request_id, "'keys' must not be empty")
    if len(value) > MAX_ARRAY_LEN:
        raise _bad(request_id, f"too many keys: {len(value)} (at most {MAX_ARRAY_LEN})")
    for index, key_id in enumerate(value):
        _arg_key_id(request_id, key_id, f"'keys[{index}]'")
    return tuple(dict.fromkeys(value))


def _arg_uint(request_id: int, msg: Mapping[str, Any], name: str, maximum: int) -> int | None:
    value = msg.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise _bad(request_id, f"'{name}' must be an int, not {_kind(value)}")
    if not 0 <= value <= maximum:
        raise _bad(request_id, f"'{name}' must be in 0..{maximum}")
    return value


def _arg_identity(request_id: int, msg: Mapping[str, Any], required: bool) -> str | None:
    value = msg.get("identity")
    if value is None:
        if required:
            raise _bad(request_id, "'identity' is required for this op on the admin socket")
        return None
    if type(value) is not str:
        raise _bad(request_id, f"'identity' must be a str, not {_kind(value)}")
    if not value:
        raise _bad(request_id, "'identity' must not be empty")
    return value


def _parse_get(request_id: int, msg: Mapping[str, Any], admin: bool) -> Request:
    return Get(
        request_id,
        _arg_key(request_id, msg),
        _arg_uint(request_id, msg, "version", MAX_UINT64),
        _arg_uint(request_id, msg, "wait_ms", MAX_WAIT_MS),
        _arg_identity(request_id, msg, required=False),
    )


def _parse_register(request_id: int, msg: Mapping[str, Any], admin: bool) -> Request:
    return Register(
        request_id, _arg_keys(request_id, msg), _arg_identity(request_id, msg, required=admin)
    )


def _parse_unregister(request_id: int, msg: Mapping[str, Any], admin: bool) -> Request:
    return Unregister(
        request_id, _arg_keys(request_id, msg), _arg_identity(request_id, msg, required=admin)
    )


def _parse_watch(request_id: int, msg: Mapping[str, Any], admin: bool) -> Request:
    return Watch(
        request_id, _arg_keys(request_id, msg), _arg_identity(request_id, msg, required=False)
    )


def _parse_unwatch(request_id: int, msg: Mapping[str, Any], admin: bool) -> Request:
    return Unwatch(
        request_id, _arg_keys(request_id, msg), _arg_identity(request_id, msg, required=False)
    )


def _parse_ping(request_id: int, msg: Mapping[str, Any], admin: bool) -> Request:
    return Ping(request_id, _arg_identity(request_id, msg, required=False))


def _parse_status(request_id: int, msg: Mapping[str, Any], admin: bool) -> Request:
    return Status(request_id)


def _parse_list(request_id: int, msg: Mapping[str, Any], admin: bool) -> Request:
    return List(request_id, _arg_identity(request_id, msg, required=False))


def _parse_refresh(request_id: int, msg: Mapping[str, Any], admin: bool) -> Request:
    keys = _arg_keys(request_id, msg) if msg.get("keys") is not None else None
    return Refresh(request_id, keys, _arg_identity(request_id, msg, required=False))


@dataclass(frozen=True, slots=True)
class _OpSpec:
    parse: Callable[[int, Mapping[str, Any], bool], Request]
    fields: frozenset[str]
    admin_only: bool


def _spec(
    cls: type[Request], parse: Callable[[int, Mapping[str, Any], bool], Request]
) -> tuple[str, _OpSpec]:
    admin_only = cls in (Status, List, Refresh)
    return cls.op, _OpSpec(parse, frozenset({"id", "op", *_ARGUMENTS[cls]}), admin_only)


_OPS = dict(
    (
        _spec(Get, _parse_get),
        _spec(Register, _parse_register),
        _spec(Unregister, _parse_unregister),
        _spec(Watch, _parse_watch),
        _spec(Unwatch, _parse_unwatch),
        _spec(Ping, _parse_ping),
        _spec(Status, _parse_status),
        _spec(List, _parse_list),
        _spec(Refresh, _parse_refresh),
    )
)


def parse_request(msg: Mapping[str, Any], *, admin: bool = False) -> Request:
    """The typed request a decoded message holds. ``admin``: it came on the admin socket.

    Raises :class:`BadRequest` (code ``bad_request``, with the request's id when it had a valid
    one) for a missing or invalid ``id`` or ``op``, an unknown op, a second hello, an admin op on
    the workload socket, an argument the op does not take, or a missing or invalid argument.
    """
    request_id = msg.get("id")
    valid_id = request_id if type(request_id) is int and 0 <= request_id <= MAX_UINT32 else None
    op = msg.get("op")
    if op == "hello":
        raise _bad(valid_id, "a connection says hello only once")
    if valid_id is None:
        if request_id is None:
            raise _bad(None, "'id' is required")
        raise _bad(None, f"'id' must be an int in 0..{MAX_UINT32}")
    if type(op) is not str:
        if op is None:
            raise _bad(valid_id, "'op' is required")
        raise _bad(valid_id, f"'op' must be a str, not {_kind(op)}")
    spec = _OPS.get(op)
    if spec is None:
        raise _bad(valid_id, f"unknown op {_quote(op)}")
    if spec.admin_only and not admin:
        raise _bad(valid_id, f"op {_quote(op)} is served on the admin socket only")
    if not spec.fields.issuperset(msg):
        extra = next(name for name in msg if name not in spec.fields)
        shown = _quote(extra) if isinstance(extra, str) else f"of type {_kind(extra)}"
        raise _bad(valid_id, f"op {_quote(op)} takes no argument {shown}")
    return spec.parse(valid_id, msg, admin)


def request_obj(request: Request) -> dict[str, Any]:
    """The message a client sends for ``request`` (absent arguments left out)."""
    obj: dict[str, Any] = {"id": request.id, "op": request.op}
    for name in _ARGUMENTS[type(request)]:
        value = getattr(request, name)
        if value is not None:
            obj[name] = list(value) if isinstance(value, tuple) else value
    return obj


# --- server -> client ---------------------------------------------------------------------------


def _fit(text: str) -> str:
    """``text`` cut to at most :data:`MAX_STR_LEN` UTF-8 bytes, on a character boundary."""
    if len(text) <= MAX_STR_LEN // 4:
        return text
    return text.encode()[:MAX_STR_LEN].decode(errors="ignore")


def ok(request_id: int, /, **results: Any) -> dict[str, Any]:
    """A successful response: ``{"id", "ok": true, **results}``."""
    if "id" in results or "ok" in results:
        raise ValueError("'id' and 'ok' are not results")
    return {"id": request_id, "ok": True, **results}


def error(request_id: int | None, code: ErrorCode, message: str) -> dict[str, Any]:
    """An error response (``request_id`` ``None``: not about one request). ``retry`` comes
    from the code; ``message`` is cut to the str limit. Never put secret data in it."""
    return {
        "id": request_id,
        "ok": False,
        "error": {"code": code.value, "message": _fit(message), "retry": code.retry},
    }


def _version_obj(version: KeyVersion) -> dict[str, Any]:
    return {
        "id": version.id,
        "status": version.status.value,
        "ts": version.ts,
        "data": version.data,
    }


def cached_key_obj(key: Key) -> dict[str, Any]:
    """The cached form of ``key``: its Primary, then its Actives in the key's order.

    Raises :class:`knox.model.InvalidKeyError` unless the key has exactly one Primary and
    distinct version ids.
    """
    validate_versions(key.versions)
    versions = [_version_obj(key.primary)]
    versions.extend(_version_obj(v) for v in key.versions if v.status is VersionStatus.ACTIVE)
    return {"id": key.id, "hash": key.hash, "versions": versions}


def update_event(key: Key, age_ms: int, stale: bool) -> dict[str, Any]:
    """An ``update`` event carrying ``key``'s full cached state."""
    return {"event": "update", "key": cached_key_obj(key), "age_ms": age_ms, "stale": stale}


def revoked_event(key_id: str, reason: RevokeReason) -> dict[str, Any]:
    """A ``revoked`` event: ``key_id`` must no longer be used."""
    return {"event": "revoked", "key_id": key_id, "reason": reason.value}


# The get fast path: a key's cached form is packed once per change, and each response is
# assembled around those bytes with msgpack's format written out by hand. The wrappers below
# are exactly what packing ok(id, key=..., age_ms=..., stale=...) and update_event(...) gives.


def _packed_str(text: str) -> bytes:
    return bytes(msgpack.packb(text))


def _fixmap(entries: int) -> bytes:
    return bytes((0x80 | entries,))


_GET_OK_HEAD = _fixmap(5) + _packed_str("id")
_GET_OK_KEY = _packed_str("ok") + b"\xc3" + _packed_str("key")
_UPDATE_HEAD = _fixmap(4) + _packed_str("event") + _packed_str("update") + _packed_str("key")
_AGE_MS = _packed_str("age_ms")
_STALE = {True: _packed_str("stale") + b"\xc3", False: _packed_str("stale") + b"\xc2"}
# More than the longest wrapper (uint64 id and age): what a packed key must leave free in a frame.
_SPLICE_ROOM = 64

_FIXINTS = tuple(bytes((n,)) for n in range(0x80))
_UINT8 = struct.Struct(">BB")
_UINT16 = struct.Struct(">BH")
_UINT32 = struct.Struct(">BI")
_UINT64 = struct.Struct(">BQ")


def _pack_uint(n: int) -> bytes:
    """``n`` packed exactly as msgpack packs a non-negative int (smallest form)."""
    if not 0 <= n <= MAX_UINT64:
        raise ValueError(f"{n} is not in 0..{MAX_UINT64}")
    if n < 0x80:
        return _FIXINTS[n]
    if n <= 0xFF:
        return _UINT8.pack(0xCC, n)
    if n <= 0xFFFF:
        return _UINT16.pack(0xCD, n)
    if n <= 0xFFFFFFFF:
        return _UINT32.pack(0xCE, n)
    return _UINT64.pack(0xCF, n)


def encode_cached_key(key: Key) -> bytes:
    """``cached_key_obj(key)`` packed, ready for :func:`encode_get_ok` and
    :func:`encode_update_event`.

    Raises :class:`ProtocolError` if the key cannot be served within the limits (a version's
    data over :data:`MAX_BIN_LEN`, too many versions, or too big for one frame), and
    :class:`knox.model.InvalidKeyError` as :func:`cached_key_obj` does.
    """
    obj = cached_key_obj(key)
    # The key sits at level 2 of the frames it is spliced into.
    _check_outgoing(obj, 2)
    packed = _pack(obj)
    if len(packed) > MAX_FRAME - _SPLICE_ROOM:
        raise ProtocolError(f"key {_quote(key.id)} needs {len(packed)} bytes, more than a frame")
    return packed


def _frame(body: bytes) -> bytes:
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"cannot send a frame of {len(body)} bytes (limit {MAX_FRAME})")
    return _HEADER.pack(len(body)) + body


def encode_get_ok(request_id: int, cached_key: bytes, age_ms: int, stale: bool) -> bytes:
    """The frame of ``ok(request_id, key=..., age_ms=age_ms, stale=stale)`` around a key packed
    by :func:`encode_cached_key`, byte for byte, without repacking the key.

    Raises :class:`ValueError` if ``request_id`` or ``age_ms`` is not in ``0..MAX_UINT64``.
    """
    return _frame(
        b"".join(
            (
                _GET_OK_HEAD,
                _pack_uint(request_id),
                _GET_OK_KEY,
                cached_key,
                _AGE_MS,
                _pack_uint(age_ms),
                _STALE[stale],
            )
        )
    )


def encode_update_event(cached_key: bytes, age_ms: int, stale: bool) -> bytes:
    """The frame of an ``update`` event around a key packed by :func:`encode_cached_key`,
    byte for byte what encoding :func:`update_event` gives. Raises :class:`ValueError` if
    ``age_ms`` is not in ``0..MAX_UINT64``."""
    return _frame(b"".join((_UPDATE_HEAD, cached_key, _AGE_MS, _pack_uint(age_ms), _STALE[stale])))


# --- client side --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ok:
    """A successful response. ``results`` may hold secret data, so ``repr`` shows names only."""

    id: int
    results: dict[str, Any]

    def __repr__(self) -> str:
        return f"Ok(id={self.id}, results=<{', '.join(self.results)}>)"


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An error response; ``id`` is ``None`` when it is about the connection, not a request."""

    id: int | None
    code: ErrorCode
    message: str
    retry: bool


@dataclass(frozen=True, slots=True)
class UpdateEvent:
    """A watched key's full current state."""

    key: Key
    age_ms: int
    stale: bool


@dataclass(frozen=True, slots=True)
class RevokedEvent:
    """A watched key that must no longer be used."""

    key_id: str
    reason: RevokeReason


@dataclass(frozen=True, slots=True)
class GetResult:
    """The results of a ``get``."""

    key: Key
    age_ms: int
    stale: bool


Response = Ok | ErrorReply
_RESPONSE_FRAMING = frozenset({"id", "ok"})
Event = UpdateEvent | RevokedEvent


def _want_int(value: object, where: str, minimum: int, maximum: int) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{where} must be an int, not {_kind(value)}")
    if not minimum <= value <= maximum:
        raise ProtocolError(f"{where} must be in {minimum}..{maximum}")
    return value


def _want_str(value: object, where: str) -> str:
    if type(value) is not str:
        raise ProtocolError(f"{where} must be a str, not {_kind(value)}")
    return value


def _want_optional_str(value: object, where: str) -> str | None:
    return None if value is None else _want_str(value, where)


def _want_bool(value: object, where: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"{where} must be a bool, not {_kind(value)}")
    return value


def _want_map(value: object, where: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise ProtocolError(f"{where} must be a map, not {_kind(value)}")
    return value


def _want_key_id(value: object, where: str) -> str:
    key_id = _want_str(value, where)
    if not is_valid_key_id(key_id):
        raise ProtocolError(f"{where} {_quote(key_id)} is not a key id")
    return key_id


def parse_hello_reply(msg: Mapping[str, Any]) -> HelloReply | ErrorReply:
    """knoxd's answer to the client's hello: the reply, or the error frame it sent instead.

    Raises :class:`ProtocolError` (code ``version`` if knoxd speaks another version).
    """
    if msg.get("ok") is False:
        return _parse_error_reply(msg)
    if msg.get("op") != "hello" or msg.get("magic") != MAGIC:
        raise ProtocolError(f"the server's first frame is not a {MAGIC} hello")
    v = _want_int(msg.get("v"), "hello 'v'", MIN_INT64, MAX_UINT64)
    if v != VERSION:
        raise ProtocolError(
            f"the server speaks protocol version {v}, not {VERSION}", ErrorCode.VERSION
        )
    peer = _want_map(msg.get("peer"), "hello 'peer'")
    return HelloReply(
        server=_want_str(msg.get("server"), "hello 'server'"),
        uid=_want_int(peer.get("uid"), "hello 'peer.uid'", 0, MAX_UINT32),
        gid=_want_int(peer.get("gid"), "hello 'peer.gid'", 0, MAX_UINT32),
        unit=_want_optional_str(peer.get("unit"), "hello 'peer.unit'"),
        identity=_want_optional_str(msg.get("identity"), "hello 'identity'"),
    )


def _parse_error_reply(msg: Mapping[str, Any]) -> ErrorReply:
    request_id = msg.get("id")
    if request_id is not None:
        request_id = _want_int(request_id, "response 'id'", 0, MAX_UINT32)
    err = _want_map(msg.get("error"), "response 'error'")
    code_text = _want_str(err.get("code"), "'error.code'")
    code = _ERROR_CODES.get(code_text)
    if code is None:
        raise ProtocolError(f"unknown error code {_quote(code_text)}")
    return ErrorReply(
        request_id,
        code,
        _want_str(err.get("message"), "'error.message'"),
        _want_bool(err.get("retry"), "'error.retry'"),
    )


def parse_response(msg: Mapping[str, Any]) -> Response | Event:
    """The typed form of a message from knoxd after the hello. Unknown result fields are kept
    in :attr:`Ok.results`; unknown fields of errors and events are ignored.

    Raises :class:`ProtocolError` for anything that is neither a response nor an event.
    """
    if "event" in msg:
        return _parse_event(msg)
    flag = msg.get("ok")
    if flag is True:
        request_id = _want_int(msg.get("id"), "response 'id'", 0, MAX_UINT32)
        return Ok(request_id, {k: v for k, v in msg.items() if k not in _RESPONSE_FRAMING})
    if flag is False:
        return _parse_error_reply(msg)
    raise ProtocolError("a message from knoxd must carry 'ok' (a bool) or 'event'")


def _parse_event(msg: Mapping[str, Any]) -> Event:
    event = msg.get("event")
    if event == "update":
        return UpdateEvent(
            key_from_cached(msg.get("key"), "event 'key'"),
            _want_int(msg.get("age_ms"), "event 'age_ms'", 0, MAX_UINT64),
            _want_bool(msg.get("stale"), "event 'stale'"),
        )
    if event == "revoked":
        key_id = _want_key_id(msg.get("key_id"), "event 'key_id'")
        reason = _REVOKE_REASONS.get(_want_str(msg.get("reason"), "event 'reason'"))
        if reason is None:
            raise ProtocolError("event 'reason' must be 'deleted' or 'forbidden'")
        return RevokedEvent(key_id, reason)
    what = _quote(event) if isinstance(event, str) else f"of type {_kind(event)}"
    raise ProtocolError(f"unknown event {what}")


def key_from_cached(obj: object, where: str = "key") -> Key:
    """The :class:`~knox.model.Key` a cached key map describes (with an empty ACL).

    Raises :class:`ProtocolError`, naming the field (``where`` names the map), unless the map
    holds a key id, a hash and a non-empty version list whose first version is the only Primary
    and the rest Active, each with a distinct uint64 id, an int64 ``ts`` and ``bin`` data. The
    data never appears in a message. Unknown fields are ignored.
    """
    try:
        return _key_from_cached(obj)
    except ProtocolError as exc:
        # Field paths are assembled only on failure: formatting them eagerly would double the
        # cost of decoding a key.
        raise ProtocolError(f"{where}{exc}") from None


def _key_from_cached(obj: object) -> Key:
    key_map = _want_map(obj, "")
    key_id = _want_key_id(key_map.get("id"), ".id")
    key_hash = _want_str(key_map.get("hash"), ".hash")
    raw_versions = key_map.get("versions")
    if type(raw_versions) is not list or not raw_versions:
        raise ProtocolError(".versions must be a non-empty array")
    versions: list[KeyVersion] = []
    seen: set[int] = set()
    for index, raw in enumerate(raw_versions):
        try:
            version = _cached_version(raw, _ACTIVE if index else _PRIMARY)
            if version.id in seen:
                raise ProtocolError(".id repeats an earlier version's")
        except ProtocolError as exc:
            raise ProtocolError(f".versions[{index}]{exc}") from None
        seen.add(version.id)
        versions.append(version)
    return Key(key_id, (), tuple(versions), key_hash)


# (status, its wire name): reading an enum member's ``.value`` costs more than a dict lookup.
_PRIMARY = (VersionStatus.PRIMARY, VersionStatus.PRIMARY.value)
_ACTIVE = (VersionStatus.ACTIVE, VersionStatus.ACTIVE.value)


def _cached_version(obj: object, expected: tuple[VersionStatus, str]) -> KeyVersion:
    status, name = expected
    version_map = _want_map(obj, "")
    version_id = _want_int(version_map.get("id"), ".id", 0, MAX_UINT64)
    if _want_str(version_map.get("status"), ".status") != name:
        raise ProtocolError(f".status must be {name!r}")
    ts = _want_int(version_map.get("ts"), ".ts", MIN_INT64, MAX_INT64)
    data = version_map.get("data")
    if type(data) is not bytes:
        raise ProtocolError(f".data must be bin, not {_kind(data)}")
    return KeyVersion(version_id, data, status, ts)


def get_result(response: Ok) -> GetResult:
    """The results of a ``get`` response. Raises :class:`ProtocolError` if malformed."""
    results = response.results
    return GetResult(
        key_from_cached(results.get("key")),
        _want_int(results.get("age_ms"), "'age_ms'", 0, MAX_UINT64),
        _want_bool(results.get("stale"), "'stale'"),
    )


def keys_result(response: Ok, name: str) -> tuple[str, ...]:
    """A key-list result (``registered``, ``unregistered``, ``watching``). Raises
    :class:`ProtocolError` if it is missing or not an array of key ids."""
    value = response.results.get(name)
    if type(value) is not list:
        raise ProtocolError(f"{name!r} must be an array, not {_kind(value)}")
    return tuple(_want_key_id(item, f"'{name}[{index}]'") for index, item in enumerate(value))
