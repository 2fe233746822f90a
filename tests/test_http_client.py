"""knox.http_client: the pure request/response layer, then the client over real TLS.

The transport tests run two kinds of real servers: a small scripted ASGI app of our own served by
Hypercorn (to make a server answer 500 twice, send a non-Knox body, or hold an answer back), and
the full knox_server app from ``tests.server_fixtures`` for every API method and error mapping.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import httpx
import pytest
import trio

from knox import wire
from knox.errors import (
    BadKeyFormatError,
    BadPrincipalError,
    BadRequestDataError,
    InternalError,
    KeyExistsError,
    KeyNotFoundError,
    NoKeyDataError,
    UnauthenticatedError,
    UnauthorizedError,
    VersionNotFoundError,
)
from knox.http_client import (
    MAX_ATTEMPTS,
    MAX_TARGET_LENGTH,
    USER_AGENT,
    ApiRequest,
    KnoxHTTPClient,
    UpstreamHTTPError,
    UpstreamUnavailable,
    add_version_request,
    backoff_delay,
    change_check_requests,
    create_key_request,
    delete_key_request,
    get_acl_request,
    get_key_request,
    interpret_response,
    parse_key,
    parse_preference_applied,
    put_access_request,
    ssl_context_for,
    update_version_request,
)
from knox.model import (
    Access,
    AccessType,
    InvalidKeyIDError,
    KeyVersion,
    PrincipalType,
    VersionStatus,
    version_hash,
)
from knox_server.dev import DEV_SPIFFE_ID
from knox_server.serve import ServeSettings, serve
from tests.asgi import serve_lifespan
from tests.pki import CA
from tests.server_fixtures import DevServer, dev_server

WAIT = 20
HASH = "a" * 64


def ok_body(data: Any) -> bytes:
    return wire.ok_envelope(data, host="h", ts=1)


def error_body(code: int, message: str) -> bytes:
    return wire.error_envelope(code, message, host="h", ts=1)


def key_obj(key_id: str, versions: list[KeyVersion], hash_value: str | None = None) -> Any:
    return {
        "id": key_id,
        "acl": [],
        "versions": [wire.version_to_obj(v) for v in versions],
        "hash": hash_value if hash_value is not None else version_hash(versions),
    }


P1 = KeyVersion(1, b"one", VersionStatus.PRIMARY, 10)
A2 = KeyVersion(2, b"two", VersionStatus.ACTIVE, 20)
I3 = KeyVersion(3, b"three", VersionStatus.INACTIVE, 30)


# --- pure: request building ------------------------------------------------------------------


def test_get_key_request_sends_json_quoted_status() -> None:
    req = get_key_request("svc:db_password")
    assert (req.method, req.target) == ("GET", "/v0/keys/svc:db_password/?status=%22Active%22")
    assert req.body() is None
    inactive = get_key_request("k", VersionStatus.INACTIVE)
    assert unquote_plus(inactive.query) == 'status="Inactive"'


@pytest.mark.parametrize("bad", ["", "a/b", "../k", "k?x=1", "a b", "é", "x" * 513])
def test_invalid_key_id_never_reaches_a_path(bad: str) -> None:
    builders: list[Callable[[], ApiRequest]] = [
        lambda: get_key_request(bad),
        lambda: delete_key_request(bad),
        lambda: get_acl_request(bad),
        lambda: add_version_request(bad, b"d"),
        lambda: update_version_request(bad, 1, VersionStatus.PRIMARY),
    ]
    for build in builders:
        with pytest.raises(InvalidKeyIDError):
            build()


def test_form_requests_match_knox_client() -> None:
    create = create_key_request(
        "k", b"\x00secret", [Access(PrincipalType.USER, "bob", AccessType.READ)]
    )
    assert (create.method, create.target) == ("POST", "/v0/keys/")
    form = dict(parse_qsl((create.body() or b"").decode()))
    assert form["id"] == "k"
    assert base64.b64decode(form["data"]) == b"\x00secret"
    assert json.loads(form["acl"]) == [{"type": "User", "id": "bob", "access": "Read"}]

    add = add_version_request("k", b"v2")
    assert (add.method, add.target) == ("POST", "/v0/keys/k/versions/")
    assert dict(parse_qsl((add.body() or b"").decode())) == {"data": "djI="}

    update = update_version_request("k", 2**63 - 1, VersionStatus.PRIMARY)
    assert (update.method, update.target) == ("PUT", f"/v0/keys/k/versions/{2**63 - 1}/")
    assert dict(parse_qsl((update.body() or b"").decode())) == {"status": '"Primary"'}

    put = put_access_request("k", [Access(PrincipalType.MACHINE_PREFIX, "web", AccessType.NONE)])
    assert (put.method, put.target) == ("PUT", "/v0/keys/k/access/")
    acl = json.loads(dict(parse_qsl((put.body() or b"").decode()))["acl"])
    assert acl == [{"type": "MachinePrefix", "id": "web", "access": "None"}]

    assert delete_key_request("k").target == "/v0/keys/k/"
    assert get_acl_request("k").target == "/v0/keys/k/access/"


def test_bad_arguments_are_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="uint64"):
        update_version_request("k", -1, VersionStatus.ACTIVE)
    with pytest.raises(ValueError, match="at least one"):
        put_access_request("k", [])
    with pytest.raises(ValueError, match="negative"):
        change_check_requests({"k": HASH}, wait=-1)


def test_change_check_query_is_go_url_values_encode() -> None:
    [req] = change_check_requests({"b:2": "NONE", "a_1": HASH, "c": ""})
    assert req.target == f"/v0/keys/?a_1={HASH}&b%3A2=NONE&c="
    assert req.headers == ()


def test_change_check_of_everything_and_of_nothing() -> None:
    [everything] = change_check_requests(None)
    assert everything.target == "/v0/keys/"
    assert change_check_requests({}) == []


def test_change_check_is_chunked_under_the_url_limit_and_covers_every_id() -> None:
    hashes = {f"service_{i:05d}:secret": HASH for i in range(2000)}
    requests = change_check_requests(hashes, wait=30)
    assert len(requests) == 3
    seen: list[str] = []
    for req in requests:
        assert len(req.target) <= MAX_TARGET_LENGTH
        assert req.headers == (("Prefer", "wait=30"),)
        pairs = parse_qsl(req.query, keep_blank_values=True)
        assert all(h == HASH for _, h in pairs)
        seen.extend(k for k, _ in pairs)
    assert seen == sorted(hashes)


def test_five_hundred_typical_keys_take_one_change_check() -> None:
    hashes = {f"service_{i:05d}:db_password": HASH for i in range(500)}
    assert len(change_check_requests(hashes)) == 1


def test_change_check_refuses_an_entry_longer_than_the_limit() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        change_check_requests({"k": "x" * 200}, max_target=100)
    with pytest.raises(InvalidKeyIDError):
        change_check_requests({"a&b": HASH})


# --- pure: responses -------------------------------------------------------------------------


def test_ok_envelope_is_returned() -> None:
    response = interpret_response(200, ok_body(["a"]), "srv")
    assert response.data == ["a"]


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [(404, 4, KeyNotFoundError), (403, 6, UnauthorizedError), (500, 1, InternalError)],
)
def test_error_envelope_raises_the_codes_exception(
    status: int, code: int, cls: type[Exception]
) -> None:
    with pytest.raises(cls) as info:
        interpret_response(status, error_body(code, "No such key k"), "srv")
    assert str(info.value) == "No such key k"


def test_non_envelopes() -> None:
    with pytest.raises(wire.WireError, match=r"HTTP 405 from srv is not a Knox response"):
        interpret_response(405, b"", "srv")
    with pytest.raises(UpstreamHTTPError) as info:
        interpret_response(502, b"<html>bad gateway</html>", "srv")
    assert info.value.status_code == 502
    assert isinstance(info.value, UpstreamUnavailable)


def test_long_server_messages_are_clipped() -> None:
    with pytest.raises(BadRequestDataError) as info:
        interpret_response(400, error_body(11, "x" * 10_000), "srv")
    assert len(str(info.value)) < 1100


def test_parse_key_accepts_what_the_server_sends() -> None:
    key = parse_key(key_obj("k", [P1, A2], version_hash([P1, A2, I3])), "k")
    assert key.primary.data == b"one"
    every = parse_key(key_obj("k", [P1, A2, I3]), "k", VersionStatus.INACTIVE)
    assert len(every.versions) == 3


@pytest.mark.parametrize(
    ("obj", "status", "problem"),
    [
        (key_obj("other", [P1]), VersionStatus.ACTIVE, "got 'other'"),
        (key_obj("k", [P1], ""), VersionStatus.ACTIVE, "empty hash"),
        (key_obj("k", [], HASH), VersionStatus.ACTIVE, "no versions"),
        (key_obj("k", [A2], HASH), VersionStatus.ACTIVE, "More than one Primary"),
        (key_obj("k", [P1, P1], HASH), VersionStatus.ACTIVE, "Repeated Version ID"),
        (key_obj("k", [P1, I3], HASH), VersionStatus.ACTIVE, "beyond the requested status"),
        (key_obj("k", [P1, A2], HASH), VersionStatus.INACTIVE, "hash does not match"),
    ],
)
def test_parse_key_rejects_invalid_content(obj: Any, status: VersionStatus, problem: str) -> None:
    with pytest.raises(wire.WireError, match="invalid key content") as info:
        parse_key(obj, "k", status)
    assert problem in str(info.value)


def test_parse_key_error_never_shows_key_data() -> None:
    secret = KeyVersion(7, b"hunter2-top-secret", VersionStatus.ACTIVE, 1)
    with pytest.raises(wire.WireError) as info:
        parse_key(key_obj("k", [secret], HASH), "k")
    assert "hunter2" not in str(info.value)
    assert "aHVudGVy" not in str(info.value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("wait=30", 30),
        ("respond-async, wait=5", 5),
        ('WAIT="7"', 7),
        ("wait=soon", None),
        ("return=minimal", None),
    ],
)
def test_preference_applied(header: str | None, expected: int | None) -> None:
    assert parse_preference_applied(header) == expected


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    first = [backoff_delay(0, rng) for _ in range(50)]
    assert all(0.025 <= d <= 0.05 for d in first)
    assert len(set(first)) > 1
    assert all(0.05 <= backoff_delay(1, rng) <= 0.1 for _ in range(20))
    assert all(backoff_delay(n, rng) <= 1.0 for n in (5, 50, 5000))


def test_ssl_context_for_needs_cert_and_key_together(tmp_path: Path) -> None:
    ca = CA.create()
    ca_path = ca.write_cert(tmp_path / "ca.pem")
    cert, key = ca.machine_cert("web1.example.com").write(tmp_path, "m")
    ctx = ssl_context_for(ca_path, cert, key)
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError, match="both"):
        ssl_context_for(ca_path, cert, None)
    with pytest.raises(FileNotFoundError):
        ssl_context_for(tmp_path / "missing.pem")


def test_client_constructor_validation() -> None:
    with pytest.raises(ValueError, match="base URL"):
        KnoxHTTPClient([], auth="0ux")
    with pytest.raises(ValueError, match="base URL"):
        KnoxHTTPClient("ftp://h", auth="0ux")
    with pytest.raises(ValueError, match="base URL"):
        KnoxHTTPClient("https://h:port", auth="0ux")
    with pytest.raises(ValueError, match="auth"):
        KnoxHTTPClient("https://h", auth="")
    with pytest.raises(ValueError, match="timeout"):
        KnoxHTTPClient("https://h", auth="0ux", timeout=0)


async def test_client_repr_hides_the_token() -> None:
    async with KnoxHTTPClient("https://knox.example:9000/", auth="0usupersecret") as client:
        assert "supersecret" not in repr(client)
        assert client.base_urls == ("https://knox.example:9000",)


# --- a scripted server of our own ------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Script:
    """Answers requests in order from ``replies`` (status, body, headers); the last one repeats.
    ``hold`` makes the server sleep before answering (to exercise timeouts)."""

    replies: list[tuple[int, bytes, list[tuple[bytes, bytes]]]]
    hold: float = 0.0
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope["query_string"].decode()
        self.seen.append(
            Seen(
                scope["method"],
                scope["path"] + ("?" + query if query else ""),
                {k.decode(): v.decode() for k, v in scope["headers"]},
                body,
            )
        )
        status, reply, headers = self.replies[min(len(self.seen), len(self.replies)) - 1]
        if self.hold:
            await trio.sleep(self.hold)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": reply})


JSON = [(b"content-type", b"application/json")]


@dataclass
class Scripted:
    url: str
    ca_path: Path


@asynccontextmanager
async def scripted_server(script: Script, tmp_path: Path) -> AsyncIterator[Scripted]:
    ca = CA.create()
    cert, key = ca.server_cert().write(tmp_path, "server")
    ca_path = ca.write_cert(tmp_path / "ca.pem")
    settings = ServeSettings(listen=("127.0.0.1:0",), cert=cert, key=key, client_ca=ca_path)
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(serve, script, settings)
        yield Scripted(urls[0], ca_path)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def scripted_client(
    script: Script,
    tmp_path: Path,
    *,
    urls: Callable[[str], list[str]] = lambda url: [url],
    trust: Path | None = None,
    request_timeout: float = 10.0,
) -> AsyncIterator[KnoxHTTPClient]:
    """A client (auth ``0utok``) for a scripted server; ``urls`` maps its URL to the base URLs."""
    async with scripted_server(script, tmp_path) as srv:
        ctx = ssl_context_for(trust or srv.ca_path)
        async with KnoxHTTPClient(
            urls(srv.url), auth="0utok", ssl_context=ctx, timeout=request_timeout
        ) as client:
            yield client


def closed_port_url() -> str:
    """A URL nothing listens on: a port the kernel just handed out, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"https://127.0.0.1:{port}"


async def test_sends_knox_headers_and_decodes(tmp_path: Path) -> None:
    script = Script([(200, ok_body(123), JSON)])
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path) as client:
            assert await client.add_version("k", b"v") == 123
    [seen] = script.seen
    assert (seen.method, seen.target) == ("POST", "/v0/keys/k/versions/")
    assert seen.headers["authorization"] == "0utok"
    assert seen.headers["user-agent"] == USER_AGENT
    assert USER_AGENT.startswith("Knox_Client/")
    assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
    assert seen.body == b"data=dg%3D%3D"


async def test_an_empty_change_check_sends_nothing(tmp_path: Path) -> None:
    script = Script([(200, ok_body(["everything"]), JSON)])
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path) as client:
            assert await client.get_keys({}) == []
            assert (await client.check_keys({}, wait=30)).ids == ()
    assert script.seen == []


async def test_a_shared_httpx_client_is_used_and_left_open(tmp_path: Path) -> None:
    script = Script([(200, ok_body([]), JSON)])
    with trio.fail_after(WAIT):
        async with scripted_server(script, tmp_path) as srv:
            shared = httpx.AsyncClient(verify=ssl_context_for(srv.ca_path))
            async with shared:
                async with KnoxHTTPClient(srv.url, auth="0utok", http_client=shared) as client:
                    assert await client.get_keys() == []
                assert not shared.is_closed
                with pytest.raises(ValueError, match="not both"):
                    KnoxHTTPClient(
                        srv.url,
                        auth="0utok",
                        http_client=shared,
                        ssl_context=ssl_context_for(srv.ca_path),
                    )
    assert len(script.seen) == 1


async def test_code_1_is_retried_until_ok(tmp_path: Path) -> None:
    busy = (500, error_body(1, "Key k was changed concurrently; try again"), JSON)
    script = Script([busy, busy, (200, ok_body(["k"]), JSON)])
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path) as client:
            assert await client.get_keys({"k": HASH}) == ["k"]
    assert len(script.seen) == 3
    assert {s.target for s in script.seen} == {f"/v0/keys/?k={HASH}"}


async def test_retries_stop_after_max_attempts(tmp_path: Path) -> None:
    script = Script([(500, error_body(1, "database unavailable"), JSON)])
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path) as client:
            with pytest.raises(InternalError, match="database unavailable"):
                await client.delete_key("k")
    assert len(script.seen) == MAX_ATTEMPTS


async def test_proxy_5xx_is_retried_then_reported_unavailable(tmp_path: Path) -> None:
    script = Script([(503, b"<html>overloaded</html>", [(b"content-type", b"text/html")])])
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path) as client:
            with pytest.raises(UpstreamHTTPError, match="HTTP 503") as info:
                await client.get_acl("k")
    assert info.value.status_code == 503
    assert len(script.seen) == MAX_ATTEMPTS


async def test_other_errors_are_not_retried(tmp_path: Path) -> None:
    script = Script([(404, error_body(4, "No such key k"), JSON)])
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path) as client:
            with pytest.raises(KeyNotFoundError, match="No such key k"):
                await client.get_key("k")
    assert len(script.seen) == 1


async def test_non_knox_answer_is_a_wire_error(tmp_path: Path) -> None:
    script = Script([(200, b"hello", [(b"content-type", b"text/plain")])])
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path) as client:
            with pytest.raises(wire.WireError, match="not a Knox response"):
                await client.get_keys()


async def test_fetched_key_must_be_the_one_asked_for(tmp_path: Path) -> None:
    script = Script([(200, ok_body(key_obj("other", [P1])), JSON)])
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path) as client:
            with pytest.raises(wire.WireError, match="asked for key 'k'"):
                await client.get_key("k")


async def test_fails_over_from_a_dead_url_and_keeps_the_live_one(tmp_path: Path) -> None:
    script = Script([(200, ok_body(["a", "b"]), JSON)])
    dead = closed_port_url()
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path, urls=lambda url: [dead, url]) as client:
            assert await client.get_keys() == ["a", "b"]
            # A POST also fails over when the connection was never made.
            script.replies = [(200, ok_body(5), JSON)]
            assert await client.create_key("c", b"d") == 5
    assert len(script.seen) == 2


async def test_a_get_without_answer_moves_on_to_the_next_server(tmp_path: Path) -> None:
    slow = Script([(200, ok_body(["slow"]), JSON)], hold=5)
    fast = Script([(200, ok_body(["fast"]), JSON)])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with trio.fail_after(WAIT):
        async with (
            scripted_server(slow, tmp_path / "a") as slow_srv,
            scripted_server(fast, tmp_path / "b") as fast_srv,
        ):
            ctx = ssl_context_for(slow_srv.ca_path)
            ctx.load_verify_locations(fast_srv.ca_path)
            async with KnoxHTTPClient(
                [slow_srv.url, fast_srv.url], auth="0utok", ssl_context=ctx, timeout=0.3
            ) as client:
                assert await client.get_keys() == ["fast"]
    assert len(slow.seen) == 1


async def test_no_reachable_server_is_upstream_unavailable() -> None:
    dead = [closed_port_url(), closed_port_url()]
    with trio.fail_after(WAIT):
        async with KnoxHTTPClient(dead, auth="0usupersecret", timeout=5) as client:
            with pytest.raises(UpstreamUnavailable) as info:
                await client.get_key("k")
    message = str(info.value)
    assert dead[0] in message and dead[1] in message
    assert "supersecret" not in message


async def test_untrusted_server_certificate_is_unavailable(tmp_path: Path) -> None:
    script = Script([(200, ok_body([]), JSON)])
    other_ca = CA.create("other").write_cert(tmp_path / "other.pem")
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path, trust=other_ca) as client:
            with pytest.raises(UpstreamUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get_keys()
    assert script.seen == []


async def test_slow_answer_times_out_and_post_is_not_resent(tmp_path: Path) -> None:
    script = Script([(200, ok_body(1), JSON)], hold=5)
    with trio.fail_after(WAIT):
        # Both URLs reach the same slow server: a POST must not be sent a second time.
        async with scripted_client(
            script,
            tmp_path,
            urls=lambda url: [url, url.replace("127.0.0.1", "localhost")],
            request_timeout=0.3,
        ) as client:
            with pytest.raises(UpstreamUnavailable, match="no answer within"):
                await client.add_version("k", b"v")
    assert len(script.seen) == 1


async def test_long_poll_sends_prefer_and_reports_preference_applied(tmp_path: Path) -> None:
    applied = [*JSON, (b"preference-applied", b"wait=25")]
    script = Script([(200, ok_body(["k"]), applied)])
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path) as client:
            check = await client.check_keys({"k": HASH}, wait=25)
            assert (check.ids, check.preference_applied) == (("k",), 25)
            script.replies = [(200, ok_body([]), JSON)]
            plain = await client.check_keys({"k": HASH}, wait=25)
            assert (plain.ids, plain.preference_applied) == ((), None)
    assert script.seen[0].headers["prefer"] == "wait=25"


async def test_long_poll_wait_extends_the_time_bound(tmp_path: Path) -> None:
    script = Script([(200, ok_body([]), JSON)], hold=0.6)
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path, request_timeout=0.3) as client:
            check = await client.check_keys({"k": HASH}, wait=1)
            assert check.ids == ()
            with pytest.raises(UpstreamUnavailable, match="no answer within"):
                await client.check_keys({"k": HASH})


# --- against the real knox_server ------------------------------------------------------------


def client_for(srv: DevServer, auth: str, cert: tuple[Path, Path] | None = None) -> KnoxHTTPClient:
    ctx = ssl_context_for(srv.ca, *(cert or (None, None)))
    return KnoxHTTPClient(srv.url, auth=auth, ssl_context=ctx)


def audit_records(srv: DevServer) -> list[dict[str, Any]]:
    lines = (srv.state_dir / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


async def test_every_method_against_the_server(tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with (
            dev_server(tmp_path / "srv") as srv,
            client_for(srv, "0u" + srv.admin_token) as admin,
        ):
            grant = Access(PrincipalType.USER, "dev", AccessType.READ)
            first = await admin.create_key("app:db_password", b"v1", [grant])
            key = await admin.get_key("app:db_password")
            assert [(v.id, v.data, v.status) for v in key.versions] == [
                (first, b"v1", VersionStatus.PRIMARY)
            ]
            second = await admin.add_version("app:db_password", b"v2")
            await admin.update_version("app:db_password", second, VersionStatus.PRIMARY)
            await admin.update_version("app:db_password", first, VersionStatus.INACTIVE)
            active = await admin.get_key("app:db_password")
            assert active.primary.data == b"v2"
            assert [v.id for v in active.versions] == [second]
            every = await admin.get_key("app:db_password", VersionStatus.INACTIVE)
            assert {v.id: v.status for v in every.versions} == {
                first: VersionStatus.INACTIVE,
                second: VersionStatus.PRIMARY,
            }
            assert active.hash == every.hash == version_hash(every.versions)
            primary_only = await admin.get_key("app:db_password", VersionStatus.PRIMARY)
            assert [v.id for v in primary_only.versions] == [second]

            await admin.put_access(
                "app:db_password",
                Access(PrincipalType.MACHINE, srv.hostname, AccessType.READ),
                Access(PrincipalType.USER, "dev", AccessType.NONE),
            )
            acl = await admin.get_acl("app:db_password")
            assert Access(PrincipalType.USER, "admin", AccessType.ADMIN) in acl
            assert Access(PrincipalType.MACHINE, srv.hostname, AccessType.READ) in acl
            assert all(e.id != "dev" for e in acl)

            assert await admin.get_keys() == ["app:db_password"]
            assert await admin.get_keys({"app:db_password": every.hash, "ghost": "NONE"}) == []
            assert await admin.get_keys({"app:db_password": "NONE"}) == ["app:db_password"]

            await admin.delete_key("app:db_password")
            with pytest.raises(KeyNotFoundError, match="app:db_password"):
                await admin.get_key("app:db_password")
            assert await admin.get_keys() == []


async def test_server_errors_map_to_their_exceptions(tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with (
            dev_server(tmp_path / "srv") as srv,
            client_for(srv, "0u" + srv.admin_token) as admin,
            client_for(srv, "0u" + srv.dev_token) as dev,
            client_for(srv, "0unot-a-token") as stranger,
        ):
            version = await admin.create_key("k", b"secret")
            with pytest.raises(KeyExistsError):
                await admin.create_key("k", b"again")
            with pytest.raises(BadKeyFormatError):
                await admin.create_key("bad id!", b"x")
            with pytest.raises(NoKeyDataError):
                await admin.create_key("empty", b"")
            with pytest.raises(UnauthorizedError, match="dev"):
                await dev.get_key("k")
            with pytest.raises(UnauthorizedError):
                await dev.delete_key("k")
            with pytest.raises(UnauthenticatedError):
                await stranger.get_keys()
            with pytest.raises(VersionNotFoundError):
                await admin.update_version("k", version + 1, VersionStatus.ACTIVE)
            with pytest.raises(BadRequestDataError, match="Version must be Active to promote"):
                await admin.update_version("k", version, VersionStatus.PRIMARY)
            with pytest.raises(BadPrincipalError):
                await admin.put_access("k", Access(PrincipalType.SERVICE, "web", AccessType.READ))
            with pytest.raises(KeyNotFoundError):
                await admin.add_version("ghost", b"x")


async def test_machine_and_service_identities_over_mtls(tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with dev_server(tmp_path / "srv") as srv:
            async with client_for(srv, "0u" + srv.admin_token) as admin:
                await admin.create_key(
                    "host_key",
                    b"for the host",
                    [
                        Access(PrincipalType.MACHINE, srv.hostname, AccessType.READ),
                        Access(PrincipalType.SERVICE, DEV_SPIFFE_ID, AccessType.READ),
                    ],
                )
            async with client_for(srv, "0t" + srv.hostname, srv.host_cert) as machine:
                assert (await machine.get_key("host_key")).primary.data == b"for the host"
            async with client_for(srv, "0sx", srv.service_cert) as service:
                assert (await service.get_key("host_key")).primary.data == b"for the host"
            async with client_for(srv, "0twrong.example.com", srv.host_cert) as liar:
                with pytest.raises(UnauthenticatedError):
                    await liar.get_key("host_key")


async def test_change_check_of_2000_ids_is_one_bulk_request(tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with (
            dev_server(tmp_path / "srv") as srv,
            client_for(srv, "0u" + srv.admin_token) as admin,
        ):
            real = ["svc_00000:k", "svc_01000:k", "svc_01999:k"]
            for key_id in real:
                await admin.create_key(key_id, b"x")
            unchanged = await admin.get_key(real[1])
            hashes = {f"svc_{i:05d}:k": "0" * 64 for i in range(2000)}
            hashes[real[1]] = unchanged.hash
            assert len(change_check_requests(hashes)) > 1  # too many for one URL
            check = await admin.check_keys(hashes)
            assert sorted(check.ids) == [real[0], real[2]]
            assert check.preference_applied is None
            assert sorted(await admin.get_keys(hashes)) == [real[0], real[2]]
            long_poll = await admin.check_keys(hashes, wait=1)
            assert sorted(long_poll.ids) == [real[0], real[2]]
            assert long_poll.preference_applied == 1
    routes = [r["route"] for r in audit_records(srv) if r["route"] in ("getkeys", "postchanges")]
    assert routes == ["postchanges"] * 3


async def test_server_without_bulk_check_gets_chunked_queries(tmp_path: Path) -> None:
    not_found = b'{"status":"error","code":8,"host":"h","ts":1,"message":"","data":null}\n'
    ok = b'{"status":"ok","code":0,"host":"h","ts":1,"message":"","data":[]}\n'
    script = Script([(404, not_found, JSON), (200, ok, JSON)])
    hashes = {f"service_{i:05d}:secret": HASH for i in range(2000)}
    with trio.fail_after(WAIT):
        async with scripted_client(script, tmp_path) as client:
            assert (await client.check_keys(hashes)).ids == ()
            assert (await client.check_keys(hashes)).ids == ()
    chunks = len(change_check_requests(hashes))
    methods = [(s.method, s.target.partition("?")[0]) for s in script.seen]
    # One probe of the extension, then only the query form (Go Knox's), remembered.
    assert methods == [("POST", "/v0/changes/")] + [("GET", "/v0/keys/")] * (2 * chunks)
