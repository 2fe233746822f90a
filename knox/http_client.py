"""The Knox v0 HTTP API client (httpx on trio), shared by knoxd's upstream and ``knoxctl``.

Two layers, h11-style:

* **Pure request building and response interpretation**: :class:`ApiRequest` and the
  ``*_request`` builders produce exactly what Pinterest Knox's Go client sends (paths with trailing
  slashes, form bodies, JSON-quoted ``status``, the ``id1=hash1&id2=hash2`` change-check query with
  Go's ``url.Values.Encode`` escaping and ordering); :func:`interpret_response` and the ``parse_*``
  functions turn an HTTP status and body into a value or an exception. No I/O.
* **The I/O shell** :class:`KnoxHTTPClient`: sends those requests with one ``httpx.AsyncClient``
  (mTLS through the ``ssl.SSLContext`` it is given), fails over between base URLs, retries code 1,
  and bounds every attempt in time and size.

Errors, all subclasses of :class:`knox.errors.KnoxError`, so one ``except KnoxError`` covers them:

* an error envelope raises ``error_for_code(code, message)`` (404 code 4 → ``KeyNotFoundError`` …);
* a body that is not a Knox envelope raises :class:`knox.wire.WireError` (code 11), as does a
  fetched key that fails Knox's client-side checks or names another key;
* no server reachable, or a timeout, raises :class:`UpstreamUnavailable`; an HTTP 5xx without an
  envelope (a proxy, an overloaded server) raises its subclass :class:`UpstreamHTTPError`.

Messages name URLs, routes and key ids, never tokens, key data or private keys; the auth header
value is not part of any ``repr``.
"""

from __future__ import annotations

import base64
import math
import random
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote_plus

import httpx
import trio

from knox import __version__, wire
from knox.errors import Code, InternalError, KnoxError, RouteNotFoundError, error_for_code
from knox.model import (
    ACL,
    Access,
    Key,
    VersionStatus,
    validate_key_id,
    validate_versions,
    version_hash,
)

__all__ = [
    "CHANGES_PATH",
    "DEFAULT_TIMEOUT",
    "MAX_ATTEMPTS",
    "MAX_RESPONSE_BYTES",
    "MAX_TARGET_LENGTH",
    "USER_AGENT",
    "ApiRequest",
    "ApiResponse",
    "ChangeCheck",
    "KnoxHTTPClient",
    "UpstreamHTTPError",
    "UpstreamUnavailable",
    "add_version_request",
    "backoff_delay",
    "bulk_change_check_request",
    "change_check_requests",
    "create_key_request",
    "delete_key_request",
    "get_acl_request",
    "get_key_request",
    "interpret_response",
    "parse_acl",
    "parse_key",
    "parse_key_ids",
    "parse_preference_applied",
    "parse_version_id",
    "put_access_request",
    "ssl_context_for",
    "update_version_request",
]

USER_AGENT = f"Knox_Client/{__version__}"
DEFAULT_TIMEOUT = 10.0
#: Attempts per request when the server answers code 1 / HTTP 5xx (Knox's ``maxRetryAttempts``).
MAX_ATTEMPTS = 3
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 1.0
#: Longest request target (path and query) a change check sends: about 600 typical keys. httpx
#: refuses URLs over 64 KiB; Go's net/http accepts 1 MiB of request head and knox_server 64 KiB;
#: Knox's mTLS is end to end, so no 8 KiB-limited HTTP proxy sits in between.
MAX_TARGET_LENGTH = 60 * 1024
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
_MAX_MESSAGE_CHARS = 1024
_KEYS_PATH = "/v0/keys/"
#: knox_server's bulk change check (an extension): the ``id=hash`` pairs in a form body.
CHANGES_PATH = "/v0/changes/"
_IDEMPOTENT = frozenset({"GET", "PUT", "DELETE"})
# Parallel change-check requests when not long-polling (a long-poll needs every chunk in flight).
_CHECK_CONCURRENCY = 8


class UpstreamUnavailable(KnoxError):
    """No Knox server could be reached or answered in time. Worth retrying later, with backoff.

    Code 1 (internal) for ``KnoxError`` compatibility, but deliberately not an ``InternalError``:
    the server never said anything.
    """

    code = Code.INTERNAL_SERVER_ERROR


class UpstreamHTTPError(UpstreamUnavailable):
    """An HTTP 5xx without a Knox envelope (typically a proxy in front of the server)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


# --- pure: requests ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One v0 API call, transport-independent. ``query`` is already encoded."""

    method: str
    path: str
    query: str = ""
    form: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def target(self) -> str:
        """Path and query, as sent on the request line."""
        return f"{self.path}?{self.query}" if self.query else self.path

    def body(self) -> bytes | None:
        """The form body (``application/x-www-form-urlencoded``), or None without a form."""
        if not self.form:
            return None
        return "&".join(f"{quote_plus(k)}={quote_plus(v)}" for k, v in self.form).encode("ascii")

    @property
    def idempotent(self) -> bool:
        # The bulk change check is a POST only to carry its pairs; it changes nothing.
        return self.method in _IDEMPOTENT or self.path == CHANGES_PATH


def _key_path(key_id: str, *rest: str) -> str:
    # Only valid ids can exist on a server; checking here also keeps an id from reshaping the path.
    validate_key_id(key_id)
    return _KEYS_PATH + "".join(f"{part}/" for part in (key_id, *rest))


def _quoted_status(status: VersionStatus) -> str:
    return f'"{status.value}"'


def get_key_request(key_id: str, status: VersionStatus = VersionStatus.ACTIVE) -> ApiRequest:
    """``GET /v0/keys/ID/?status="…"``. Raises ``InvalidKeyIDError`` for an invalid id."""
    return ApiRequest(
        "GET", _key_path(key_id), query="status=" + quote_plus(_quoted_status(status))
    )


def _query_pair(key_id: str, version_hash_value: str) -> str:
    return f"{quote_plus(key_id)}={quote_plus(version_hash_value)}"


def change_check_requests(
    hashes: Mapping[str, str] | None,
    *,
    wait: int | None = None,
    max_target: int = MAX_TARGET_LENGTH,
) -> list[ApiRequest]:
    """The ``GET /v0/keys/`` requests that ask which of ``hashes`` (id → known hash) changed.

    ``None`` lists every key (one request, empty query); an empty mapping needs no request at all.
    Pairs are sorted and escaped as Go's ``url.Values.Encode`` does, and split so that no request
    target exceeds ``max_target`` characters. ``wait`` adds ``Prefer: wait=N`` (a long-poll that
    servers without the extension ignore). Raises ``InvalidKeyIDError`` for an invalid id and
    ``ValueError`` for a negative wait or a single pair longer than ``max_target``.
    """
    headers: tuple[tuple[str, str], ...] = ()
    if wait is not None:
        if wait < 0:
            raise ValueError("wait must not be negative")
        headers = (("Prefer", f"wait={wait}"),)
    if hashes is None:
        return [ApiRequest("GET", _KEYS_PATH, headers=headers)]
    budget = max_target - len(_KEYS_PATH) - 1
    requests: list[ApiRequest] = []
    chunk: list[str] = []
    used = 0
    for key_id in sorted(hashes):
        validate_key_id(key_id)
        pair = _query_pair(key_id, hashes[key_id])
        cost = len(pair) + (1 if chunk else 0)
        if len(pair) > budget:
            raise ValueError(f"change-check entry for {key_id!r} exceeds {max_target} characters")
        if used + cost > budget:
            requests.append(ApiRequest("GET", _KEYS_PATH, "&".join(chunk), headers=headers))
            chunk, used, cost = [], 0, len(pair)
        chunk.append(pair)
        used += cost
    if chunk:
        requests.append(ApiRequest("GET", _KEYS_PATH, "&".join(chunk), headers=headers))
    return requests


def bulk_change_check_request(hashes: Mapping[str, str], *, wait: int | None = None) -> ApiRequest:
    """``POST /v0/changes/`` with every pair of ``hashes`` in the body: one request however many
    keys (knox_server's extension; a Go Knox server answers 404 code 8). Raises as
    :func:`change_check_requests`."""
    if wait is not None and wait < 0:
        raise ValueError("wait must not be negative")
    for key_id in hashes:
        validate_key_id(key_id)
    headers = (("Prefer", f"wait={wait}"),) if wait is not None else ()
    form = tuple((key_id, hashes[key_id]) for key_id in sorted(hashes))
    return ApiRequest("POST", CHANGES_PATH, form=form, headers=headers)


def create_key_request(key_id: str, data: bytes, acl: Iterable[Access] = ()) -> ApiRequest:
    """``POST /v0/keys/`` with form ``id``, ``data`` (base64) and ``acl`` (JSON array).

    The id is not checked here: the server's answer (code 12) is the reference for creation.
    """
    return ApiRequest(
        "POST",
        _KEYS_PATH,
        form=(
            ("id", key_id),
            ("data", base64.b64encode(data).decode("ascii")),
            ("acl", wire.encode_acl(tuple(acl)).decode("utf-8")),
        ),
    )


def delete_key_request(key_id: str) -> ApiRequest:
    return ApiRequest("DELETE", _key_path(key_id))


def get_acl_request(key_id: str) -> ApiRequest:
    return ApiRequest("GET", _key_path(key_id, "access"))


def put_access_request(key_id: str, entries: Sequence[Access]) -> ApiRequest:
    """``PUT /v0/keys/ID/access/`` with form ``acl``; ``ValueError`` without entries."""
    if not entries:
        raise ValueError("put_access needs at least one Access entry")
    acl_json = wire.encode_acl(tuple(entries)).decode("utf-8")
    return ApiRequest("PUT", _key_path(key_id, "access"), form=(("acl", acl_json),))


def add_version_request(key_id: str, data: bytes) -> ApiRequest:
    return ApiRequest(
        "POST",
        _key_path(key_id, "versions"),
        form=(("data", base64.b64encode(data).decode("ascii")),),
    )


def update_version_request(key_id: str, version_id: int, status: VersionStatus) -> ApiRequest:
    """``PUT /v0/keys/ID/versions/VER/`` with the JSON-quoted status; ``ValueError`` for an id
    outside uint64."""
    if not 0 <= version_id <= wire.MAX_UINT64:
        raise ValueError("version id out of uint64 range")
    return ApiRequest(
        "PUT",
        _key_path(key_id, "versions", str(version_id)),
        form=(("status", _quoted_status(status)),),
    )


# --- pure: responses -----------------------------------------------------------------------


def _clip(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[:_MAX_MESSAGE_CHARS] + "…"


def interpret_response(status_code: int, body: bytes, where: str) -> wire.Response:
    """The envelope of a successful call, or the exception the call should raise.

    ``where`` names the server and route in messages. Raises ``error_for_code(code, message)`` for
    an error envelope, :class:`UpstreamHTTPError` for a 5xx that is not an envelope and
    :class:`knox.wire.WireError` for any other non-envelope.
    """
    try:
        response = wire.decode_response(body)
    except wire.WireError as exc:
        if status_code >= 500:
            raise UpstreamHTTPError(
                f"HTTP {status_code} without a Knox response from {where}", status_code
            ) from None
        raise wire.WireError(
            f"HTTP {status_code} from {where} is not a Knox response: {exc}"
        ) from None
    if response.status != "ok" or response.code != Code.OK:
        raise error_for_code(response.code, _clip(response.message))
    return response


def _retryable(error: KnoxError) -> bool:
    return type(error) is InternalError or isinstance(error, UpstreamHTTPError)


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to sleep before retry number ``attempt`` (0-based): exponential from 50 ms, capped
    at 1 s, with jitter in [50 %, 100 %] so that clients retrying together spread out."""
    ceiling = min(_BACKOFF_CAP, _BACKOFF_BASE * 2.0 ** min(attempt, 32))
    fraction = rng.random() if rng is not None else random.random()  # noqa: S311 (jitter only)
    return ceiling * (0.5 + 0.5 * fraction)


def parse_key(data: Any, key_id: str, status: VersionStatus = VersionStatus.ACTIVE) -> Key:
    """A fetched key, checked as Knox's client checks it and more.

    Raises :class:`knox.wire.WireError` unless the key has the requested id, a non-empty hash, at
    least one version, exactly one Primary, unique version ids and no version beyond ``status``;
    with ``status`` Inactive (every version) the hash must also match the versions.
    """
    key = wire.key_from_obj(data, "key")
    problem = ""
    if key.id != key_id:
        problem = f"asked for key {key_id!r}, got {key.id!r}"
    elif not key.hash:
        problem = "empty hash"
    elif not key.versions:
        problem = "no versions"
    elif any(v.status.rank > status.rank for v in key.versions):
        problem = f"versions beyond the requested status {status.value}"
    else:
        try:
            validate_versions(key.versions)
        except KnoxError as exc:
            problem = exc.message
        else:
            if status is VersionStatus.INACTIVE and key.hash != version_hash(key.versions):
                problem = "hash does not match the versions"
    if problem:
        raise wire.WireError(f"invalid key content for the remote key {key_id}: {problem}")
    return key


def parse_key_ids(data: Any) -> list[str]:
    return wire.key_ids_from_obj(data)


def parse_version_id(data: Any) -> int:
    return wire.version_id_from_obj(data)


def parse_acl(data: Any) -> ACL:
    return wire.acl_from_obj(data, "acl")


def parse_preference_applied(value: str | None) -> int | None:
    """The ``wait`` a server says it applied (``Preference-Applied: wait=N``), else None."""
    if not value:
        return None
    for item in value.split(","):
        name, _, arg = item.strip().partition("=")
        if name.strip().lower() == "wait":
            arg = arg.strip().strip('"')
            if arg.isdigit():
                return int(arg)
    return None


# --- the I/O shell -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """A successful call: the decoded envelope and the HTTP response headers."""

    envelope: wire.Response
    headers: httpx.Headers = field(repr=False)


@dataclass(frozen=True, slots=True)
class ChangeCheck:
    """The answer to a change check.

    ``ids`` are the keys whose hash differs from the one sent (unknown ids are never listed).
    ``preference_applied`` is the ``wait`` every answering request reported applying, or None if any
    did not (a server without the long-poll extension answered at once).
    """

    ids: tuple[str, ...]
    preference_applied: int | None


def _change_check(response: ApiResponse) -> ChangeCheck:
    return ChangeCheck(
        tuple(parse_key_ids(response.envelope.data)),
        parse_preference_applied(response.headers.get("preference-applied")),
    )


def ssl_context_for(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ client context trusting ``ca`` (the system store if None), presenting the client
    certificate ``cert``/``key`` if given. Raises ``ValueError`` if only one of them is given,
    ``OSError`` for an unreadable file and ``ssl.SSLError`` for bad PEM or a mismatched pair.
    """
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None if ca is None else ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _normalise_base_url(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if (
        parsed is None
        or parsed.scheme not in ("https", "http")
        or not parsed.host
        or parsed.query
        or parsed.fragment
    ):
        raise ValueError(f"not an http(s) base URL: {url!r}")
    return str(parsed).rstrip("/")


class _Unreachable(Exception):
    """One base URL failed at the transport level (internal to the failover loop)."""

    def __init__(self, reason: str, *, sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent


class KnoxHTTPClient:
    """An async (trio) client for one identity against one Knox service.

    ``base_urls`` are tried in order: a connection failure moves on to the next one (and that one
    stays preferred); an idempotent request also moves on after a failure once connected (a POST
    might have been applied, so it does not). Each attempt must connect within ``timeout`` seconds
    and complete within ``timeout`` (plus the long-poll wait) more; each response body is bounded
    by :data:`MAX_RESPONSE_BYTES`. A code-1 or HTTP-5xx answer is retried up to :data:`MAX_ATTEMPTS`
    attempts in all, with :func:`backoff_delay` between them.

    ``auth`` is the whole ``Authorization`` value (``0u<token>``, ``0t<hostname>``, ``0s<x>``).
    Pass ``http_client`` to share an existing ``httpx.AsyncClient`` (its TLS settings apply, and it
    is not closed here); otherwise the client owns one built on ``ssl_context`` and closes it in
    :meth:`aclose`. Certificate rotation means building a new ``KnoxHTTPClient``.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        auth: str,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        http_client: httpx.AsyncClient | None = None,
        http2: bool = True,
    ) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("at least one base URL is required")
        if not auth:
            raise ValueError("auth must not be empty")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError("timeout must be a positive number of seconds")
        if http_client is not None and ssl_context is not None:
            raise ValueError("pass either ssl_context or http_client, not both")
        self._urls = [_normalise_base_url(u) for u in urls]
        self._preferred = 0
        # Whether the server has the bulk change check: unknown until a check needs it.
        self._bulk_changes: bool | None = None
        self._auth = auth
        self._timeout = timeout
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(
            verify=ssl_context or ssl_context_for(None),
            http2=http2,
            timeout=timeout,
            # No proxies, .netrc credentials or SSL_CERT_FILE from the environment: the TLS
            # identity and trust are exactly what the caller configured.
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"KnoxHTTPClient(base_urls={self._urls!r}, auth=<{self._auth[:2]}…>)"

    @property
    def base_urls(self) -> tuple[str, ...]:
        return tuple(self._urls)

    async def aclose(self) -> None:
        """Close the owned ``httpx.AsyncClient`` (a shared one is left open)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the API -----------------------------------------------------------------------------

    async def get_key(self, key_id: str, status: VersionStatus = VersionStatus.ACTIVE) -> Key:
        """The key with versions up to ``status`` (Active: Primary and Actives). See
        :func:`parse_key` for the checks on the answer."""
        response = await self.request(get_key_request(key_id, status))
        return parse_key(response.envelope.data, key_id, status)

    async def get_keys(self, hashes: Mapping[str, str] | None = None) -> list[str]:
        """Knox's ``GetKeys``: every key id (``None``) or the ids in ``hashes`` whose stored hash
        differs from the given one (``"NONE"`` for "tell me if it exists")."""
        return list((await self.check_keys(hashes)).ids)

    async def check_keys(
        self, hashes: Mapping[str, str] | None, *, wait: int | None = None
    ) -> ChangeCheck:
        """A change check, chunked by :func:`change_check_requests` and merged.

        With ``wait`` (seconds) each chunk asks the server to hold the answer until something
        changes (``Prefer: wait=N``). All chunks of a long-poll are in flight together and the
        first chunk that reports a change ends the check (the others are cancelled, their keys are
        reported by the next check); without ``wait`` at most 8 chunks run at once.
        """
        requests = change_check_requests(hashes, wait=wait)
        if not requests:
            return ChangeCheck((), None)
        if len(requests) > 1 and hashes is not None and self._bulk_changes is not False:
            try:
                response = await self.request(
                    bulk_change_check_request(hashes, wait=wait), wait=wait
                )
            except RouteNotFoundError:
                self._bulk_changes = False  # a server without the extension: use the query form
            else:
                self._bulk_changes = True
                return _change_check(response)
        if len(requests) == 1:
            return _change_check(await self.request(requests[0], wait=wait))
        return await self._check_chunks(requests, wait)

    async def create_key(self, key_id: str, data: bytes, acl: Iterable[Access] = ()) -> int:
        """Create a key; returns the id of its first (Primary) version."""
        response = await self.request(create_key_request(key_id, data, acl))
        return parse_version_id(response.envelope.data)

    async def delete_key(self, key_id: str) -> None:
        await self.request(delete_key_request(key_id))

    async def get_acl(self, key_id: str) -> ACL:
        response = await self.request(get_acl_request(key_id))
        return parse_acl(response.envelope.data)

    async def put_access(self, key_id: str, *entries: Access) -> None:
        """Apply ``entries`` with Knox's ACL semantics (replace, remove with None, or append)."""
        await self.request(put_access_request(key_id, entries))

    async def add_version(self, key_id: str, data: bytes) -> int:
        """Add an Active version; returns its id."""
        response = await self.request(add_version_request(key_id, data))
        return parse_version_id(response.envelope.data)

    async def update_version(self, key_id: str, version_id: int, status: VersionStatus) -> None:
        """Promote (Primary), reactivate (Active) or deactivate (Inactive) a version."""
        await self.request(update_version_request(key_id, version_id, status))

    # --- transport ---------------------------------------------------------------------------

    async def request(self, req: ApiRequest, *, wait: int | None = None) -> ApiResponse:
        """Send ``req`` with retries and failover; the successful envelope and headers.

        ``wait`` extends the time bound of each attempt by that many seconds (for a request that
        carries ``Prefer: wait``). Raises as described in the module docstring.
        """
        attempts = 0
        while True:
            status_code, headers, body, where = await self._send(req, wait or 0)
            attempts += 1
            try:
                return ApiResponse(interpret_response(status_code, body, where), headers)
            except KnoxError as exc:
                if not _retryable(exc) or attempts == MAX_ATTEMPTS:
                    raise
            await trio.sleep(backoff_delay(attempts - 1))

    async def _send(self, req: ApiRequest, wait: int) -> tuple[int, httpx.Headers, bytes, str]:
        failures: list[str] = []
        count = len(self._urls)
        for step in range(count):
            index = (self._preferred + step) % count
            base = self._urls[index]
            try:
                status_code, headers, body = await self._send_once(base, req, wait)
            except _Unreachable as exc:
                failures.append(f"{base}: {exc.reason}")
                if exc.sent and not req.idempotent:
                    break
                continue
            self._preferred = index
            return status_code, headers, body, f"{base} ({req.method} {req.path})"
        raise UpstreamUnavailable(
            f"no Knox server answered {req.method} {req.path}: " + "; ".join(failures)
        )

    async def _send_once(
        self, base: str, req: ApiRequest, wait: int
    ) -> tuple[int, httpx.Headers, bytes]:
        headers = {"Authorization": self._auth, "User-Agent": USER_AGENT}
        body = req.body()
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        headers.update(req.headers)
        # The connection must be up within ``timeout`` and the answer complete within
        # ``timeout + wait`` after that; the outer scope is the hard bound on both together.
        answer_limit = self._timeout + wait
        with trio.move_on_after(self._timeout + answer_limit):
            try:
                async with self._http.stream(
                    req.method,
                    base + req.target,
                    content=body,
                    headers=headers,
                    timeout=httpx.Timeout(self._timeout, read=answer_limit),
                ) as response:
                    data = await _read_limited(response)
                    return response.status_code, response.headers, data
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise _Unreachable(_describe(exc), sent=False) from None
            except httpx.TimeoutException:
                raise _Unreachable(f"no answer within {answer_limit:g} s", sent=True) from None
            except httpx.RequestError as exc:
                raise _Unreachable(_describe(exc), sent=True) from None
        raise _Unreachable(f"no answer within {self._timeout + answer_limit:g} s", sent=True)

    async def _check_chunks(self, requests: list[ApiRequest], wait: int | None) -> ChangeCheck:
        found: list[str] = []
        applied: list[int | None] = []
        errors: list[KnoxError] = []
        limiter = trio.CapacityLimiter(len(requests) if wait is not None else _CHECK_CONCURRENCY)

        async def run_one(req: ApiRequest, cancel: trio.CancelScope) -> None:
            async with limiter:
                try:
                    response = await self.request(req, wait=wait)
                    ids = parse_key_ids(response.envelope.data)
                except KnoxError as exc:
                    errors.append(exc)
                    cancel.cancel()
                    return
            found.extend(ids)
            applied.append(parse_preference_applied(response.headers.get("preference-applied")))
            if wait is not None and ids:
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            for req in requests:
                nursery.start_soon(run_one, req, nursery.cancel_scope)
        if errors:
            raise errors[0]
        known = [a for a in applied if a is not None]
        preference = min(known) if known and len(known) == len(applied) else None
        return ChangeCheck(tuple(dict.fromkeys(found)), preference)


async def _read_limited(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise wire.WireError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(exc: httpx.RequestError) -> str:
    """The exception's type and the most specific reason in its cause chain (httpx wraps the OS
    or TLS error, e.g. CERTIFICATE_VERIFY_FAILED, which trio wraps once more). These reasons come
    from the OS and the TLS library and never contain request headers."""
    reason = ""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        text = str(seen).strip()
        if text and not isinstance(seen, BaseExceptionGroup):
            reason = text
        if isinstance(seen, BaseExceptionGroup) and seen.exceptions:
            seen = seen.exceptions[0]
        else:
            seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {_clip(reason)}" if reason else type(exc).__name__
