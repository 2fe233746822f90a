"""The Knox v0 HTTP API as an ASGI application.

:func:`create_app` builds a plain ASGI callable (no framework router: the Go server's exact
routing answers, 405 before authentication and JSON 404 after it, are simpler to state directly
than to bend a router into, and the per-request cost stays a few string operations). Routes,
parameters, error codes, texts and HTTP statuses are Pinterest Knox's (``server/routes.go``,
``server/api.go``) as observed on a running reference build:

============================================  ===========  ========  ============================
route                                         id           authz     success ``data``
============================================  ===========  ========  ============================
``GET /v0/keys/`` (optionally ``?id=hash…``)  getkeys      —         key ids (changed ones only
                                                                     with a query)
``POST /v0/keys/`` form id, data, acl         postkeys     a user    the Primary version id
``GET /v0/keys/{id}/?status="Active"``        getkey       Read      the key, ACL emptied
``DELETE /v0/keys/{id}/``                     deletekey    Admin     null
``GET /v0/keys/{id}/access/``                 getaccess    —         the ACL
``PUT /v0/keys/{id}/access/`` form access|acl putaccess    Admin     null
``POST /v0/keys/{id}/versions/`` form data    postversion  Write     the new version id
``PUT /v0/keys/{id}/versions/{vid}/`` status  putversion   Write     null
============================================  ===========  ========  ============================

Request handling, in Go's order: a known path with the wrong method gets 405 with an empty body
before anything else; the form body is read (bounded); the ``Authorization`` header and peer
certificate are authenticated (401, code 5); an unknown path gets 404, code 8; then the handler.
Every response is the v0 envelope with ``Content-Type: application/json`` and
``X-Content-Type-Options: nosniff``; every request (but ``/healthz``) yields one audit record.

Deliberate departures from the Go server, each invisible to a well-behaved Knox client:

* paths with empty, ``.`` or ``..`` segments get 404 code 8 instead of gorilla/mux's 301 redirect;
* a malformed form body (bad percent escape, ``;`` separator, invalid UTF-8) gets 400 code 11
  naming the problem, where Go silently sees no form fields ("Missing parameter …");
* a body over ``max_body_bytes`` gets 400 code 11 before authentication (Go reads up to 10 MB);
* ACL entries of an unknown principal type are refused with code 13 (Go stores them, then cannot
  encode the ACL);
* a version id collision on add is retried with a fresh id (Go answers 500);
* unless ``knox_compat_list``, ``GET /v0/keys/`` lists only keys the caller may Read (upstream
  PR #128), decided from the stored ACL without decrypting anything;
* writes to one key queue within the process, and a race lost to another process (another
  worker) is retried ``write_retries`` times before answering code 1 (Go answers 500 at once).

``GET /healthz`` answers 200 ``ok`` without authentication or audit. So does ``GET /metrics``
(Prometheus text format, see :mod:`knox_server.metrics`: counts and timings, never a key id) unless
``AppSettings.metrics`` is off; then ``/metrics`` is an unknown route like any other.

**Long-poll** (an extension a Go client never triggers): a change check (``GET /v0/keys/?id=hash…``)
with ``Prefer: wait=N`` (RFC 7240; ``N`` capped at ``max_wait_seconds``) is answered at once if
anything already differs, and otherwise held until a :class:`~knox_server.changes.ChangeHub`
announces a change to one of the listed keys (then re-checked) or ``N`` seconds pass; the answer
carries ``Preference-Applied: wait=N``. With the preference, a listed key the caller holds (a
non-empty hash) but may no longer Read counts as changed too, so that a revocation reaches the
caller (its GET then answers 403); this tells the caller nothing that GET would not. Unknown ids
are dropped as always (a deleted key is noticed by the caller's revalidation). When the hub's
``max_waiters`` requests are already held, the check is answered at once without
``Preference-Applied`` (the caller polls instead). A held request whose client goes away is
dropped at once. Every successful write announces its key to the hub. Without the preference,
the change check is exactly the one described above.

**Bulk change check** (an extension): ``POST /v0/changes/`` with the same ``id=hash`` pairs as a
form body (up to :data:`MAX_CHANGES_BODY_BYTES`), the same semantics and the same long-poll. A URL
carries about 600 keys; the body carries thousands, so a host's whole registration is one request.
Go Knox answers it 404 code 8 (an unknown route), which tells a client to use the query form.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import re
import secrets
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote_plus

import structlog
import trio

from knox.errors import (
    HTTP_STATUS,
    BadKeyFormatError,
    BadPrincipalError,
    BadRequestDataError,
    Code,
    ConcurrentChangeError,
    InternalError,
    KeyExistsError,
    KeyNotFoundError,
    KnoxError,
    NoKeyDataError,
    NoKeyIDError,
    RouteNotFoundError,
    UnauthorizedError,
)
from knox.model import (
    ACL,
    ERR_ACL_UNKNOWN_TYPE,
    Access,
    AccessType,
    Key,
    KeyVersion,
    Machine,
    PrincipalMux,
    PrincipalType,
    Service,
    User,
    VersionStatus,
    acl_add,
    acl_allows,
    acl_validate,
    is_valid_key_id,
    update_status,
    validate_principal,
    version_hash,
)
from knox.wire import (
    MAX_UINT64,
    WireError,
    acl_to_obj,
    decode_access,
    decode_acl,
    error_envelope,
    key_to_obj,
    ok_envelope,
)
from knox_server.audit import AuditLog, AuditRecord, new_request_id
from knox_server.auth import AuthResult
from knox_server.changes import ChangeHub, Subscription
from knox_server.metrics import ServerMetrics
from knox_server.store import KeyMeta, KeyStore, StoredKey, StoredVersion

__all__ = [
    "CHANGES_PATH",
    "MAX_CHANGES_BODY_BYTES",
    "MAX_WAIT_SECONDS",
    "AppSettings",
    "Authenticates",
    "KnoxApp",
    "Sealer",
    "create_app",
    "decode_base64",
    "parse_form",
    "parse_prefer",
    "parse_query",
    "parse_status",
    "parse_version_id",
    "prefer_wait",
]

log = structlog.get_logger("knox_server.app")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_T = TypeVar("_T")

_KEYS_PREFIX = "/v0/keys/"
_FORM_TYPE = "application/x-www-form-urlencoded"
_JSON_HEADERS = [(b"content-type", b"application/json"), (b"x-content-type-options", b"nosniff")]
_INTERNAL_ERROR = "Internal Server Error"
# Before retry n (from 0), wait a random time up to 2**n ms, so racing writers spread out.
_RETRY_BASE_US = 1000
MAX_WAIT_SECONDS = 60
CHANGES_PATH = "/v0/changes/"
# About 10,000 keys of typical length.
MAX_CHANGES_BODY_BYTES = 1024 * 1024


class Sealer(Protocol):
    """What the app needs from :class:`knox_server.crypto.MasterKeyring`."""

    def seal(self, key_id: str, version_id: int, ts: int, plaintext: bytes) -> bytes: ...

    def open(self, key_id: str, version_id: int, ts: int, sealed: bytes) -> bytes: ...


class Authenticates(Protocol):
    """What the app needs from :class:`knox_server.auth.Authenticator`."""

    def authenticate(self, header: str | None, client_cert_chain: Sequence[str]) -> AuthResult: ...


@dataclass(frozen=True, slots=True)
class AppSettings:
    """Behaviour knobs. ``host`` is the envelope's ``host`` field; ``default_acl`` entries are
    added (``acl_add``) to every new key after the creator's Admin entry; ``clock`` gives
    nanoseconds since the epoch for envelopes, new versions and audit records.
    ``max_wait_seconds`` caps a long-poll's ``Prefer: wait``. ``metrics``: serve ``GET /metrics``
    (without authentication: Prometheus scrapers rarely hold client certificates, and the figures
    name no key)."""

    host: str
    default_acl: tuple[Access, ...] = ()
    knox_compat_list: bool = False
    max_body_bytes: int = 64 * 1024
    write_retries: int = 5
    max_wait_seconds: int = MAX_WAIT_SECONDS
    metrics: bool = True
    clock: Callable[[], int] = time.time_ns

    def __post_init__(self) -> None:
        if self.max_body_bytes < 0:
            raise ValueError("max_body_bytes must not be negative")
        if self.write_retries < 0:
            raise ValueError("write_retries must not be negative")
        if self.max_wait_seconds < 0:
            raise ValueError("max_wait_seconds must not be negative")


# --- pure request parsing ----------------------------------------------------------------------

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_STATUSES = {f'"{s.value}"': s for s in VersionStatus}
_STD_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_URL_B64 = re.compile(r"[A-Za-z0-9_-]*")
_STD_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_URL_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def parse_form(body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body; the **first** value of a repeated field wins
    (Go's ``PostForm[name][0]``). Raises :class:`BadRequestDataError` for a body Go's
    ``ParseForm`` would reject (bad percent escape, ``;`` separator) or that is not UTF-8."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestDataError("invalid form body: not UTF-8") from None
    bad = _BAD_ESCAPE.search(text)
    if bad is not None:
        raise BadRequestDataError(f'invalid URL escape "{text[bad.start() : bad.start() + 3]}"')
    form: dict[str, str] = {}
    for part in text.split("&"):
        if not part:
            continue
        if ";" in part:
            raise BadRequestDataError("invalid semicolon separator in query")
        name, _, value = part.partition("=")
        if "%" in part or "+" in part:
            try:
                name = unquote_plus(name, errors="strict")
                value = unquote_plus(value, errors="strict")
            except UnicodeDecodeError:
                raise BadRequestDataError("invalid form body: not UTF-8") from None
        form.setdefault(name, value)
    return form


def parse_query(query: str, *, last_wins: bool) -> dict[str, str]:
    """A query string as Go's ``url.ParseQuery`` reads it: pairs with a bad escape or a ``;`` are
    skipped, ``+`` is a space, a name without ``=`` has the value ``""``. Never raises."""
    if not query:
        return {}
    if not ("%" in query or "+" in query or ";" in query):
        # The common case (the change check's ``id=hash&…``): nothing to decode or skip.
        pairs = [part.partition("=") for part in query.split("&") if part]
        if last_wins:
            return {name: value for name, _, value in pairs}
        return {name: value for name, _, value in reversed(pairs)}
    out: dict[str, str] = {}
    encoded = "%" in query or "+" in query
    for part in query.split("&"):
        if not part or ";" in part:
            continue
        name, _, value = part.partition("=")
        if encoded and ("%" in part or "+" in part):
            if _BAD_ESCAPE.search(part) is not None:
                continue
            name, value = unquote_plus(name), unquote_plus(value)
        if last_wins:
            out[name] = value
        else:
            out.setdefault(name, value)
    return out


def parse_status(raw: str) -> VersionStatus:
    """A JSON-quoted status (``"Active"`` with the quotes), as Knox's ``UnmarshalJSON`` takes it.
    Raises :class:`BadRequestDataError` with Knox's text."""
    status = _STATUSES.get(raw)
    if status is None:
        raise BadRequestDataError("json: Invalid VersionStatus to convert")
    return status


def _go_quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def parse_version_id(raw: str) -> int:
    """A decimal uint64, as Go's ``strconv.ParseUint(s, 10, 64)``; its error texts."""
    if not raw or not raw.isascii() or not raw.isdigit():
        raise BadRequestDataError(f"strconv.ParseUint: parsing {_go_quote(raw)}: invalid syntax")
    # Checking the length first keeps int() away from huge digit strings.
    if len(raw.lstrip("0")) > 20 or int(raw) > MAX_UINT64:
        raise BadRequestDataError(
            f"strconv.ParseUint: parsing {_go_quote(raw)}: value out of range"
        )
    return int(raw)


_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t\x20-\x7e\x80-\xff])*"'
_WORD = rf"(?:{_TCHARS}|{_QUOTED})"
_PREFERENCE = re.compile(
    rf"[ \t]*({_TCHARS})(?:[ \t]*=[ \t]*({_WORD}))?"
    rf"(?:[ \t]*;(?:[ \t]*{_TCHARS}(?:[ \t]*=[ \t]*{_WORD})?)?)*[ \t]*"
)
_QUOTED_PAIR = re.compile(r"\\(.)")
# delta-seconds longer than this is capped anyway; checking first keeps int() off huge strings.
_MAX_WAIT_DIGITS = 9


def _list_elements(value: str) -> list[str]:
    """A comma-separated header value split at the commas outside quoted strings."""
    elements: list[str] = []
    start, quoted, escaped = 0, False, False
    for i, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            elements.append(value[start:i])
            start = i + 1
    elements.append(value[start:])
    return elements


def parse_prefer(value: str) -> dict[str, str]:
    """The preferences of a ``Prefer`` header (RFC 7240): lower-cased name → value (unquoted;
    ``""`` without one). The first occurrence of a name wins; parameters after ``;`` and
    elements that do not parse are ignored, as the RFC asks. Never raises."""
    preferences: dict[str, str] = {}
    for element in _list_elements(value):
        match = _PREFERENCE.fullmatch(element)
        if match is None:
            continue
        name, word = match.group(1).lower(), match.group(2) or ""
        if word.startswith('"'):
            word = _QUOTED_PAIR.sub(r"\1", word[1:-1])
        preferences.setdefault(name, word)
    return preferences


def prefer_wait(value: str | None, cap: int) -> int | None:
    """The ``wait`` preference of a ``Prefer`` header in seconds, at most ``cap``; None if there
    is none or its value is not delta-seconds (then the preference is ignored)."""
    if not value:
        return None
    wait = parse_prefer(value).get("wait")
    if wait is None or not wait.isascii() or not wait.isdigit():
        return None
    if len(wait.lstrip("0")) > _MAX_WAIT_DIGITS:
        return cap
    return min(int(wait), cap)


def _base64_error_offset(text: str, alphabet: frozenset[str], padded: bool) -> int | None:
    """The offset Go's decoder reports for ``text``, or None if Go accepts it (Go skips CR and
    LF anywhere). A transcription of the error paths of Go's ``decodeQuantum``."""
    n, si = len(text), 0
    while True:
        j = 0
        while j < 4:
            if si == n:
                if j == 1 or (padded and j > 0):
                    return si - j
                return None
            c = text[si]
            si += 1
            if c in "\r\n":
                continue
            if c in alphabet:
                j += 1
                continue
            if c != "=" or not padded or j < 2:
                return si - 1
            if j == 2:
                while si < n and text[si] in "\r\n":
                    si += 1
                if si == n:
                    return n
                if text[si] != "=":
                    return si - 1
                si += 1
            while si < n and text[si] in "\r\n":
                si += 1
            return si if si < n else None


def decode_base64(text: str, *, raw_url: bool = False) -> bytes:
    """Go's ``base64.StdEncoding.DecodeString`` (or ``RawURLEncoding`` with ``raw_url``).

    Raises :class:`BadRequestDataError` with Go's text, "illegal base64 data at input byte N".
    """
    if raw_url:
        if len(text) % 4 != 1 and _URL_B64.fullmatch(text) is not None:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    elif _STD_B64.fullmatch(text) is not None:
        return base64.b64decode(text)
    offset = _base64_error_offset(
        text, _URL_ALPHABET if raw_url else _STD_ALPHABET, padded=not raw_url
    )
    if offset is not None:
        raise BadRequestDataError(f"illegal base64 data at input byte {offset}")
    return decode_base64(text.replace("\r", "").replace("\n", ""), raw_url=raw_url)


def _parse_access_param(text: str) -> Access:
    """``PUT …/access/``'s ``access``: JSON, or failing that base64-RawURL of JSON; as in Go,
    the error reported is the fallback's."""
    try:
        return decode_access(text)
    except WireError:
        pass
    decoded = decode_base64(text, raw_url=True)
    try:
        return decode_access(decoded)
    except UnicodeDecodeError:
        raise BadRequestDataError("invalid JSON in access") from None


# --- routing -----------------------------------------------------------------------------------


class _Path(enum.Enum):
    KEYS = "/v0/keys/"
    KEY = "/v0/keys/{keyID}/"
    ACCESS = "/v0/keys/{keyID}/access/"
    VERSIONS = "/v0/keys/{keyID}/versions/"
    VERSION = "/v0/keys/{keyID}/versions/{versionID}/"


_ROUTE_IDS: dict[tuple[_Path, str], str] = {
    (_Path.KEYS, "GET"): "getkeys",
    (_Path.KEYS, "POST"): "postkeys",
    (_Path.KEY, "GET"): "getkey",
    (_Path.KEY, "DELETE"): "deletekey",
    (_Path.ACCESS, "GET"): "getaccess",
    (_Path.ACCESS, "PUT"): "putaccess",
    (_Path.VERSIONS, "POST"): "postversion",
    (_Path.VERSION, "PUT"): "putversion",
}
# The form fields each route reads (Knox's PostParameters), in the audit record too.
_FORM_FIELDS: dict[str, tuple[str, ...]] = {
    "postkeys": ("id", "data", "acl"),
    "putaccess": ("access", "acl"),
    "postversion": ("data",),
    "putversion": ("status",),
}


def _match(path: str) -> tuple[_Path, str | None, str | None] | None:
    """``(path kind, keyID, versionID)`` for a v0 path, None for anything else. Segments are
    already percent-decoded; empty, ``.`` and ``..`` segments never match."""
    if not path.startswith(_KEYS_PREFIX) or not path.endswith("/"):
        return None
    if len(path) == len(_KEYS_PREFIX):
        return _Path.KEYS, None, None
    parts = path[len(_KEYS_PREFIX) : -1].split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    if len(parts) == 1:
        return _Path.KEY, parts[0], None
    if len(parts) == 2 and parts[1] == "access":
        return _Path.ACCESS, parts[0], None
    if len(parts) == 2 and parts[1] == "versions":
        return _Path.VERSIONS, parts[0], None
    if len(parts) == 3 and parts[1] == "versions":
        return _Path.VERSION, parts[0], parts[2]
    return None


# --- authorization helpers ---------------------------------------------------------------------


class _ReadFilter:
    """Whether one principal may Read a key, for the list routes' per-key check.

    Equal to ``acl_allows(acl, principal, Read)``, but cheap per entry: entry types none of the
    principals can match are skipped, exact (type, id) matches are set lookups, and prefix entries
    are decided by the model once per distinct entry per request.
    """

    __slots__ = ("_exact", "_memo", "_model_only", "_principal", "_types")

    _PREFIX_TYPES = frozenset({PrincipalType.MACHINE_PREFIX, PrincipalType.SERVICE_PREFIX})

    def __init__(self, principal: PrincipalMux) -> None:
        self._principal = principal
        self._exact: set[tuple[PrincipalType, str]] = set()
        self._types: set[PrincipalType] = set()
        self._memo: dict[Access, bool] = {}
        self._model_only = False
        for _, p in principal.principals:
            if isinstance(p, User):
                self._types |= {PrincipalType.USER, PrincipalType.USER_GROUP}
                self._exact.add((PrincipalType.USER, p.id))
                self._exact.update((PrincipalType.USER_GROUP, g) for g in p.groups)
            elif isinstance(p, Machine):
                self._types |= {PrincipalType.MACHINE, PrincipalType.MACHINE_PREFIX}
                self._exact.add((PrincipalType.MACHINE, p.id))
            elif isinstance(p, Service):
                self._types |= {PrincipalType.SERVICE, PrincipalType.SERVICE_PREFIX}
                self._exact.add((PrincipalType.SERVICE, p.id))
            else:
                self._model_only = True  # a principal class this shortcut does not know

    def __call__(self, acl: ACL) -> bool:
        if self._model_only:
            return acl_allows(acl, self._principal, AccessType.READ)
        for entry in acl:
            kind = entry.type
            if kind not in self._types or entry.access is AccessType.NONE:
                continue
            if kind in self._PREFIX_TYPES:
                allowed = self._memo.get(entry)
                if allowed is None:
                    allowed = acl_allows((entry,), self._principal, AccessType.READ)
                    self._memo[entry] = allowed
                if allowed:
                    return True
            elif (kind, entry.id) in self._exact:
                return True
        return False


def _require(stored: StoredKey, principal: PrincipalMux, needed: AccessType, verb: str) -> None:
    if not acl_allows(stored.acl, principal, needed):
        raise UnauthorizedError(f"Principal {principal.id} not authorized to {verb} {stored.id}")


def _no_such_key(key_id: str) -> KeyNotFoundError:
    return KeyNotFoundError(f"No such key {key_id}")


def _hash(versions: Iterable[StoredVersion]) -> str:
    return version_hash(KeyVersion(v.id, b"", v.status, v.ts) for v in versions)


def _new_version_id(taken: Iterable[int]) -> int:
    """A random 63-bit version id, as Knox's ``rand.Int63``, not among ``taken``."""
    used = set(taken)
    while True:
        candidate = secrets.randbits(63)
        if candidate not in used:
            return candidate


# --- the application ---------------------------------------------------------------------------


class _Request:
    """What the app learns about one request as it goes, for the handler and the audit record."""

    __slots__ = (
        "auth",
        "body",
        "form_error",
        "form_fields",
        "headers",
        "key_id",
        "method",
        "params",
        "path",
        "preference_applied",
        "query",
        "query_ids",
        "receive",
        "request_id",
        "route",
        "scope",
        "started",
        "version_id",
    )

    def __init__(self, scope: Scope, route: str, key_id: str | None, version_id: str | None):
        self.started = time.perf_counter()
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: str = scope.get("query_string", b"").decode("utf-8", "replace")
        self.headers = _headers(scope)
        self.request_id = new_request_id()
        self.route = route
        self.key_id = key_id
        self.version_id = version_id
        self.params: dict[str, str] = {}
        if key_id is not None:
            self.params["keyID"] = key_id
        if version_id is not None:
            self.params["versionID"] = version_id
        self.body = b""
        self.form_fields: dict[str, str] = {}
        self.form_error: str | None = None
        self.auth: AuthResult | None = None
        self.query_ids: int | None = None
        self.receive: Receive | None = None
        self.preference_applied: int | None = None

    @property
    def principal(self) -> PrincipalMux:
        assert self.auth is not None
        return self.auth.principal

    def form(self) -> dict[str, str]:
        """The form fields. Raises :class:`BadRequestDataError` if the body was malformed."""
        if self.form_error is not None:
            raise BadRequestDataError(self.form_error)
        return self.form_fields


class _KeyLocks:
    """A FIFO lock per key id, existing only while some task holds or awaits it (so the table
    is bounded by the requests in flight)."""

    def __init__(self) -> None:
        self._slots: dict[str, tuple[trio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key_id: str) -> AsyncIterator[None]:
        slot = self._slots.get(key_id)
        if slot is None:
            slot = self._slots[key_id] = (trio.Lock(), [0])
        lock, users = slot
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._slots[key_id]


class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class KnoxApp:
    """The ASGI application. Build it with :func:`create_app`.

    Never lets an exception escape to the server: anything unexpected is logged with the request
    id and answered with code 1, "Internal Server Error".
    """

    def __init__(
        self,
        *,
        store: KeyStore,
        keyring: Sealer,
        authenticator: Authenticates,
        audit: AuditLog,
        settings: AppSettings,
        hub: ChangeHub,
        metrics: ServerMetrics,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._auth = authenticator
        self._audit = audit
        self._settings = settings
        self._hub = hub
        self._metrics = metrics
        self._key_locks = _KeyLocks()
        self._handlers: dict[str, Callable[[_Request], Awaitable[Any]]] = {
            "getkeys": self._get_keys,
            "postchanges": self._post_changes,
            "postkeys": self._post_keys,
            "getkey": self._get_key,
            "deletekey": self._delete_key,
            "getaccess": self._get_access,
            "putaccess": self._put_access,
            "postversion": self._post_version,
            "putversion": self._put_version,
        }

    @property
    def metrics(self) -> ServerMetrics:
        return self._metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    # -- the request pipeline --

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/healthz":
            if method == "GET":
                await _send(send, 200, [(b"content-type", b"text/plain")], b"ok\n")
            else:
                await _send(send, 405, [], b"")
            return
        if path == "/metrics" and self._settings.metrics:
            if method == "GET":
                body, content_type = self._metrics.render(_accept(scope))
                await _send(send, 200, [(b"content-type", content_type.encode("ascii"))], body)
            else:
                await _send(send, 405, [], b"")
            return
        matched = _match(path)
        if path == CHANGES_PATH:
            if method != "POST":
                await _send(send, 405, [], b"")
                return
            req = _Request(scope, "postchanges", None, None)
        elif matched is None:
            req = _Request(scope, "404", None, None)
        else:
            path_kind, key_id, version_id = matched
            route = _ROUTE_IDS.get((path_kind, method))
            if route is None:
                # gorilla/mux: a known path with another method is 405, before any decorator.
                req = _Request(scope, "405", key_id, version_id)
                self._record(req, None, 405, "")
                await _send(send, 405, [], b"")
                return
            req = _Request(scope, route, key_id, version_id)
        # Recorded as such if the request is cancelled (server shutdown) before it is answered.
        code, status, message = Code.INTERNAL_SERVER_ERROR, 0, "request cancelled"
        try:
            code, message, body = await self._answer(req, receive)
            status = HTTP_STATUS[code]
        except _Disconnected:
            message = "client disconnected"
            return
        finally:
            self._record(req, code, status, message)
        headers = _JSON_HEADERS
        if req.preference_applied is not None:
            applied = f"wait={req.preference_applied}".encode("ascii")
            headers = [*headers, (b"preference-applied", applied)]
        await _send(send, status, headers, body)

    async def _answer(self, req: _Request, receive: Receive) -> tuple[Code, str, bytes]:
        """The response code, message and envelope for ``req``; never raises but for
        cancellation or a client that went away."""
        settings = self._settings
        req.receive = receive
        try:
            try:
                if req.route in _FORM_FIELDS:
                    await self._read_form(req, receive)
                elif req.route == "postchanges":
                    await self._read_changes_body(req, receive)
                chain = _client_chain(req.scope)
                req.auth = self._auth.authenticate(req.headers.get(b"authorization"), chain)
                if req.route == "404":
                    raise RouteNotFoundError("")
                data = await self._handlers[req.route](req)
            except KnoxError as exc:
                if exc.code == Code.INTERNAL_SERVER_ERROR:
                    log.warning(
                        "request_failed",
                        request_id=req.request_id,
                        route=req.route,
                        error=exc.message,
                    )
                body = error_envelope(
                    exc.code, exc.message, host=settings.host, ts=settings.clock()
                )
                return exc.code, exc.message, body
            return Code.OK, "", ok_envelope(data, host=settings.host, ts=settings.clock())
        except _Disconnected:
            raise
        except Exception:
            # The traceback is rendered without local variables, so no secret reaches the log.
            log.exception("internal_error", request_id=req.request_id, route=req.route)
            body = error_envelope(
                Code.INTERNAL_SERVER_ERROR, _INTERNAL_ERROR, host=settings.host, ts=settings.clock()
            )
            return Code.INTERNAL_SERVER_ERROR, _INTERNAL_ERROR, body

    async def _read_form(self, req: _Request, receive: Receive) -> None:
        """Read and parse the body of a form route, before authentication as in Knox. A body over
        the limit fails the request (code 11); a malformed one fails only when a handler asks
        for its fields."""
        headers = req.headers
        limit = self._settings.max_body_bytes
        try:
            body = await _read_body(receive, headers.get(b"content-length"), limit)
        except _BodyTooLarge:
            raise BadRequestDataError(f"Request body larger than {limit} bytes") from None
        content_type = headers.get(b"content-type", "").partition(";")[0].strip().lower()
        if content_type != _FORM_TYPE:
            return  # Go's ParseForm ignores other bodies: every field is then missing.
        try:
            req.form_fields = parse_form(body)
        except BadRequestDataError as exc:
            req.form_error = exc.message
            return
        for name in _FORM_FIELDS[req.route]:
            if name in req.form_fields:
                req.params[name] = req.form_fields[name]

    async def _read_changes_body(self, req: _Request, receive: Receive) -> None:
        """The extension's body: the change query's ``id=hash`` pairs, form-encoded."""
        try:
            body = await _read_body(
                receive, req.headers.get(b"content-length"), MAX_CHANGES_BODY_BYTES
            )
        except _BodyTooLarge:
            raise BadRequestDataError(
                f"Request body larger than {MAX_CHANGES_BODY_BYTES} bytes"
            ) from None
        try:
            req.query = body.decode("ascii")
        except UnicodeDecodeError:
            raise BadRequestDataError("Change check body is not form-encoded") from None

    def _record(self, req: _Request, code: int | None, status: int, message: str) -> None:
        headers = req.headers
        tls = _tls(req.scope)
        client = req.scope.get("client")
        auth = req.auth
        self._audit.emit(
            AuditRecord(
                ts=self._settings.clock(),
                request_id=req.request_id,
                route=req.route,
                method=req.method,
                path=req.path,
                code=None if code is None else int(code),
                status=status,
                message=message,
                key_id=req.key_id,
                principal=auth.principal.id if auth else None,
                principals=tuple((prov, p.kind, p.id) for prov, p in auth.principal.principals)
                if auth
                else (),
                auth_type=auth.auth_type if auth else None,
                client=_address(client) if client else None,
                tls_version=tls.get("tls_version"),
                tls_cipher=tls.get("cipher_name"),
                client_cert=bool(tls.get("client_cert_chain")),
                user_agent=headers.get(b"user-agent") or "unknown",
                params=req.params,
                query_ids=req.query_ids,
            )
        )
        self._metrics.request_done(
            req.route, None if code is None else int(code), time.perf_counter() - req.started
        )

    # -- reads --

    async def _get_keys(self, req: _Request) -> list[str]:
        wanted = parse_query(req.query, last_wins=True)
        if not wanted:
            metas = await self._store.meta(None)
            return self._visible(req.principal, metas, None)
        req.query_ids = len(wanted)
        wait = prefer_wait(req.headers.get(b"prefer"), self._settings.max_wait_seconds)
        if wait is not None:
            subscription = self._hub.subscribe(wanted)
            if subscription is not None:
                with subscription:
                    changed = await self._long_poll(req, wanted, subscription, wait)
                req.preference_applied = wait
                return changed
        return await self.changed_key_ids(req.principal, wanted)

    async def _post_changes(self, req: _Request) -> list[str]:
        """``POST /v0/changes/``: the change check with its pairs in the body, so 1,000 keys fit
        one request (a URL carries about 600). Never a listing: an empty body changes nothing."""
        if not req.query:
            return []
        return await self._get_keys(req)

    async def _long_poll(
        self, req: _Request, wanted: Mapping[str, str], subscription: Subscription, wait: int
    ) -> list[str]:
        """The long-poll answer: at once if anything differs, else once a change announced for
        a listed key makes something differ, else (re-checked) after ``wait`` seconds. Raises
        :class:`_Disconnected` if the client goes away meanwhile."""
        deadline = trio.current_time() + wait
        changed = await self._differing_key_ids(req.principal, wanted)
        if changed or wait == 0:
            return changed
        assert req.receive is not None
        while True:
            announced = await _hold(subscription, deadline, req.receive)
            # At the deadline too: a change the feed failed to announce is still answered.
            changed = await self._differing_key_ids(req.principal, wanted)
            if changed or not announced:
                return changed

    async def _differing_key_ids(
        self, principal: PrincipalMux, wanted: Mapping[str, str]
    ) -> list[str]:
        """The long-poll's change check: :meth:`changed_key_ids`, plus every listed key the
        caller holds (a non-empty hash) but may no longer Read."""
        metas = await self._store.meta(list(wanted))
        compat = self._settings.knox_compat_list
        readable = _ReadFilter(principal)
        differing: list[str] = []
        for key_id, held in wanted.items():
            meta = metas.get(key_id)
            if meta is None:
                continue
            if readable(meta.acl):
                if meta.hash != held:
                    differing.append(key_id)
            elif held or (compat and meta.hash != held):
                differing.append(key_id)
        return differing

    async def changed_key_ids(
        self, principal: PrincipalMux, wanted: Mapping[str, str]
    ) -> list[str]:
        """Knox's change check: of the ``{key id: hash}`` the caller holds, the ids that exist and
        whose hash differs (``""`` always differs), restricted to keys the caller may Read
        unless ``knox_compat_list``. Unknown ids are dropped."""
        metas = await self._store.meta(list(wanted))
        return self._visible(principal, metas, wanted)

    def _visible(
        self,
        principal: PrincipalMux,
        metas: Mapping[str, KeyMeta],
        wanted: Mapping[str, str] | None,
    ) -> list[str]:
        if wanted is not None:
            metas = {k: m for k, m in metas.items() if k in wanted and m.hash != wanted[k]}
        if self._settings.knox_compat_list:
            return list(metas)
        readable = _ReadFilter(principal)
        return [key_id for key_id, meta in metas.items() if readable(meta.acl)]

    async def _load(self, key_id: str) -> StoredKey:
        """The stored key; a syntactically impossible id is not looked up (Knox does not validate
        ids on reads, and answers "No such key" for them too)."""
        stored = await self._store.get(key_id) if is_valid_key_id(key_id) else None
        if stored is None:
            raise _no_such_key(key_id)
        return stored

    async def _get_key(self, req: _Request) -> Any:
        assert req.key_id is not None
        status = VersionStatus.ACTIVE
        raw_status = parse_query(req.query, last_wins=False).get("status")
        if raw_status is not None:
            req.params["status"] = raw_status
            status = parse_status(raw_status)
        stored = await self._load(req.key_id)
        _require(stored, req.principal, AccessType.READ, "read")
        rank = status.rank
        versions = tuple(
            KeyVersion(v.id, self._keyring.open(stored.id, v.id, v.ts, v.sealed), v.status, v.ts)
            for v in stored.versions
            if v.status.rank <= rank
        )
        # The ACL is sent empty, as Knox does since PR #36, so cached copies never go stale.
        return key_to_obj(Key(id=stored.id, acl=(), versions=versions, hash=stored.hash))

    async def _get_access(self, req: _Request) -> Any:
        assert req.key_id is not None
        stored = await self._load(req.key_id)
        return acl_to_obj(stored.acl)

    # -- writes --

    async def _post_keys(self, req: _Request) -> int:
        principal = req.principal
        # Knox's IsUser looks at the default principal only.
        if not isinstance(principal.default, User):
            raise UnauthorizedError(f"Must be a user to create keys, principal is {principal.id}")
        form = req.form()
        key_id = form.get("id")
        if key_id is None:
            raise NoKeyIDError("Missing parameter 'id'")
        req.key_id = key_id
        data = form.get("data")
        if data is None:
            raise NoKeyDataError("Missing parameter 'data'")
        if not data:
            raise NoKeyDataError("Parameter 'data' is empty")
        acl: ACL = ()
        if "acl" in form:
            acl = decode_acl(form["acl"])
        plaintext = decode_base64(data)
        if not is_valid_key_id(key_id):
            raise BadKeyFormatError(f"KeyID includes unsupported characters {key_id}")
        acl = acl_add(acl, Access(PrincipalType.USER, principal.id, AccessType.ADMIN))
        for entry in self._settings.default_acl:
            acl = acl_add(acl, entry)
        if any(e.type is PrincipalType.UNKNOWN for e in acl):
            raise BadPrincipalError(ERR_ACL_UNKNOWN_TYPE)
        acl_validate(acl)
        version_id = _new_version_id(())
        ts = self._settings.clock()
        sealed = self._keyring.seal(key_id, version_id, ts, plaintext)
        versions = (StoredVersion(version_id, sealed, VersionStatus.PRIMARY, ts),)
        try:
            await self._store.add(StoredKey(key_id, acl, versions, _hash(versions)))
        except KeyExistsError:
            raise KeyExistsError(f"Key {key_id} already exists") from None
        self._hub.notify(key_id)
        return version_id

    async def _delete_key(self, req: _Request) -> None:
        assert req.key_id is not None
        stored = await self._load(req.key_id)
        _require(stored, req.principal, AccessType.ADMIN, "delete")
        if not await self._store.delete(stored.id):
            raise _no_such_key(stored.id)
        self._hub.notify(stored.id)

    async def _put_access(self, req: _Request) -> None:
        assert req.key_id is not None
        form = req.form()
        if "access" in form:
            changes: ACL = (_parse_access_param(form["access"]),)
        elif "acl" in form:
            changes = decode_acl(form["acl"])
        else:
            raise BadRequestDataError("Missing acl and access parameters")
        principal = req.principal

        def change(current: StoredKey) -> tuple[StoredKey, None]:
            _require(current, principal, AccessType.ADMIN, "update access for")
            for entry in changes:
                validate_principal(entry)
            acl = current.acl
            for entry in changes:
                acl = acl_add(acl, entry)
            acl_validate(acl)
            return replace(current, acl=acl), None

        await self._modify(req.key_id, change)

    async def _post_version(self, req: _Request) -> int:
        assert req.key_id is not None
        data = req.form().get("data")
        if data is None:
            raise BadRequestDataError("Missing parameter 'data'")
        if not data:
            raise BadRequestDataError("Parameter 'data' is empty")
        plaintext = decode_base64(data)
        principal = req.principal
        ts = self._settings.clock()

        def change(current: StoredKey) -> tuple[StoredKey, int]:
            _require(current, principal, AccessType.WRITE, "write")
            version_id = _new_version_id(v.id for v in current.versions)
            sealed = self._keyring.seal(current.id, version_id, ts, plaintext)
            versions = (
                *current.versions,
                StoredVersion(version_id, sealed, VersionStatus.ACTIVE, ts),
            )
            return replace(current, versions=versions, hash=_hash(versions)), version_id

        return await self._modify(req.key_id, change)

    async def _put_version(self, req: _Request) -> None:
        assert req.key_id is not None and req.version_id is not None
        raw_status = req.form().get("status")
        if raw_status is None:
            raise BadRequestDataError("Missing parameter 'status'")
        status = parse_status(raw_status)
        version_id = parse_version_id(req.version_id)
        principal = req.principal

        def change(current: StoredKey) -> tuple[StoredKey, None]:
            _require(current, principal, AccessType.WRITE, "write")
            light = tuple(KeyVersion(v.id, b"", v.status, v.ts) for v in current.versions)
            new_status = {v.id: v.status for v in update_status(light, version_id, status)}
            versions = tuple(replace(v, status=new_status[v.id]) for v in current.versions)
            return replace(current, versions=versions, hash=_hash(versions)), None

        await self._modify(req.key_id, change)

    async def _modify(self, key_id: str, change: Callable[[StoredKey], tuple[StoredKey, _T]]) -> _T:
        """Read → ``change`` (authorization and edit, may raise) → optimistic update.

        Writes to one key from this process queue on a per-key lock, so they never race each
        other; a race lost to another process re-reads and re-applies, up to ``write_retries``
        times, then fails with code 1.
        """
        retries = self._settings.write_retries
        async with self._key_locks.hold(key_id):
            for attempt in range(retries + 1):
                updated, result = change(await self._load(key_id))
                try:
                    await self._store.update(updated)
                except ConcurrentChangeError:
                    if attempt < retries:
                        await trio.sleep(secrets.randbelow(_RETRY_BASE_US << attempt) / 1e6)
                    continue
                except KeyNotFoundError:
                    raise _no_such_key(key_id) from None
                self._hub.notify(key_id)
                return result
        raise InternalError(f"Key {key_id} was changed concurrently; try again")


def create_app(
    *,
    store: KeyStore,
    keyring: Sealer,
    authenticator: Authenticates,
    audit: AuditLog,
    settings: AppSettings,
    hub: ChangeHub | None = None,
) -> KnoxApp:
    """The Knox v0 ASGI application over ``store``, sealing version data with ``keyring``.

    ``hub`` wakes long-polls; pass the one the store's change feed notifies when other processes
    write to the same store (PostgreSQL). By default the app has a hub of its own, which hears
    this app's writes only. The app's metrics (``app.metrics``) are its own."""
    hub = ChangeHub() if hub is None else hub
    return KnoxApp(
        store=store,
        keyring=keyring,
        authenticator=authenticator,
        audit=audit,
        settings=settings,
        hub=hub,
        metrics=ServerMetrics(hub=hub, audit=audit),
    )


# --- ASGI plumbing -----------------------------------------------------------------------------


_WANTED_HEADERS = frozenset(
    {b"authorization", b"user-agent", b"content-type", b"content-length", b"prefer"}
)
# Header fields that are lists: their lines are combined (RFC 9110, section 5.3).
_LIST_HEADERS = frozenset({b"prefer"})


def _headers(scope: Scope) -> dict[bytes, str]:
    """The request headers the app reads: the first occurrence of each (as Go's
    ``Header.Get``), or all lines joined by commas for a list field."""
    found: dict[bytes, str] = {}
    for name, value in scope.get("headers", ()):
        if name not in _WANTED_HEADERS:
            continue
        if name not in found:
            found[name] = value.decode("latin-1")
        elif name in _LIST_HEADERS:
            found[name] += "," + value.decode("latin-1")
    return found


def _accept(scope: Scope) -> str:
    """The ``Accept`` header's lines, joined (the scrape's format preference)."""
    return ",".join(
        value.decode("latin-1") for name, value in scope.get("headers", ()) if name == b"accept"
    )


def _tls(scope: Scope) -> Mapping[str, Any]:
    extensions = scope.get("extensions") or {}
    tls = extensions.get("tls")
    return tls if isinstance(tls, Mapping) else {}


def _client_chain(scope: Scope) -> Sequence[str]:
    chain = _tls(scope).get("client_cert_chain")
    return chain if isinstance(chain, list) else ()


def _address(client: Sequence[Any]) -> str:
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


async def _read_body(receive: Receive, content_length: str | None, limit: int) -> bytes:
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _hold(subscription: Subscription, deadline: float, receive: Receive) -> bool:
    """``subscription.wait(deadline)``, unless the client goes away first: then raises
    :class:`_Disconnected` (request body messages are discarded meanwhile)."""

    async def until_disconnect(scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(until_disconnect, nursery.cancel_scope)
        announced = await subscription.wait(deadline)
        nursery.cancel_scope.cancel()
        return announced
    raise _Disconnected


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode("ascii"))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
