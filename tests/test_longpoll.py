"""The change check's long-poll (``Prefer: wait=N``) over real TLS against the served app and a
real SQLite store: what wakes a held check, what it answers, the waiter bound, clients that go
away, and a change feed that missed a change; then knoxd using it, with an application watching
through the daemon's socket, and knoxd against a server without the extension.

Bounds are the test's own ``fail_after``; a held check that should have been woken waits far
longer than that bound (and knoxd's polling interval is longer too), so a missing wake-up fails
the test instead of passing late."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from knox.client import AsyncClient, AsyncWatchStream
from knox.errors import UnauthorizedError
from knox.http_client import (
    ChangeCheck,
    KnoxHTTPClient,
    change_check_requests,
    ssl_context_for,
)
from knox.model import Access, AccessType, PrincipalType, VersionStatus
from knox.protocol import RevokedEvent, RevokeReason, UpdateEvent
from knox_server.app import MAX_WAIT_SECONDS, AppSettings, create_app, prefer_wait
from knox_server.audit import AuditLog
from knox_server.auth import Authenticator
from knox_server.changes import ChangeHub
from knox_server.crypto import MasterKeyring
from knox_server.pg_store import migrate
from knox_server.serve import ServeSettings, serve
from knox_server.sqlite_store import SQLiteKeyStore
from knox_server.tokens import TokenDB, hash_token, new_token, write_token_file
from knoxd.config import (
    Config,
    DaemonConfig,
    IdentityConfig,
    IdentityKind,
    PeerSelectors,
    UpstreamConfig,
)
from knoxd.daemon import DaemonContext, run_daemon
from knoxd.socket_api.server import SocketContext, serve_sockets
from tests.pki import CA
from tests.polling import until

WAIT = 20
# Longer than any test's bound: a check held this long was never woken.
FOREVER = 600
HOST = "web1.example.com"
KEY = "app:db_password"


# --- the Prefer header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("wait=10", 10),
        ("WAIT=10", 10),
        ("wait = 10", 10),
        ('wait="7"', 7),
        ("respond-async, wait=5", 5),
        ("return=minimal; foo=bar, wait=5; x", 5),
        ("wait=5, wait=7", 5),
        ("wait=600", 60),
        ("wait=0", 0),
        ("wait=99999999999999999999999999999999999999", 60),
        ('foo="a,wait=3", wait=4', 4),
        ("wait=abc, wait=3", None),
        ("wait=-1", None),
        ("wait=1.5", None),
        ("wait=", None),
        ("wait", None),
        ("handling=lenient", None),
        ("", None),
        (None, None),
        ('wait="5', None),
    ],
)
def test_prefer_wait_reads_rfc7240_preferences(header: str | None, expected: int | None) -> None:
    assert prefer_wait(header, 60) == expected


@given(st.text(max_size=200))
def test_prefer_wait_never_raises_and_stays_within_the_cap(header: str) -> None:
    wait = prefer_wait(header, 60)
    assert wait is None or 0 <= wait <= 60


# --- served replicas ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    """What every replica of one deployment shares: the CA, the certificates, the database."""

    ca: CA
    ca_path: Path
    server: tuple[Path, Path]
    host: tuple[Path, Path]
    token: str
    master_key: bytes
    database: Path


def make_files(tmp_path: Path) -> Files:
    ca = CA.create()
    return Files(
        ca=ca,
        ca_path=ca.write_cert(tmp_path / "ca.pem"),
        server=ca.server_cert().write(tmp_path, "server"),
        host=ca.machine_cert(HOST).write(tmp_path, "host"),
        token=new_token(),
        master_key=os.urandom(32),
        database=tmp_path / "knox.db",
    )


@dataclass
class Replica:
    """A served app with its own hub, and clients for the admin user and the host."""

    url: str
    hub: ChangeHub
    admin: KnoxHTTPClient
    host: KnoxHTTPClient
    raw: httpx.AsyncClient
    audit_path: Path

    async def check(self, hashes: dict[str, str], prefer: str | None) -> httpx.Response:
        """A raw change check as the host, with ``Prefer: <prefer>`` if given."""
        headers = {"Authorization": "0t" + HOST}
        if prefer is not None:
            headers["Prefer"] = prefer
        return await self.raw.get(self.url + "/v0/keys/", params=hashes, headers=headers)


def ignoring_prefer(app: Any) -> Any:
    """``app`` as a server without the extension (Go Knox) sees it: no ``Prefer`` header."""

    async def go_knox(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = [(n, v) for n, v in scope["headers"] if n.lower() != b"prefer"]
            scope = {**scope, "headers": headers}
        await app(scope, receive, send)

    return go_knox


@asynccontextmanager
async def served(
    files: Files,
    name: str,
    *,
    max_waiters: int = 100,
    max_wait_seconds: int = MAX_WAIT_SECONDS,
    go_knox: bool = False,
) -> AsyncIterator[Replica]:
    store = await SQLiteKeyStore.open(files.database)
    audit_path = files.database.parent / f"audit-{name}.jsonl"
    audit = AuditLog.to_file(audit_path)
    hub = ChangeHub(max_waiters=max_waiters)
    app = create_app(
        store=store,
        keyring=MasterKeyring({1: files.master_key}),
        authenticator=Authenticator(
            files.ca.cert_pem, TokenDB([("alice", [], hash_token(files.token))])
        ),
        audit=audit,
        settings=AppSettings(host=name, max_wait_seconds=max_wait_seconds),
        hub=hub,
    )
    cert, key = files.server
    settings = ServeSettings(listen=("127.0.0.1:0",), cert=cert, key=key, client_ca=files.ca_path)
    try:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            stack.callback(nursery.cancel_scope.cancel)
            asgi = ignoring_prefer(app) if go_knox else app
            urls: list[str] = await nursery.start(serve, asgi, settings)
            admin = await stack.enter_async_context(
                KnoxHTTPClient(
                    urls[0], auth="0u" + files.token, ssl_context=ssl_context_for(files.ca_path)
                )
            )
            host_tls = ssl_context_for(files.ca_path, *files.host)
            host = await stack.enter_async_context(
                KnoxHTTPClient(urls[0], auth="0t" + HOST, ssl_context=host_tls)
            )
            raw = await stack.enter_async_context(
                httpx.AsyncClient(verify=host_tls, timeout=FOREVER)
            )
            yield Replica(urls[0], hub, admin, host, raw, audit_path)
    finally:
        await store.aclose()
        audit.close()


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return make_files(tmp_path)


@pytest.fixture
async def replica(files: Files) -> AsyncIterator[Replica]:
    async with served(files, "a") as r:
        yield r


async def readable_key(r: Replica, key_id: str = KEY) -> tuple[str, int]:
    """Create a key the host may read, with an Active second version; its hash and that
    version's id."""
    await r.admin.create_key(key_id, b"v1", [Access(PrincipalType.MACHINE, HOST, AccessType.READ)])
    second = await r.admin.add_version(key_id, b"v2")
    return (await r.host.get_key(key_id)).hash, second


@asynccontextmanager
async def held_check(
    replica: Replica, hashes: dict[str, str], wait: int, *, client: KnoxHTTPClient | None = None
) -> AsyncIterator[Held]:
    """A long-poll change check of ``hashes`` (by ``client``, the replica's host by default) in
    the background, entered once ``replica`` holds it; leaving waits for its answer."""
    held = Held()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(held.run, client or replica.host, hashes, wait)
        await until(lambda: replica.hub.waiting == 1)
        yield held


class Held:
    """A long-poll change check running in the background; ``result`` once it answered."""

    def __init__(self) -> None:
        self.result: ChangeCheck | None = None
        self.done = trio.Event()

    async def run(self, client: KnoxHTTPClient, hashes: dict[str, str], wait: int) -> None:
        self.result = await client.check_keys(hashes, wait=wait)
        self.done.set()


# --- one replica -------------------------------------------------------------------------------


async def test_without_prefer_the_check_answers_at_once_as_knox_does(replica: Replica) -> None:
    with trio.fail_after(WAIT):
        current, _ = await readable_key(replica)
        unchanged = await replica.check({KEY: current}, None)
        stale = await replica.check({KEY: "stale", "no:such_key": "x"}, None)
    assert unchanged.json()["data"] == []
    assert stale.json()["data"] == [KEY]
    assert "preference-applied" not in unchanged.headers
    assert "preference-applied" not in stale.headers


async def test_a_long_poll_answers_at_once_when_a_key_already_differs(replica: Replica) -> None:
    with trio.fail_after(WAIT):
        await readable_key(replica)
        answer = await replica.check({KEY: "stale"}, f"wait={FOREVER}")
    assert answer.json()["data"] == [KEY]
    assert answer.headers["preference-applied"] == f"wait={MAX_WAIT_SECONDS}"


async def test_a_promote_wakes_a_held_long_poll(replica: Replica) -> None:
    with trio.fail_after(WAIT):
        current, second = await readable_key(replica)
        async with held_check(replica, {KEY: current}, MAX_WAIT_SECONDS) as held:
            await replica.admin.update_version(KEY, second, VersionStatus.PRIMARY)
        assert held.result == ChangeCheck((KEY,), MAX_WAIT_SECONDS)
        assert (await replica.host.get_key(KEY)).primary.data == b"v2"
    assert replica.hub.waiting == 0


async def test_a_change_that_makes_no_difference_to_the_caller_keeps_it_waiting(
    replica: Replica,
) -> None:
    with trio.fail_after(WAIT):
        current, second = await readable_key(replica)
        other_current, _ = await readable_key(replica, "app:other")
        async with held_check(replica, {KEY: current, "app:other": other_current}, FOREVER) as held:
            # Wakes the check (the key's ACL changed), which re-checks and holds on.
            await replica.admin.put_access(KEY, Access(PrincipalType.USER, "bob", AccessType.READ))
            await trio.sleep(0.2)
            assert not held.done.is_set()
            await replica.admin.update_version(KEY, second, VersionStatus.PRIMARY)
        assert held.result == ChangeCheck((KEY,), MAX_WAIT_SECONDS)


async def test_a_revocation_answers_the_key_and_the_get_then_fails(replica: Replica) -> None:
    with trio.fail_after(WAIT):
        current, _ = await readable_key(replica)
        async with held_check(replica, {KEY: current}, FOREVER) as held:
            await replica.admin.put_access(
                KEY, Access(PrincipalType.MACHINE, HOST, AccessType.NONE)
            )
        assert held.result == ChangeCheck((KEY,), MAX_WAIT_SECONDS)
        with pytest.raises(UnauthorizedError):
            await replica.host.get_key(KEY)
        # Without the preference the check stays Knox's: a key the caller cannot read is hidden.
        assert (await replica.host.check_keys({KEY: current})).ids == ()
        # With it, the loss is reported at once for as long as the caller holds the key.
        again = await replica.check({KEY: current}, "wait=30")
        assert again.json()["data"] == [KEY]


async def test_an_unchanged_long_poll_answers_nothing_after_its_wait(files: Files) -> None:
    async with served(files, "a", max_wait_seconds=1) as replica:
        with trio.fail_after(WAIT):
            current, _ = await readable_key(replica)
            answer = await replica.check({KEY: current, "no:such_key": "x"}, "wait=3600")
    assert answer.json()["data"] == []
    assert answer.headers["preference-applied"] == "wait=1"


async def test_prefer_on_several_header_lines_is_one_list(replica: Replica) -> None:
    with trio.fail_after(WAIT):
        await readable_key(replica)
        answer = await replica.raw.get(
            replica.url + "/v0/keys/",
            params={KEY: "stale"},
            headers=[
                ("Authorization", "0t" + HOST),
                ("Prefer", "respond-async"),
                ("Prefer", "wait=9"),
            ],
        )
    assert answer.json()["data"] == [KEY]
    assert answer.headers["preference-applied"] == "wait=9"


async def test_past_the_waiter_bound_a_check_is_answered_at_once_without_the_header(
    files: Files,
) -> None:
    async with served(files, "a", max_waiters=1) as replica:
        with trio.fail_after(WAIT):
            current, second = await readable_key(replica)
            held = Held()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(held.run, replica.host, {KEY: current}, FOREVER)
                await until(lambda: replica.hub.full)
                turned_away = await replica.check({KEY: current}, "wait=30")
                assert turned_away.json()["data"] == []
                assert "preference-applied" not in turned_away.headers
                assert not held.done.is_set()
                await replica.admin.update_version(KEY, second, VersionStatus.PRIMARY)
            assert held.result == ChangeCheck((KEY,), MAX_WAIT_SECONDS)


async def test_a_client_that_goes_away_frees_its_place_at_once(replica: Replica) -> None:
    with trio.fail_after(WAIT):
        current, _ = await readable_key(replica)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replica.check, {KEY: current}, f"wait={FOREVER}")
            await until(lambda: replica.hub.waiting == 1)
            nursery.cancel_scope.cancel()
        await until(lambda: replica.hub.waiting == 0)
    assert "client disconnected" in replica.audit_path.read_text()


async def test_a_long_poll_of_8000_keys_is_one_held_request(tmp_path: Path) -> None:
    """Too many keys for one URL: the client sends them in one bulk check, held as one request,
    and a promote of one of them answers it."""
    files = make_files(tmp_path)
    async with served(files, "a") as replica:
        host = KnoxHTTPClient(
            replica.url, auth="0t" + HOST, ssl_context=ssl_context_for(files.ca_path, *files.host)
        )
        async with host:
            with trio.fail_after(WAIT):
                current, second = await readable_key(replica)
                # Unknown ids with an empty hash are never answered: they only make it long.
                hashes = {f"svc_{i:05d}:filler": "" for i in range(8000)}
                hashes[KEY] = current
                assert len(change_check_requests(hashes)) > 1
                async with held_check(replica, hashes, FOREVER, client=host) as held:
                    await replica.admin.update_version(KEY, second, VersionStatus.PRIMARY)
                assert held.result is not None and held.result.ids == (KEY,)
                await until(lambda: replica.hub.waiting == 0)


# --- several replicas, one store ---------------------------------------------------------------


async def test_a_change_the_feed_missed_is_answered_after_notify_all(files: Files) -> None:
    """Two replicas on one SQLite file, each with its own hub and no feed between them: a
    write on B is not announced on A, like a change lost with a LISTEN connection. A's
    ``notify_all`` (what the listener calls when it reconnects) makes the held check see it."""
    async with served(files, "a") as a, served(files, "b") as b:
        with trio.fail_after(WAIT):
            current, second = await readable_key(a)
            async with held_check(a, {KEY: current}, FOREVER) as held:
                await b.admin.update_version(KEY, second, VersionStatus.PRIMARY)
                await trio.sleep(0.2)
                assert not held.done.is_set()
                a.hub.notify_all()
            assert held.result == ChangeCheck((KEY,), MAX_WAIT_SECONDS)


async def test_a_change_nobody_announced_is_still_answered_at_the_end_of_the_wait(
    files: Files,
) -> None:
    async with served(files, "a", max_wait_seconds=1) as a, served(files, "b") as b:
        with trio.fail_after(WAIT):
            current, second = await readable_key(a)
            async with held_check(a, {KEY: current}, FOREVER) as held:
                await b.admin.update_version(KEY, second, VersionStatus.PRIMARY)
            assert held.result == ChangeCheck((KEY,), 1)


# --- knoxd -------------------------------------------------------------------------------------


def daemon_config(files: Files, directory: Path, url: str, *, refresh: float) -> Config:
    """knoxd with the host identity, ``KEY`` registered, and a ``refresh`` long-poll window."""
    return Config(
        DaemonConfig(
            state_dir=directory / "state",
            workload_socket=directory / "knoxd.sock",
            admin_socket=directory / "admin" / "admin.sock",
            refresh_seconds=refresh,
            revalidate_seconds=3600,
            backoff_min_seconds=0.05,
            backoff_max_seconds=0.3,
        ),
        UpstreamConfig((url,), ca=files.ca_path, timeout_seconds=3),
        (
            IdentityConfig(
                "host",
                IdentityKind.MACHINE,
                files.host[0],
                files.host[1],
                HOST,
                (KEY,),
                PeerSelectors(uid=(os.getuid(),)),
            ),
        ),
    )


async def serve_workload_socket(context: DaemonContext) -> None:
    await serve_sockets(
        SocketContext(
            config=context.config,
            view=context.view,
            fetch=context.fetcher,
            version="test",
            started_at=context.started_at,
            activated={},
        )
    )


@asynccontextmanager
async def knoxd(config: Config) -> AsyncIterator[DaemonContext]:
    async with trio.open_nursery() as nursery:
        context: DaemonContext = await nursery.start(
            lambda task_status: run_daemon(
                config, serve_sockets=serve_workload_socket, environ={}, task_status=task_status
            )
        )
        try:
            yield context
        finally:
            nursery.cancel_scope.cancel()


def primary_of(context: DaemonContext) -> bytes | None:
    entry = context.view.get("host", KEY)
    return None if entry is None else entry.key.primary.data


async def next_primary(
    events: AsyncWatchStream, previous: bytes | None
) -> UpdateEvent | RevokedEvent:
    """The next event that is not a mere re-confirmation of ``previous``."""
    async for event in events:
        if isinstance(event, RevokedEvent) or event.key.primary.data != previous:
            return event
    raise AssertionError("the watch ended")


async def test_knoxd_long_polls_and_a_watching_application_sees_promote_and_revocation(
    files: Files, tmp_path: Path
) -> None:
    """knoxd polls every 30 s at the earliest here (27 s with jitter): only the long-poll
    brings the promote and the revocation within the test's 20 s bound."""
    async with served(files, "a") as replica:
        with trio.fail_after(WAIT):
            current, second = await readable_key(replica)
            config = daemon_config(files, tmp_path, replica.url, refresh=30)
            async with (
                knoxd(config) as daemon,
                AsyncClient(config.daemon.workload_socket, cache=False) as app,
            ):
                events = app.watch([KEY])
                async with events:
                    first = await next_primary(events, None)
                    assert isinstance(first, UpdateEvent)
                    assert first.key.primary.data == b"v1"
                    # knoxd holds a long-poll for its one cached key.
                    await until(lambda: replica.hub.waiting == 1)
                    await replica.admin.update_version(KEY, second, VersionStatus.PRIMARY)
                    promoted = await next_primary(events, b"v1")
                    assert isinstance(promoted, UpdateEvent)
                    assert promoted.key.primary.data == b"v2"
                    assert primary_of(daemon) == b"v2"
                    assert (await replica.host.get_key(KEY)).hash != current

                    await until(lambda: replica.hub.waiting == 1)
                    await replica.admin.put_access(
                        KEY, Access(PrincipalType.MACHINE, HOST, AccessType.NONE)
                    )
                    revoked = await next_primary(events, b"v2")
                    assert revoked == RevokedEvent(KEY, RevokeReason.FORBIDDEN)
                    assert daemon.view.get("host", KEY) is None


async def test_against_a_server_without_the_extension_knoxd_polls(
    files: Files, tmp_path: Path
) -> None:
    """A Go Knox server never answers ``Preference-Applied``: knoxd still gets the rotation, by
    asking once per refresh interval (5 s here) instead of again at once."""
    async with served(files, "a", go_knox=True) as replica:
        with trio.fail_after(WAIT):
            current, second = await readable_key(replica)
            plain = await replica.check({KEY: current}, "wait=30")
            assert "preference-applied" not in plain.headers

            def checks() -> int:
                records = replica.audit_path.read_text().splitlines()
                return sum(json.loads(line)["route"] == "getkeys" for line in records)

            config = daemon_config(files, tmp_path, replica.url, refresh=5)
            async with knoxd(config) as daemon:
                await until(lambda: primary_of(daemon) == b"v1")
                before = checks()
                await replica.admin.update_version(KEY, second, VersionStatus.PRIMARY)
                await until(lambda: primary_of(daemon) == b"v2")
                # At most the check that was due and one more: no back-to-back re-asking.
                assert checks() - before <= 2


# --- two server processes, one PostgreSQL ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_toml(files: Files, directory: Path, database_url: str, port: int) -> Path:
    """A ``knox-server serve`` config for one replica of the deployment in ``files``."""
    directory.mkdir(parents=True, exist_ok=True)
    master = directory / "master.keys"
    master.touch(mode=0o600)
    master.write_text(f"1:{base64.b64encode(files.master_key).decode()}\n")
    tokens = directory / "tokens.toml"
    write_token_file(tokens, [("alice", (), files.token)])
    config = directory / "server.toml"
    config.write_text(
        f"""[server]
listen = ["127.0.0.1:{port}"]
cert = "{files.server[0]}"
key = "{files.server[1]}"
client_ca = "{files.ca_path}"
host = "{directory.name}"

[storage]
url = "{database_url}"
master_key_file = "{master}"

[auth]
token_file = "{tokens}"

[audit]
file = "{directory / "audit.jsonl"}"
"""
    )
    return config


@asynccontextmanager
async def server_process(
    files: Files, directory: Path, database_url: str, name: str
) -> AsyncIterator[Replica]:
    """``knox-server serve`` as a child process (SIGKILLed at the end), with clients for it."""
    port = free_port()
    config = server_toml(files, directory / name, database_url, port)
    url = f"https://127.0.0.1:{port}"
    with (directory / f"{name}.log").open("ab") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "knox_server.cli", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        host_tls = ssl_context_for(files.ca_path, *files.host)
        async with (
            KnoxHTTPClient(
                url, auth="0u" + files.token, ssl_context=ssl_context_for(files.ca_path)
            ) as admin,
            KnoxHTTPClient(url, auth="0t" + HOST, ssl_context=host_tls) as host,
            httpx.AsyncClient(verify=host_tls, timeout=FOREVER) as raw,
        ):
            while True:
                try:
                    if (await raw.get(url + "/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.returncode is None, (directory / f"{name}.log").read_text()
                await trio.sleep(0.05)
            # The hub lives in the child: tests that need it read the outcome instead.
            yield Replica(url, ChangeHub(), admin, host, raw, directory / name / "audit.jsonl")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        with trio.move_on_after(10):
            await process.wait()


def terminate_listener(database_url: str, application_name: str) -> None:
    """Kill the change listener's connection of the replica that uses ``application_name``."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND query LIKE 'LISTEN%%'",
            (application_name,),
        ).fetchall()
    assert killed == [(True,)]


@pytest.mark.postgres
@pytest.mark.parametrize("listener_down", [False, True], ids=["listening", "listener-down"])
async def test_a_promote_on_one_replica_wakes_a_long_poll_held_on_another(
    files: Files, tmp_path: Path, postgres_url: str, listener_down: bool
) -> None:
    """B holds a check, A promotes. With ``listener_down``, B's LISTEN connection is killed and
    A promotes at once, before B listens again (its first reconnect waits 0.1 s): B never hears
    that notification, and its held check answers all the same, because the reconnected
    listener makes every waiter re-check."""
    await migrate(postgres_url)
    b_name = "knox_b_" + secrets.token_hex(4)
    b_url = f"{postgres_url}&application_name={b_name}"
    with trio.fail_after(WAIT):
        async with (
            server_process(files, tmp_path, postgres_url, "a") as a,
            server_process(files, tmp_path, b_url, "b") as b,
        ):
            current, second = await readable_key(a)
            held = Held()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(held.run, b.host, {KEY: current}, MAX_WAIT_SECONDS)
                # Nothing differs, so B holds the check (it cannot have answered).
                await trio.sleep(0.5)
                assert not held.done.is_set()
                if listener_down:
                    await trio.to_thread.run_sync(terminate_listener, postgres_url, b_name)
                await a.admin.update_version(KEY, second, VersionStatus.PRIMARY)
            assert held.result == ChangeCheck((KEY,), MAX_WAIT_SECONDS)
            assert (await b.host.get_key(KEY)).primary.data == b"v2"
