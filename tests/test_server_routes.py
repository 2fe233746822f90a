"""The Knox v0 routes over real TLS: trio + httpx against the served app, a real store (SQLite,
and PostgreSQL when the tests have one), real certificates. Every route, every error code and
text, bad input, races and list filtering."""

from __future__ import annotations

import base64
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio
from hypothesis import given
from hypothesis import strategies as st

from knox.errors import BadRequestDataError
from knox.model import (
    Access,
    AccessType,
    KeyVersion,
    Machine,
    PrincipalMux,
    PrincipalType,
    Service,
    User,
    VersionStatus,
    acl_allows,
    version_hash,
)
from knox_server.app import (
    AppSettings,
    _match,
    _ReadFilter,
    create_app,
    decode_base64,
    parse_form,
    parse_query,
    parse_version_id,
)
from knox_server.audit import AuditLog
from knox_server.auth import ERR_NO_PROVIDER, ERR_NO_SPIFFE, ERR_UNKNOWN_USER, Authenticator
from knox_server.crypto import MasterKeyring
from knox_server.main import open_store
from knox_server.rowcodec import decode_versions, encode_versions
from knox_server.serve import ServeSettings, serve
from knox_server.tokens import TokenDB, hash_token, new_token
from tests.conftest import Backend
from tests.pki import CA, CertPair, ssl_client_context
from tests.server_fixtures import dev_server

HOST = "knox-test-host"
MACHINE = "web1.example.com"
SPIFFE = "spiffe://example.org/ns/prod/sa/web"
DEFAULT_ACL = (Access(PrincipalType.USER_GROUP, "security-team", AccessType.ADMIN),)
WAIT = 20


@dataclass(frozen=True)
class PKI:
    ca: CA
    server: CertPair
    machine: CertPair
    spiffe: CertPair
    two_uris: CertPair
    tokens: Mapping[str, str]


def make_pki() -> PKI:
    """A CA, a server certificate, client certificates and user tokens."""
    ca = CA.create()
    return PKI(
        ca=ca,
        server=ca.server_cert(),
        machine=ca.machine_cert(MACHINE),
        spiffe=ca.spiffe_cert(SPIFFE),
        two_uris=ca.two_uri_cert(SPIFFE, "spiffe://example.org/other"),
        tokens={"alice": new_token(), "bob": new_token(), "carol": new_token()},
    )


@pytest.fixture(scope="module")
def pki() -> PKI:
    return make_pki()


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    raw: bytes
    body: dict[str, Any] | None

    @property
    def code(self) -> int:
        assert self.body is not None, self.raw
        return int(self.body["code"])

    @property
    def message(self) -> str:
        assert self.body is not None, self.raw
        return str(self.body["message"])

    @property
    def data(self) -> Any:
        assert self.body is not None, self.raw
        return self.body["data"]


@dataclass
class Knox:
    """A served knox_server with a client per identity (users, machine, service, anon)."""

    url: str
    audit_path: Path
    clients: dict[str, httpx.AsyncClient] = field(default_factory=dict)
    auth: dict[str, str] = field(default_factory=dict)

    async def call(
        self,
        who: str,
        method: str,
        path: str,
        *,
        form: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        authorization: str | None = None,
    ) -> Reply:
        send_headers = dict(headers or {})
        auth = authorization if authorization is not None else self.auth.get(who)
        if auth:
            send_headers["Authorization"] = auth
        if form is not None:
            send_headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
            content = httpx.QueryParams(form).__str__().encode()
        with trio.fail_after(WAIT):
            response = await self.clients[who].request(
                method, self.url + path, content=content, headers=send_headers
            )
        raw = response.content
        body = None
        if response.headers.get("content-type") == "application/json":
            assert raw.endswith(b"\n"), raw
            body = json.loads(raw)
            assert list(body) == ["status", "code", "host", "ts", "message", "data"]
            assert body["host"] == HOST
            assert body["status"] == ("ok" if body["code"] == 0 else "error")
        return Reply(response.status_code, response.headers, raw, body)

    async def create(
        self, key_id: str, data: bytes = b"secret", who: str = "alice", **extra: str
    ) -> int:
        reply = await self.call(
            who, "POST", "/v0/keys/", form={"id": key_id, "data": b64(data), **extra}
        )
        assert reply.status == 200, reply.raw
        return int(reply.data)

    async def grant(self, key_id: str, entry: Mapping[str, str], who: str = "alice") -> None:
        reply = await self.call(
            who, "PUT", f"/v0/keys/{key_id}/access/", form={"access": json.dumps(entry)}
        )
        assert reply.status == 200, reply.raw

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@asynccontextmanager
async def served_knox(
    pki: PKI,
    tmp_path: Path,
    *,
    knox_compat_list: bool = False,
    max_body_bytes: int = 64 * 1024,
    clock: Callable[[], int] = time.time_ns,
    keyring: MasterKeyring | None = None,
    audit_name: str = "audit.jsonl",
    store_url: str | None = None,
) -> AsyncIterator[Knox]:
    """Serve a knox_server over TLS: the store at ``store_url`` (default: the SQLite file
    ``tmp_path/knox.db``; two servers on one store are like two replicas), a new master key unless
    ``keyring`` is given, and the audit file ``tmp_path/audit_name``."""
    ca_path = pki.ca.write_cert(tmp_path / "ca.pem")
    cert, key = pki.server.write(tmp_path, "server")
    tokens = TokenDB(
        [
            ("alice", ["security-team"], hash_token(pki.tokens["alice"])),
            ("bob", [], hash_token(pki.tokens["bob"])),
            ("carol", ["readers"], hash_token(pki.tokens["carol"])),
        ]
    )
    store = await open_store(store_url or f"sqlite:///{tmp_path / 'knox.db'}", migrate=True)
    audit = AuditLog.to_file(tmp_path / audit_name)
    app = create_app(
        store=store,
        keyring=keyring or MasterKeyring({1: os.urandom(32)}),
        authenticator=Authenticator(pki.ca.cert_pem, tokens),
        audit=audit,
        settings=AppSettings(
            host=HOST,
            default_acl=DEFAULT_ACL,
            knox_compat_list=knox_compat_list,
            max_body_bytes=max_body_bytes,
            clock=clock,
        ),
    )
    settings = ServeSettings(listen=("127.0.0.1:0",), cert=cert, key=key, client_ca=ca_path)
    identities: dict[str, tuple[CertPair | None, str | None]] = {
        "alice": (None, "0u" + pki.tokens["alice"]),
        "bob": (None, "0u" + pki.tokens["bob"]),
        "carol": (None, "0u" + pki.tokens["carol"]),
        "machine": (pki.machine, "0t" + MACHINE),
        "service": (pki.spiffe, "0sx"),
        "two_uris": (pki.two_uris, "0sx"),
        "anon": (None, None),
    }
    try:
        async with trio.open_nursery() as nursery:
            urls: list[str] = await nursery.start(serve, app, settings)
            knox = Knox(url=urls[0], audit_path=tmp_path / audit_name)
            for name, (pair, header) in identities.items():
                ctx: ssl.SSLContext = ssl_client_context(pki.ca, pair, tmp_path)
                knox.clients[name] = httpx.AsyncClient(verify=ctx, timeout=WAIT)
                if header:
                    knox.auth[name] = header
            try:
                yield knox
            finally:
                for client in knox.clients.values():
                    await client.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
        audit.close()


@pytest.fixture
async def knox(pki: PKI, tmp_path: Path, backend: Backend) -> AsyncIterator[Knox]:
    async with served_knox(pki, tmp_path, store_url=backend.url) as served:
        yield served


# --- envelope, routing, 404/405, health -------------------------------------------------------


async def test_envelope_headers_and_trailing_newline(knox: Knox) -> None:
    reply = await knox.call("alice", "GET", "/v0/keys/")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.body is not None
    assert reply.body["status"] == "ok" and reply.code == 0 and reply.message == ""
    assert reply.data == []
    assert isinstance(reply.body["ts"], int) and reply.body["ts"] > 1_600_000_000 * 10**9


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PATCH", "/v0/keys/k1/"),
        ("HEAD", "/v0/keys/k1/"),
        ("POST", "/v0/keys/k1/"),
        ("DELETE", "/v0/keys/"),
        ("PUT", "/v0/keys/"),
        ("GET", "/v0/keys/k1/versions/"),
        ("POST", "/v0/keys/k1/access/"),
        ("GET", "/v0/keys/k1/versions/12/"),
    ],
)
async def test_wrong_method_on_known_path_is_empty_405_before_auth(
    knox: Knox, method: str, path: str
) -> None:
    reply = await knox.call("anon", method, path)
    assert reply.status == 405
    assert reply.raw == b""
    assert "content-type" not in reply.headers
    record = knox.audit()[-1]
    assert (record["route"], record["status"], record["code"]) == ("405", 405, None)


@pytest.mark.parametrize(
    "path",
    [
        "/v0/keys/k1",
        "/v0/keys",
        "/v0/keys//",
        "/v0/keys/k1/nope/",
        "/v0/keys/k1/versions/1/x/",
        "/",
    ],
)
async def test_unknown_path_is_404_code_8_after_auth(knox: Knox, path: str) -> None:
    unauthenticated = await knox.call("anon", "GET", path)
    assert (unauthenticated.status, unauthenticated.code) == (401, 5)
    reply = await knox.call("alice", "POST", path)
    assert (reply.status, reply.code, reply.message, reply.data) == (404, 8, "", None)
    assert knox.audit()[-1]["route"] == "404"


def test_unclean_paths_never_match_a_route() -> None:
    for path in ("/v0/keys/./", "/v0/keys/../", "/v0/keys/k/../", "/v0/keys/k//access/"):
        assert _match(path) is None
    assert _match("/v0/keys/access/") is not None  # a key may be called "access"


async def test_healthz_needs_no_auth_and_is_not_audited(knox: Knox) -> None:
    reply = await knox.call("anon", "GET", "/healthz")
    assert (reply.status, reply.raw) == (200, b"ok\n")
    assert (await knox.call("anon", "POST", "/healthz")).status == 405
    assert knox.audit() == []


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "authorization", "message"),
    [
        ("anon", "0xsomething", ERR_NO_PROVIDER),
        ("anon", "0u", ERR_NO_PROVIDER),
        ("anon", "0unot-a-known-token", ERR_UNKNOWN_USER),
        # chain-valid machine cert, but the claimed name is not a DNS SAN: Knox reports the
        # SPIFFE fallback's error, the last provider tried
        ("machine", "0tother.example.com", ERR_NO_SPIFFE),
        ("two_uris", "0sx", "auth: more than one service identity specified in certificate"),
        ("anon", "0tweb1.example.com", "auth: No peer certs configured"),
    ],
)
async def test_authentication_failures_are_401_code_5(
    knox: Knox, who: str, authorization: str, message: str
) -> None:
    reply = await knox.call(who, "GET", "/v0/keys/", authorization=authorization)
    assert (reply.status, reply.code, reply.message) == (401, 5, message)
    record = knox.audit()[-1]
    assert record["code"] == 5 and record["principal"] is None


async def test_machine_service_and_user_authenticate(knox: Knox) -> None:
    for who in ("alice", "machine", "service"):
        reply = await knox.call(who, "GET", "/v0/keys/")
        assert (reply.status, reply.code) == (200, 0)
    principals = [r["principal"] for r in knox.audit()]
    assert principals == ["alice", MACHINE, SPIFFE]


# --- create -----------------------------------------------------------------------------------


async def test_create_then_get_key_and_acl(knox: Knox) -> None:
    given_acl = [{"type": "Machine", "id": MACHINE, "access": "Read"}]
    version_id = await knox.create("app:db_password", b"hunter2", acl=json.dumps(given_acl))
    assert 0 <= version_id < 2**63
    key = (await knox.call("alice", "GET", "/v0/keys/app:db_password/")).data
    assert key["id"] == "app:db_password"
    assert key["acl"] == []
    assert [(v["id"], v["status"]) for v in key["versions"]] == [(version_id, "Primary")]
    assert base64.b64decode(key["versions"][0]["data"]) == b"hunter2"
    assert key["hash"] == version_hash([KeyVersion(version_id, b"", VersionStatus.PRIMARY, 0)])
    acl = (await knox.call("bob", "GET", "/v0/keys/app:db_password/access/")).data
    assert acl == [
        *given_acl,
        {"type": "User", "id": "alice", "access": "Admin"},
        {"type": "UserGroup", "id": "security-team", "access": "Admin"},
    ]
    # the machine was granted Read in the create request
    assert (await knox.call("machine", "GET", "/v0/keys/app:db_password/")).status == 200


async def test_create_with_null_acl_and_first_form_value_wins(knox: Knox) -> None:
    body = f"id=first&id=second&data={b64(b'x')}&acl=null".encode()
    reply = await knox.call(
        "alice",
        "POST",
        "/v0/keys/?id=from_query",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status == 200, reply.raw
    assert (await knox.call("alice", "GET", "/v0/keys/")).data == ["first"]


async def test_only_users_create_keys_checked_before_the_key_id(knox: Knox) -> None:
    for who, principal in (("machine", MACHINE), ("service", SPIFFE)):
        reply = await knox.call(who, "POST", "/v0/keys/", form={"id": "bad!id", "data": "eA=="})
        assert (reply.status, reply.code) == (403, 6)
        assert reply.message == f"Must be a user to create keys, principal is {principal}"


@pytest.mark.parametrize(
    ("form", "status", "code", "message"),
    [
        ({"data": "eA=="}, 400, 9, "Missing parameter 'id'"),
        ({"id": "k"}, 400, 10, "Missing parameter 'data'"),
        ({"id": "k", "data": ""}, 400, 10, "Parameter 'data' is empty"),
        ({"id": "k", "data": "not base64!"}, 400, 11, "illegal base64 data at input byte 3"),
        ({"id": "k", "data": "eA"}, 400, 11, "illegal base64 data at input byte 0"),
        ({"id": "k", "data": "eA==", "acl": "[{"}, 400, 11, "invalid JSON in acl"),
        ({"id": "", "data": "eA=="}, 400, 12, "KeyID includes unsupported characters "),
        ({"id": "bad!id", "data": "eA=="}, 400, 12, "KeyID includes unsupported characters bad!id"),
        (
            {"id": "k" * 513, "data": "eA=="},
            400,
            12,
            "KeyID includes unsupported characters " + "k" * 513,
        ),
        (
            {"id": "k", "data": "eA==", "acl": '[{"type":"Robot","id":"r2","access":"Read"}]'},
            400,
            13,
            "json: Invalid PrincipalType to convert",
        ),
        (
            {"id": "k", "data": "eA==", "acl": '[{"type":"User","id":"x","access":"None"}]'},
            500,
            1,
            "ACL contains None access",
        ),
    ],
)
async def test_create_errors(
    knox: Knox, form: dict[str, str], status: int, code: int, message: str
) -> None:
    reply = await knox.call("alice", "POST", "/v0/keys/", form=form)
    assert (reply.status, reply.code, reply.message) == (status, code, message)
    assert (await knox.call("alice", "GET", "/v0/keys/")).data == []


async def test_create_existing_key_is_code_2(knox: Knox) -> None:
    await knox.create("dup", b"one")
    reply = await knox.call("alice", "POST", "/v0/keys/", form={"id": "dup", "data": b64(b"2")})
    assert (reply.status, reply.code, reply.message) == (400, 2, "Key dup already exists")
    key = (await knox.call("alice", "GET", "/v0/keys/dup/")).data
    assert base64.b64decode(key["versions"][0]["data"]) == b"one"


async def test_key_id_of_512_bytes_is_accepted(knox: Knox) -> None:
    await knox.create("k" * 512)
    assert (await knox.call("alice", "GET", "/v0/keys/" + "k" * 512 + "/")).status == 200


# --- get key ----------------------------------------------------------------------------------


async def test_get_key_filters_by_status_and_keeps_the_full_hash(knox: Knox) -> None:
    primary = await knox.create("rot", b"v1")
    active = int(
        (await knox.call("alice", "POST", "/v0/keys/rot/versions/", form={"data": b64(b"v2")})).data
    )
    inactive = int(
        (await knox.call("alice", "POST", "/v0/keys/rot/versions/", form={"data": b64(b"v3")})).data
    )
    reply = await knox.call(
        "alice", "PUT", f"/v0/keys/rot/versions/{inactive}/", form={"status": '"Inactive"'}
    )
    assert reply.status == 200 and reply.data is None
    expected_hash = version_hash(
        [
            KeyVersion(primary, b"", VersionStatus.PRIMARY, 0),
            KeyVersion(active, b"", VersionStatus.ACTIVE, 0),
            KeyVersion(inactive, b"", VersionStatus.INACTIVE, 0),
        ]
    )
    cases = {
        "": [primary, active],
        '?status="Active"': [primary, active],
        "?status=%22Primary%22": [primary],
        '?status="Inactive"': [primary, active, inactive],
    }
    for query, ids in cases.items():
        key = (await knox.call("alice", "GET", "/v0/keys/rot/" + query)).data
        assert [v["id"] for v in key["versions"]] == ids, query
        assert key["hash"] == expected_hash
        assert key["acl"] == []
    assert knox.audit()[-1]["params"]["status"] == '"Inactive"'


@pytest.mark.parametrize("status", ["Active", '"active"', '"Deleted"', ""])
async def test_get_key_bad_status_is_code_11(knox: Knox, status: str) -> None:
    await knox.create("k")
    reply = await knox.call("alice", "GET", f"/v0/keys/k/?status={status}")
    assert (reply.status, reply.code, reply.message) == (
        400,
        11,
        "json: Invalid VersionStatus to convert",
    )


async def test_get_key_existence_is_checked_before_authorization(knox: Knox) -> None:
    await knox.create("private")
    missing = await knox.call("machine", "GET", "/v0/keys/nope/")
    assert (missing.status, missing.code, missing.message) == (404, 4, "No such key nope")
    bad_id = await knox.call("machine", "GET", "/v0/keys/bad!id/")
    assert (bad_id.status, bad_id.code, bad_id.message) == (404, 4, "No such key bad!id")
    denied = await knox.call("machine", "GET", "/v0/keys/private/")
    assert (denied.status, denied.code) == (403, 6)
    assert denied.message == f"Principal {MACHINE} not authorized to read private"


async def test_path_segments_are_percent_decoded(knox: Knox) -> None:
    await knox.create("team:key")
    reply = await knox.call("alice", "GET", "/v0/keys/team%3Akey/")
    assert reply.status == 200 and reply.data["id"] == "team:key"


async def test_group_membership_grants_access(knox: Knox) -> None:
    await knox.create("shared")
    assert (await knox.call("carol", "GET", "/v0/keys/shared/")).status == 403
    await knox.grant("shared", {"type": "UserGroup", "id": "readers", "access": "Read"})
    assert (await knox.call("carol", "GET", "/v0/keys/shared/")).status == 200


# --- delete -----------------------------------------------------------------------------------


async def test_delete_needs_admin(knox: Knox) -> None:
    await knox.create("gone")
    await knox.grant("gone", {"type": "User", "id": "bob", "access": "Write"})
    denied = await knox.call("bob", "DELETE", "/v0/keys/gone/")
    assert (denied.status, denied.code, denied.message) == (
        403,
        6,
        "Principal bob not authorized to delete gone",
    )
    reply = await knox.call("alice", "DELETE", "/v0/keys/gone/")
    assert (reply.status, reply.data) == (200, None)
    assert (await knox.call("alice", "GET", "/v0/keys/gone/")).code == 4
    assert (await knox.call("alice", "DELETE", "/v0/keys/gone/")).code == 4


# --- access -----------------------------------------------------------------------------------


async def test_get_access_needs_no_authorization(knox: Knox) -> None:
    await knox.create("k")
    reply = await knox.call("machine", "GET", "/v0/keys/k/access/")
    assert reply.status == 200
    assert {"type": "User", "id": "alice", "access": "Admin"} in reply.data
    assert (await knox.call("machine", "GET", "/v0/keys/nope/access/")).code == 4


async def test_put_access_forms(knox: Knox) -> None:
    await knox.create("k")
    machine = {"type": "Machine", "id": MACHINE, "access": "Read"}
    await knox.grant("k", machine)
    raw_url = base64.urlsafe_b64encode(
        json.dumps({"type": "User", "id": "bob", "access": "Write"}).encode()
    ).rstrip(b"=")
    assert (
        await knox.call("alice", "PUT", "/v0/keys/k/access/", form={"access": raw_url.decode()})
    ).status == 200
    # access wins over acl
    both = {
        "access": json.dumps({"type": "User", "id": "carol", "access": "Read"}),
        "acl": json.dumps([{"type": "User", "id": "dave", "access": "Read"}]),
    }
    assert (await knox.call("alice", "PUT", "/v0/keys/k/access/", form=both)).status == 200
    many = [
        {"type": "Machine", "id": MACHINE, "access": "Write"},  # replaces
        {"type": "User", "id": "carol", "access": "None"},  # removes
        {"type": "MachinePrefix", "id": "web", "access": "Read"},
    ]
    reply = await knox.call("alice", "PUT", "/v0/keys/k/access/", form={"acl": json.dumps(many)})
    assert (reply.status, reply.data) == (200, None)
    acl = (await knox.call("alice", "GET", "/v0/keys/k/access/")).data
    assert acl == [
        {"type": "User", "id": "alice", "access": "Admin"},
        {"type": "UserGroup", "id": "security-team", "access": "Admin"},
        {"type": "Machine", "id": MACHINE, "access": "Write"},
        {"type": "User", "id": "bob", "access": "Write"},
        {"type": "MachinePrefix", "id": "web", "access": "Read"},
    ]


@pytest.mark.parametrize(
    ("form", "code", "message"),
    [
        ({}, 11, "Missing acl and access parameters"),
        ({"access": "{not json"}, 11, "illegal base64 data at input byte 0"),
        ({"access": "e30"}, 11, "access: missing field 'type'"),
        ({"acl": "[1]"}, 11, "acl[0]: expected an object"),
        (
            {"access": json.dumps({"type": "MachinePrefix", "id": "", "access": "Read"})},
            13,
            "Principals of type user, user group, machine, or machine prefix may not be empty.",
        ),
        (
            {
                "access": json.dumps(
                    {"type": "ServicePrefix", "id": "spiffe://x/y", "access": "Read"}
                )
            },
            13,
            "Service prefix had no trailing slash, must conform to "
            "'spiffe://<domain>/<path>/' format.",
        ),
        (
            {"access": json.dumps({"type": "Service", "id": "http://x/y", "access": "Read"})},
            13,
            "Service prefix is invalid URL, must conform to 'spiffe://<domain>/<path>/' format.",
        ),
        (
            {"acl": json.dumps([{"type": "Robot", "id": "r2", "access": "Read"}])},
            13,
            "json: Invalid PrincipalType to convert",
        ),
    ],
)
async def test_put_access_errors(knox: Knox, form: dict[str, str], code: int, message: str) -> None:
    await knox.create("k")
    before = (await knox.call("alice", "GET", "/v0/keys/k/access/")).data
    reply = await knox.call("alice", "PUT", "/v0/keys/k/access/", form=form)
    assert (reply.status, reply.code, reply.message) == (400, code, message)
    assert (await knox.call("alice", "GET", "/v0/keys/k/access/")).data == before


async def test_put_access_needs_admin_and_an_existing_key(knox: Knox) -> None:
    await knox.create("k")
    entry = {"access": json.dumps({"type": "User", "id": "bob", "access": "Admin"})}
    denied = await knox.call("bob", "PUT", "/v0/keys/k/access/", form=entry)
    assert (denied.status, denied.code, denied.message) == (
        403,
        6,
        "Principal bob not authorized to update access for k",
    )
    missing = await knox.call("alice", "PUT", "/v0/keys/nope/access/", form=entry)
    assert (missing.status, missing.code, missing.message) == (404, 4, "No such key nope")


# --- versions ---------------------------------------------------------------------------------


async def test_add_version_needs_write_and_is_active(knox: Knox) -> None:
    await knox.create("k")
    await knox.grant("k", {"type": "Machine", "id": MACHINE, "access": "Read"})
    denied = await knox.call("machine", "POST", "/v0/keys/k/versions/", form={"data": "eA=="})
    assert (denied.status, denied.code, denied.message) == (
        403,
        6,
        f"Principal {MACHINE} not authorized to write k",
    )
    await knox.grant("k", {"type": "Machine", "id": MACHINE, "access": "Write"})
    reply = await knox.call("machine", "POST", "/v0/keys/k/versions/", form={"data": b64(b"new")})
    assert reply.status == 200
    key = (await knox.call("machine", "GET", "/v0/keys/k/")).data
    assert [(v["id"], v["status"]) for v in key["versions"]][1] == (reply.data, "Active")
    assert base64.b64decode(key["versions"][1]["data"]) == b"new"


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({}, "Missing parameter 'data'"),
        ({"data": ""}, "Parameter 'data' is empty"),
        ({"data": "YQ==YQ=="}, "illegal base64 data at input byte 4"),
        ({"data": "YQ=x"}, "illegal base64 data at input byte 2"),
    ],
)
async def test_add_version_bad_data_is_code_11(
    knox: Knox, form: dict[str, str], message: str
) -> None:
    await knox.create("k")
    reply = await knox.call("alice", "POST", "/v0/keys/k/versions/", form=form)
    assert (reply.status, reply.code, reply.message) == (400, 11, message)


async def test_add_version_to_missing_key_is_code_4(knox: Knox) -> None:
    reply = await knox.call("alice", "POST", "/v0/keys/nope/versions/", form={"data": "eA=="})
    assert (reply.status, reply.code) == (404, 4)


async def test_status_transitions(knox: Knox) -> None:
    first = await knox.create("k")
    second = int(
        (await knox.call("alice", "POST", "/v0/keys/k/versions/", form={"data": "eA=="})).data
    )

    async def put(version: int | str, status: str) -> tuple[int, int, str]:
        reply = await knox.call(
            "alice", "PUT", f"/v0/keys/k/versions/{version}/", form={"status": status}
        )
        return reply.status, reply.code, reply.message

    async def statuses() -> dict[int, str]:
        key = (await knox.call("alice", "GET", '/v0/keys/k/?status="Inactive"')).data
        return {v["id"]: v["status"] for v in key["versions"]}

    assert await put(second, '"Primary"') == (200, 0, "")
    assert await statuses() == {first: "Active", second: "Primary"}
    assert await put(second, '"Inactive"') == (
        400,
        11,
        "Version must be Active to demote to Inactive",
    )
    assert await put(first, '"Active"') == (
        400,
        11,
        "Primary Key can not be demoted. Specify Active key to promote.",
    )
    assert await put(first, '"Inactive"') == (200, 0, "")
    assert await put(first, '"Primary"') == (
        400,
        11,
        "Version must be Active to promote to Primary",
    )
    assert await put(first, '"Active"') == (200, 0, "")
    assert await statuses() == {first: "Active", second: "Primary"}
    assert await put(12345, '"Active"') == (404, 3, "Key version not found")
    assert await put("abc", '"Active"') == (
        400,
        11,
        'strconv.ParseUint: parsing "abc": invalid syntax',
    )
    assert await put("18446744073709551616", '"Active"') == (
        400,
        11,
        'strconv.ParseUint: parsing "18446744073709551616": value out of range',
    )
    assert await put(first, '"Deleted"') == (400, 11, "json: Invalid VersionStatus to convert")
    missing = await knox.call("alice", "PUT", f"/v0/keys/k/versions/{first}/", form={})
    assert (missing.status, missing.code, missing.message) == (
        400,
        11,
        "Missing parameter 'status'",
    )
    denied = await knox.call(
        "bob", "PUT", f"/v0/keys/k/versions/{first}/", form={"status": '"Inactive"'}
    )
    assert (denied.status, denied.code, denied.message) == (
        403,
        6,
        "Principal bob not authorized to write k",
    )


# --- listing and the change check -------------------------------------------------------------


async def _two_keys(knox: Knox) -> dict[str, str]:
    for key_id in ("k1", "k2"):
        await knox.create(key_id)
    await knox.grant("k1", {"type": "MachinePrefix", "id": "web", "access": "Read"})
    hashes = {}
    for key_id in ("k1", "k2"):
        hashes[key_id] = (await knox.call("alice", "GET", f"/v0/keys/{key_id}/")).data["hash"]
    return hashes


async def test_list_shows_only_readable_keys(knox: Knox) -> None:
    hashes = await _two_keys(knox)
    assert sorted((await knox.call("alice", "GET", "/v0/keys/")).data) == ["k1", "k2"]
    assert (await knox.call("machine", "GET", "/v0/keys/")).data == ["k1"]
    assert (await knox.call("service", "GET", "/v0/keys/")).data == []
    reply = await knox.call("machine", "GET", "/v0/keys/?k1=NONE&k2=NONE")
    assert reply.data == ["k1"]
    assert (await knox.call("machine", "GET", f"/v0/keys/?k1={hashes['k1']}")).data == []
    assert knox.audit()[-1]["query_ids"] == 1


async def test_change_query_semantics(knox: Knox) -> None:
    hashes = await _two_keys(knox)
    k1, k2 = hashes["k1"], hashes["k2"]

    async def changed(query: str) -> list[str]:
        reply = await knox.call("alice", "GET", "/v0/keys/?" + query)
        assert reply.status == 200
        return sorted(reply.data)

    assert await changed(f"k1={k1}&k2={k2}") == []
    assert await changed(f"k1={k1}&k2=NONE&unknown=NONE") == ["k2"]
    assert await changed(f"k1=NONE&k1={k1}") == []  # the last value wins
    assert await changed(f"k1={k1}&k1=NONE") == ["k1"]
    assert await changed("k1") == ["k1"]  # no value: changed
    assert await changed("unknown=x") == []
    assert await changed("") == ["k1", "k2"]  # no query: every key


async def test_knox_compat_list_shows_every_key(pki: PKI, tmp_path: Path) -> None:
    async with served_knox(pki, tmp_path, knox_compat_list=True) as knox:
        await _two_keys(knox)
        assert sorted((await knox.call("service", "GET", "/v0/keys/")).data) == ["k1", "k2"]
        reply = await knox.call("service", "GET", "/v0/keys/?k1=NONE&k2=NONE")
        assert sorted(reply.data) == ["k1", "k2"]


# --- bodies -----------------------------------------------------------------------------------


async def test_oversized_body_is_code_11_before_auth(pki: PKI, tmp_path: Path) -> None:
    async with served_knox(pki, tmp_path, max_body_bytes=1024) as knox:
        form = {"id": "big", "data": b64(b"x" * 2048)}
        for who in ("anon", "alice"):
            reply = await knox.call(who, "POST", "/v0/keys/", form=form)
            assert (reply.status, reply.code, reply.message) == (
                400,
                11,
                "Request body larger than 1024 bytes",
            )

        # a body sent without a length (chunked) is cut off at the limit too
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"a" * 512

        with trio.fail_after(WAIT):
            response = await knox.clients["alice"].post(
                knox.url + "/v0/keys/k/versions/",
                content=chunks(),
                headers={"Authorization": knox.auth["alice"]},
            )
        assert response.status_code == 400 and response.json()["code"] == 11
        assert (await knox.call("alice", "GET", "/v0/keys/")).data == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"id=k&data=%zz", 'invalid URL escape "%zz"'),
        (b"id=k;data=eA==", "invalid semicolon separator in query"),
        (b"id=k&data=\xff", "invalid form body: not UTF-8"),
        (b"id=k&data=%ff", "invalid form body: not UTF-8"),
    ],
)
async def test_malformed_form_body_is_code_11(knox: Knox, body: bytes, message: str) -> None:
    reply = await knox.call(
        "alice",
        "POST",
        "/v0/keys/",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert (reply.status, reply.code, reply.message) == (400, 11, message)


async def test_body_that_is_not_a_form_has_no_fields(knox: Knox) -> None:
    reply = await knox.call(
        "alice",
        "POST",
        "/v0/keys/",
        content=b"id=k&data=eA==",
        headers={"Content-Type": "text/plain"},
    )
    assert (reply.status, reply.code, reply.message) == (400, 9, "Missing parameter 'id'")


# --- internal errors ---------------------------------------------------------------------------


async def test_tampered_data_is_code_1_with_a_safe_message(knox: Knox, backend: Backend) -> None:
    await knox.create("k", b"top secret")
    raw = backend.column("k", "versions")
    assert isinstance(raw, bytes)
    versions = decode_versions(raw)
    sealed = bytearray(versions[0].sealed)
    sealed[-1] ^= 1
    tampered = (replace(versions[0], sealed=bytes(sealed)),)
    backend.set_column("k", "versions", encode_versions(tampered))
    with structlog.testing.capture_logs() as logs:
        reply = await knox.call("alice", "GET", "/v0/keys/k/")
    assert (reply.status, reply.code) == (500, 1)
    assert reply.message.startswith("sealed data does not authenticate")
    record = knox.audit()[-1]
    assert (record["code"], record["status"]) == (1, 500)
    assert [e["request_id"] for e in logs if e["event"] == "request_failed"] == [
        record["request_id"]
    ]
    # the key's other routes still work
    assert (await knox.call("alice", "GET", "/v0/keys/k/access/")).status == 200


async def test_unexpected_exception_is_an_envelope_not_a_traceback(
    pki: PKI, tmp_path: Path
) -> None:
    # A clock past 2262 gives timestamps beyond int64, which sealing refuses with a ValueError.
    async with served_knox(pki, tmp_path, clock=lambda: 2**63) as knox:
        with structlog.testing.capture_logs() as logs:
            reply = await knox.call("alice", "POST", "/v0/keys/", form={"id": "k", "data": "eA=="})
        assert (reply.status, reply.code, reply.message) == (500, 1, "Internal Server Error")
        record = knox.audit()[-1]
        assert (record["route"], record["code"], record["message"]) == (
            "postkeys",
            1,
            "Internal Server Error",
        )
        (event,) = [e for e in logs if e["event"] == "internal_error"]
        assert event["request_id"] == record["request_id"] and event["exc_info"] is True
        # the server keeps serving
        assert (await knox.call("alice", "GET", "/v0/keys/")).status == 200


# --- concurrency ------------------------------------------------------------------------------


async def test_racing_version_adds_lose_nothing(pki: PKI, tmp_path: Path, backend: Backend) -> None:
    keyring = MasterKeyring({1: os.urandom(32)})
    async with (
        served_knox(pki, tmp_path, keyring=keyring, store_url=backend.url) as one,
        served_knox(
            pki, tmp_path, keyring=keyring, audit_name="audit2.jsonl", store_url=backend.url
        ) as two,
    ):
        first = await one.create("race")
        await one.grant("race", {"type": "Machine", "id": MACHINE, "access": "Write"})
        added: list[int] = []
        lost_races = 0

        async def add(server: Knox, who: str, n: int) -> None:
            nonlocal lost_races
            # Like the Go client, retry a 500 (a race with the other server lost too often).
            for _ in range(10):
                reply = await server.call(
                    who, "POST", "/v0/keys/race/versions/", form={"data": b64(b"%d" % n)}
                )
                if reply.status == 200:
                    added.append(int(reply.data))
                    return
                assert (reply.status, reply.code) == (500, 1), reply.raw
                lost_races += 1
            raise AssertionError("a version add never succeeded")

        # Two principals, each through its own server (two workers, one database), many
        # concurrent adds each: same-server writers queue, cross-server races are retried.
        async with trio.open_nursery() as nursery:
            for n in range(15):
                nursery.start_soon(add, one, "alice", n)
                nursery.start_soon(add, two, "machine", 100 + n)
        key = (await two.call("alice", "GET", '/v0/keys/race/?status="Inactive"')).data
    assert len(added) == 30 and lost_races < 30
    assert sorted(v["id"] for v in key["versions"]) == sorted([first, *added])
    payloads = sorted(base64.b64decode(v["data"]) for v in key["versions"])
    assert payloads == sorted([b"secret"] + [b"%d" % n for n in (*range(15), *range(100, 115))])
    assert key["hash"] == version_hash(
        [KeyVersion(v["id"], b"", VersionStatus(v["status"]), 0) for v in key["versions"]]
    )


# --- pure helpers -----------------------------------------------------------------------------


def test_parse_form_and_query() -> None:
    assert parse_form(b"a=1&a=2&b=x+y%2B&c") == {"a": "1", "b": "x y+", "c": ""}
    assert parse_query("a=1&a=2&bad=%zz&semi=1;2&b", last_wins=True) == {"a": "2", "b": ""}
    assert parse_query("a=1&a=2", last_wins=False) == {"a": "1"}


@pytest.mark.parametrize(
    ("text", "raw_url", "result"),
    [
        ("aGk=", False, b"hi"),
        ("aGk\r\n=", False, b"hi"),
        ("aGk", True, b"hi"),
        ("-_8", True, b"\xfb\xff"),
        ("", False, b""),
    ],
)
def test_decode_base64_accepts_what_go_accepts(text: str, raw_url: bool, result: bytes) -> None:
    assert decode_base64(text, raw_url=raw_url) == result


@pytest.mark.parametrize(
    ("text", "raw_url", "offset"),
    [
        ("a", False, 0),
        ("aGk", False, 0),
        ("aGk==", False, 4),
        ("a===", False, 1),
        ("aG==x", False, 4),
        ("aG=", False, 3),
        ("aGk=", True, 3),
        ("a", True, 0),
        ("+/", True, 0),
    ],
)
def test_decode_base64_offsets_match_go(text: str, raw_url: bool, offset: int) -> None:
    with pytest.raises(BadRequestDataError, match=f"^illegal base64 data at input byte {offset}$"):
        decode_base64(text, raw_url=raw_url)


def test_version_id_must_be_uint64() -> None:
    assert parse_version_id("18446744073709551615") == 2**64 - 1
    assert parse_version_id("007") == 7
    for bad in ("", "-1", "+1", "1.0", "١٢", "9" * 5000):
        with pytest.raises(BadRequestDataError, match=r"^strconv\.ParseUint: parsing "):
            parse_version_id(bad)


_ids = st.sampled_from(["web1", "web", "we", "", "alice", "ops", "spiffe://d/a/", "spiffe://d/a/b"])
_entries = st.builds(
    Access,
    type=st.sampled_from([t for t in PrincipalType if t is not PrincipalType.UNKNOWN]),
    id=_ids,
    access=st.sampled_from(list(AccessType)),
)
_principals = st.lists(
    st.one_of(
        st.builds(User, id=_ids, groups=st.frozensets(_ids, max_size=2)),
        st.builds(Machine, id=_ids),
        st.builds(Service, id=_ids),
    ),
    min_size=1,
    max_size=3,
)


@given(acl=st.lists(_entries, max_size=5), principals=_principals)
def test_read_filter_agrees_with_the_model(acl: list[Access], principals: list[Any]) -> None:
    mux = PrincipalMux(tuple((f"p{i}", p) for i, p in enumerate(principals)))
    assert _ReadFilter(mux)(tuple(acl)) == acl_allows(tuple(acl), mux, AccessType.READ)


# --- the composition root ---------------------------------------------------------------------


async def test_dev_server_serves_this_app_end_to_end(tmp_path: Path) -> None:
    async with dev_server(tmp_path / "dev") as dev:
        user_ctx = ssl.create_default_context(cafile=str(dev.ca))
        host_ctx = ssl.create_default_context(cafile=str(dev.ca))
        host_ctx.load_cert_chain(*dev.host_cert)
        async with (
            httpx.AsyncClient(verify=user_ctx, base_url=dev.url, timeout=WAIT) as user,
            httpx.AsyncClient(verify=host_ctx, base_url=dev.url, timeout=WAIT) as host,
        ):
            admin = {"Authorization": "0u" + dev.admin_token}
            with trio.fail_after(WAIT):
                created = await user.post(
                    "/v0/keys/", data={"id": "dev:k", "data": b64(b"v1")}, headers=admin
                )
                denied = await user.get(
                    "/v0/keys/dev:k/", headers={"Authorization": "0u" + dev.dev_token}
                )
                entry = {"type": "Machine", "id": dev.hostname, "access": "Read"}
                granted = await user.put(
                    "/v0/keys/dev:k/access/", data={"access": json.dumps(entry)}, headers=admin
                )
                read = await host.get(
                    "/v0/keys/dev:k/", headers={"Authorization": "0t" + dev.hostname}
                )
    assert created.status_code == 200 and denied.status_code == 403 and granted.status_code == 200
    assert read.status_code == 200
    assert base64.b64decode(read.json()["data"]["versions"][0]["data"]) == b"v1"
    routes = [
        json.loads(line)["route"]
        for line in (dev.state_dir / "audit.jsonl").read_text().splitlines()
    ]
    assert routes == ["postkeys", "getkey", "putaccess", "getkey"]
