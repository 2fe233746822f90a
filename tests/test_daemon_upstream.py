"""knoxd's upstream side end to end: the daemon's root, refreshers, registrations and faults.

Every test runs :func:`knoxd.daemon.run_daemon` against a real server over real mTLS: the full
``knox_server`` (in-process, or as a child process where it must die), or, for answers a correct
server never gives (500s, garbage, the wrong key, a bad hash), :class:`FakeKnox`, a small v0
server of our own behind the same TLS stack. Each fault test asserts what is served afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, MutableMapping
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
import structlog
import trio

from knox import wire
from knox.http_client import KnoxHTTPClient, ssl_context_for
from knox.model import Access, AccessType, Key, KeyVersion, PrincipalType, VersionStatus
from knox.model import version_hash as compute_hash
from knox_server.dev import prepare_dev_state, write_dev_outputs
from knox_server.main import run_server
from knox_server.serve import ServeSettings, serve
from knoxd.cache.cache_key import KEY_FILE_NAME, load_cache_key
from knoxd.cache.entry import CacheEntry
from knoxd.cache.store import CacheStore
from knoxd.cache.view import Change, RemovalReason, Removed
from knoxd.config import Config, load_config, parse_config
from knoxd.daemon import DaemonContext, StartupError, run_daemon
from knoxd.fetch import Refusal
from tests.asgi import serve_lifespan
from tests.pki import CA
from tests.polling import until
from tests.server_fixtures import DevServer, dev_server, dev_server_process

WAIT = 20
REPO = Path(__file__).resolve().parent.parent


# --- helpers -----------------------------------------------------------------------------------


def fast(
    config: Config,
    *,
    keys: dict[str, list[str]] | None = None,
    refresh: float = 0.2,
    revalidate: float = 3600.0,
    urls: tuple[str, ...] | None = None,
) -> Config:
    """``config`` with short intervals and backoff (and these keys registered, if given)."""
    daemon = dataclasses.replace(
        config.daemon,
        refresh_seconds=refresh,
        revalidate_seconds=revalidate,
        backoff_min_seconds=0.05,
        backoff_max_seconds=0.3,
    )
    upstream = dataclasses.replace(
        config.upstream, urls=urls or config.upstream.urls, timeout_seconds=3
    )
    identities = tuple(
        i if keys is None else dataclasses.replace(i, keys=tuple(keys.get(i.name, ())))
        for i in config.identities
    )
    return Config(daemon, upstream, identities)


@asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[DaemonContext]:
    """The daemon, started (cache loaded, refreshers running) until the block exits."""
    async with trio.open_nursery() as nursery:
        context: DaemonContext = await nursery.start(
            partial(run_daemon, config, environ={}, **kwargs)
        )
        yield context
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def admin_client(dev: DevServer) -> AsyncIterator[KnoxHTTPClient]:
    async with KnoxHTTPClient(
        dev.url, auth="0u" + dev.admin_token, ssl_context=ssl_context_for(dev.ca)
    ) as client:
        yield client


def host_reads(dev: DevServer) -> Access:
    return Access(PrincipalType.MACHINE, dev.hostname, AccessType.READ)


def primary(context: DaemonContext, key_id: str, identity: str = "host") -> bytes | None:
    entry = context.view.get(identity, key_id)
    return None if entry is None else entry.key.primary.data


def error_of(context: DaemonContext, key_id: str, identity: str = "host") -> str | None:
    entry = context.view.get(identity, key_id)
    return None if entry is None else entry.last_error


async def stored(config: Config) -> dict[tuple[str, str], CacheEntry]:
    """What the cache file holds (the daemon must be stopped)."""
    state_dir = config.daemon.state_dir
    async with await CacheStore.open(state_dir, load_cache_key(state_dir, {})) as store:
        return {(e.identity, e.key_id): e for e in await store.load_all()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Restartable:
    """The dev server in-process on a fixed port, in a task of its own in ``nursery``, so that it
    can stop and start again (where it was) under a running daemon."""

    def __init__(self, nursery: trio.Nursery, state_dir: Path, port: int) -> None:
        self._nursery = nursery
        self._state_dir = state_dir
        self._port = port
        self._stop = trio.Event()
        self._done = trio.Event()

    async def start(self) -> DevServer:
        self._stop = trio.Event()
        self._done = trio.Event()
        dev: DevServer = await self._nursery.start(self._serve)
        return dev

    async def stop(self) -> None:
        self._stop.set()
        await self._done.wait()

    async def _serve(self, task_status: trio.TaskStatus[DevServer]) -> None:
        try:
            state = prepare_dev_state(self._state_dir)
            config = state.server_config(f"127.0.0.1:{self._port}", knox_compat=False)
            async with trio.open_nursery() as nursery:
                urls: list[str] = await nursery.start(
                    lambda task_status: run_server(config, task_status=task_status)
                )
                info = write_dev_outputs(state, urls[0])
                task_status.started(DevServer.from_info(state.directory, info))
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._done.set()


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


# --- acceptance: rotation and revocation -------------------------------------------------------


async def test_a_rotation_reaches_the_cache_within_one_refresh_interval(tmp_path: Path) -> None:
    with trio.fail_after(WAIT), structlog.testing.capture_logs() as logs:
        async with dev_server(tmp_path / "server") as dev, admin_client(dev) as admin:
            first = await admin.create_key("app:rotating", b"v1", [host_reads(dev)])
            # The file `knox-server dev` writes is used as it is, apart from the timings.
            config = fast(load_config(dev.knoxd_config), keys={"host": ["app:rotating"]})
            async with running(config) as context:
                await until(lambda: primary(context, "app:rotating") == b"v1")
                second = await admin.add_version("app:rotating", b"v2")
                await admin.update_version("app:rotating", second, VersionStatus.PRIMARY)
                # Revalidation is an hour away: only the change check can bring this.
                await until(lambda: primary(context, "app:rotating") == b"v2")
                entry = context.view.get("host", "app:rotating")
                assert entry is not None
                assert [v.id for v in entry.key.active] == [first, second]
                assert entry.last_error is None
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]
    on_disk = await stored(config)
    assert on_disk["host", "app:rotating"].key.primary.data == b"v2"


async def test_revoked_and_deleted_keys_leave_the_cache_at_revalidation(tmp_path: Path) -> None:
    removed: list[Change] = []
    with trio.fail_after(WAIT):
        async with dev_server(tmp_path / "server") as dev, admin_client(dev) as admin:
            await admin.create_key("app:revoked", b"r", [host_reads(dev)])
            await admin.create_key("app:deleted", b"d", [host_reads(dev)])
            config = fast(
                load_config(dev.knoxd_config),
                keys={"host": ["app:revoked", "app:deleted"]},
                revalidate=0.5,
            )
            async with running(config) as context:
                await until(lambda: len(context.view) == 2)
                for key_id in ("app:revoked", "app:deleted"):
                    context.view.subscribe("host", key_id, removed.append)
                await admin.put_access(
                    "app:revoked", Access(PrincipalType.MACHINE, dev.hostname, AccessType.NONE)
                )
                await admin.delete_key("app:deleted")
                await until(lambda: len(context.view) == 0)
                fetcher = context.fetcher
                assert fetcher.refusal("host", "app:revoked") is Refusal.FORBIDDEN
                assert fetcher.refusal("host", "app:deleted") is Refusal.NOT_FOUND
                assert fetcher.is_registered("host", "app:revoked")
                # Access comes back: the next revalidation serves the key again.
                await admin.put_access("app:revoked", host_reads(dev))
                await until(lambda: primary(context, "app:revoked") == b"r")
    reasons = {(c.key_id, c.reason) for c in removed if isinstance(c, Removed)}
    assert reasons == {
        ("app:revoked", RemovalReason.FORBIDDEN),
        ("app:deleted", RemovalReason.DELETED),
    }
    # Each refusal was news once, not at every revalidation.
    assert len([c for c in removed if isinstance(c, Removed)]) == 2
    assert set(await stored(config)) == {("host", "app:revoked")}


# --- registrations -----------------------------------------------------------------------------


async def test_run_time_registrations_are_fetched_at_once_and_persist(tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with dev_server(tmp_path / "server") as dev, admin_client(dev) as admin:
            await admin.create_key("app:late", b"late", [host_reads(dev)])
            await admin.create_key("app:dropped", b"x", [host_reads(dev)])
            # Neither the check nor a revalidation will run during the test.
            config = fast(load_config(dev.knoxd_config), refresh=3600, revalidate=3600)
            async with running(config) as context:
                fetcher = context.fetcher
                assert await fetcher.register("host", ["app:late", "app:missing"]) == [
                    "app:late",
                    "app:missing",
                ]
                await until(lambda: primary(context, "app:late") == b"late")
                await until(lambda: fetcher.refusal("host", "app:missing") is Refusal.NOT_FOUND)
                assert fetcher.refusal("demo", "app:late") is None
                await fetcher.register("host", ["app:dropped"])
                await until(lambda: primary(context, "app:dropped") == b"x")
                assert await fetcher.unregister("host", ["app:dropped", "app:never"]) == [
                    "app:dropped"
                ]
                assert context.view.get("host", "app:dropped") is None
                assert not fetcher.is_registered("host", "app:dropped")
                with pytest.raises(KeyError, match="nobody"):
                    await fetcher.register("nobody", ["app:late"])
                with pytest.raises(ValueError, match="invalid key id"):
                    await fetcher.register("host", ["no/slashes"])
                assert fetcher.request_refresh(None, None) == 2
                [host, demo] = fetcher.status()
                assert (host.name, host.keys, host.upstream_ok) == ("host", 2, True)
                assert host.principal == "0t" + dev.hostname
                assert host.last_refresh_at is not None
                assert (demo.name, demo.keys, demo.principal) == (
                    "demo",
                    0,
                    "0sspiffe://dev.knox/demo",
                )
        # Restarted with the upstream gone: the registration and the value came back from disk.
        down = fast(config, urls=(f"https://127.0.0.1:{free_port()}",))
        async with running(down) as context:
            assert context.fetcher.is_registered("host", "app:late")
            assert primary(context, "app:late") == b"late"
            assert context.view.get("host", "app:dropped") is None
    assert set(await stored(config)) == {("host", "app:late")}


# --- start-up and upstream faults against the real server --------------------------------------


async def test_upstream_down_at_start_still_serves_every_cached_key_marked_stale(
    tmp_path: Path,
) -> None:
    with trio.fail_after(WAIT):
        async with dev_server(tmp_path / "server") as dev, admin_client(dev) as admin:
            await admin.create_key("app:host", b"h", [host_reads(dev)])
            await admin.create_key(
                "app:demo",
                b"d",
                [Access(PrincipalType.SERVICE, "spiffe://dev.knox/demo", AccessType.READ)],
            )
            config = fast(
                load_config(dev.knoxd_config), keys={"host": ["app:host"], "demo": ["app:demo"]}
            )
            async with running(config) as context:
                await until(lambda: len(context.view) == 2)
                fetched = {e.key_id: e.fetched_at for e in context.view.entries()}
        down = fast(config, urls=(f"https://127.0.0.1:{free_port()}",))
        async with running(down) as context:
            # Served from the moment the daemon is up, before any upstream answer.
            assert primary(context, "app:host") == b"h"
            assert primary(context, "app:demo", "demo") == b"d"
            await until(lambda: all(e.last_error for e in context.view.entries()))
            for entry in context.view.entries():
                # Its age is the one from the last run (the disk may over-state it, never less).
                assert entry.fetched_at <= fetched[entry.key_id]
                assert entry.last_error is not None
                assert entry.last_error.startswith("upstream: no Knox server answered")
            assert not any(s.upstream_ok for s in context.fetcher.status())


async def test_one_identity_failing_never_delays_another(tmp_path: Path) -> None:
    stranger = CA.create("a CA the server does not trust")
    with trio.fail_after(WAIT):
        async with dev_server(tmp_path / "server") as dev, admin_client(dev) as admin:
            await admin.create_key("app:k", b"v1", [host_reads(dev)])
            config = fast(load_config(dev.knoxd_config), keys={"host": ["app:k"]})
            cert, key = stranger.spiffe_cert("spiffe://dev.knox/demo").write(tmp_path, "demo")
            demo = dataclasses.replace(config.identities[1], cert=cert, key=key, keys=("app:k",))
            config = dataclasses.replace(config, identities=(config.identities[0], demo))
            async with running(config) as context:
                await until(lambda: primary(context, "app:k") == b"v1")
                await until(lambda: not context.fetcher.status()[1].upstream_ok)
                version = await admin.add_version("app:k", b"v2")
                await admin.update_version("app:k", version, VersionStatus.PRIMARY)
                await until(lambda: primary(context, "app:k") == b"v2")
                host, failing = context.fetcher.status()
                assert host.upstream_ok
                assert not failing.upstream_ok
                assert context.fetcher.refusal("demo", "app:k") is Refusal.UNREACHABLE


async def test_upstream_dying_mid_refresh_keeps_serving_and_recovers(tmp_path: Path) -> None:
    port = free_port()
    state_dir = tmp_path / "server"
    key_ids = [f"app:k{i:02d}" for i in range(30)]
    with trio.fail_after(2 * WAIT):
        async with AsyncExitStack() as first_life:
            dev = await first_life.enter_async_context(
                dev_server_process(state_dir, listen=f"127.0.0.1:{port}")
            )
            async with admin_client(dev) as admin:
                for key_id in key_ids:
                    await admin.create_key(key_id, key_id.encode(), [host_reads(dev)])
            # Revalidating all the time: the server dies in the middle of a sweep.
            config = fast(load_config(dev.knoxd_config), keys={"host": key_ids}, revalidate=0.3)
            async with running(config) as context:
                await until(lambda: len(context.view) == 30)
                await first_life.aclose()  # SIGKILL
                await until(lambda: all(e.last_error for e in context.view.entries()))
                assert all(primary(context, k) == k.encode() for k in key_ids)
                assert not context.fetcher.status()[0].upstream_ok
                async with dev_server_process(state_dir, listen=f"127.0.0.1:{port}") as again:
                    async with admin_client(again) as admin:
                        version = await admin.add_version("app:k00", b"new")
                        await admin.update_version("app:k00", version, VersionStatus.PRIMARY)
                    await until(lambda: primary(context, "app:k00") == b"new")
                    await until(lambda: not any(e.last_error for e in context.view.entries()))
                    # The health flag follows the next refresh step that is answered.
                    await until(lambda: context.fetcher.status()[0].upstream_ok)


async def test_tls_failure_after_the_server_ca_rotates(tmp_path: Path) -> None:
    port = free_port()
    state_dir = tmp_path / "server"
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            server = Restartable(nursery, state_dir, port)
            dev = await server.start()
            async with admin_client(dev) as admin:
                await admin.create_key("app:k", b"v1", [host_reads(dev)])
            config = fast(load_config(dev.knoxd_config), keys={"host": ["app:k"]})
            async with running(config) as context:
                await until(lambda: primary(context, "app:k") == b"v1")
                await server.stop()
                # The server comes back with a certificate from a CA the daemon does not trust.
                rotated = CA.create("rotated knox server CA")
                rotated.server_cert().write(state_dir / "pki", "server")
                await server.start()
                await until(lambda: "CERTIFICATE_VERIFY" in (error_of(context, "app:k") or ""))
                assert primary(context, "app:k") == b"v1"
                # The CA bundle gains the new CA: the identities reload, refreshing resumes.
                with dev.ca.open("ab") as bundle:
                    bundle.write(rotated.cert_pem)
                await until(lambda: error_of(context, "app:k") is None)
                assert context.fetcher.status()[0].upstream_ok
            await server.stop()


async def test_a_lost_cache_key_means_a_cold_start_not_a_crash(tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with dev_server(tmp_path / "server") as dev, admin_client(dev) as admin:
            await admin.create_key("app:k", b"v1", [host_reads(dev)])
            config = fast(load_config(dev.knoxd_config), keys={"host": ["app:k"]})
            async with running(config) as context:
                await until(lambda: primary(context, "app:k") == b"v1")
            key_file = config.daemon.state_dir / KEY_FILE_NAME
            key_file.unlink()
            with structlog.testing.capture_logs() as logs:
                async with running(config) as context:
                    await until(lambda: primary(context, "app:k") == b"v1")
    events = [e["event"] for e in logs]
    assert "created a new cache key" in events
    assert "dropping a cache row that does not open" in events
    assert key_file.stat().st_mode & 0o777 == 0o600


async def test_disk_full_logs_and_keeps_serving_the_old_value(tmp_path: Path) -> None:
    with trio.fail_after(WAIT), structlog.testing.capture_logs() as logs:
        async with dev_server(tmp_path / "server") as dev, admin_client(dev) as admin:
            await admin.create_key("app:k", b"small" * 200, [host_reads(dev)])
            config = fast(load_config(dev.knoxd_config), keys={"host": ["app:k"]})
            # 64 KiB of cache file: the first value fits, the rotated one does not.
            async with running(config, cache_max_bytes=64 * 1024) as context:
                await until(lambda: primary(context, "app:k") == b"small" * 200)
                big = await admin.add_version("app:k", os.urandom(36 * 1024))
                await admin.add_version("app:k", os.urandom(36 * 1024))
                await admin.update_version("app:k", big, VersionStatus.PRIMARY)
                await until(lambda: error_of(context, "app:k") == "cache write failed")
                assert primary(context, "app:k") == b"small" * 200
    failures = [
        e for e in logs if e["event"] == "cache write failed; still serving the previous value"
    ]
    assert failures
    assert "SQLITE_FULL" in failures[0]["error"]
    assert (await stored(config))["host", "app:k"].key.primary.data == b"small" * 200


async def test_start_up_errors_name_the_problem(tmp_path: Path) -> None:
    async with dev_server(tmp_path / "server") as dev:
        config = load_config(dev.knoxd_config)
    missing = dataclasses.replace(config.identities[0], key=tmp_path / "gone.key")
    with pytest.raises(StartupError, match=r"identity 'host': cannot read key file .*gone\.key"):
        await run_daemon(dataclasses.replace(config, identities=(missing,)), environ={})
    (tmp_path / "state").mkdir(mode=0o700)
    key_file = tmp_path / "state" / KEY_FILE_NAME
    key_file.write_bytes(b"k" * 32)
    key_file.chmod(0o644)
    shared = dataclasses.replace(
        config, daemon=dataclasses.replace(config.daemon, state_dir=tmp_path / "state")
    )
    with pytest.raises(StartupError, match="gives group or others access"):
        await run_daemon(shared, environ={})


# --- faults a correct server never produces: a v0 server of our own --------------------------


def make_key(key_id: str, *versions: KeyVersion) -> Key:
    return Key(key_id, (), versions, compute_hash(versions))


V1 = KeyVersion(101, b"first", VersionStatus.PRIMARY, 1)
V2 = KeyVersion(202, b"second", VersionStatus.PRIMARY, 2)


class FakeKnox:
    """The two read routes of the v0 API, Knox's way, with a switch for misbehaving.

    ``fault``: ``"500"`` (every request answers code 1), ``"garbage"`` (every body is broken
    JSON), ``"wrong_id"`` / ``"bad_hash"`` (key GETs answer another key / a hash that does not
    match the versions). ``faulted`` counts the bad answers given. With ``long_poll`` it honours
    ``Prefer: wait=N`` on the change check as our server's extension does: the answer is held
    until a key changes (:meth:`put`) or N seconds pass, and says ``Preference-Applied``.
    """

    def __init__(self, keys: dict[str, Key], *, long_poll: bool = False) -> None:
        self.keys = keys
        self.long_poll = long_poll
        self.fault: str | None = None
        self.faulted = 0
        self.held = 0
        self._changed = trio.Event()

    def put(self, key: Key) -> None:
        self.keys[key.id] = key
        self._changed.set()
        self._changed = trio.Event()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        headers = [(b"content-type", b"application/json")]
        prefer = dict(scope["headers"]).get(b"prefer", b"").decode()
        path, query = scope["path"], scope["query_string"].decode()
        if self.long_poll and path == "/v0/keys/" and prefer.startswith("wait="):
            wait = int(prefer.removeprefix("wait="))
            with trio.move_on_after(wait):
                while not self.changed(query):
                    self.held += 1
                    await self._changed.wait()
            headers.append((b"preference-applied", f"wait={wait}".encode()))
        status, body = self.answer(path, query)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def changed(self, query: str) -> list[str]:
        asked = dict(parse_qsl(query, keep_blank_values=True))
        return [k for k, h in asked.items() if k in self.keys and self.keys[k].hash != h]

    def answer(self, path: str, query: str) -> tuple[int, bytes]:
        if self.fault == "500":
            self.faulted += 1
            return 500, wire.error_envelope(1, "database unavailable", host="fake", ts=1)
        if self.fault == "garbage":
            self.faulted += 1
            return 200, b'{"status": "ok", "code": 0, "data": ["trunc'
        if path == "/v0/keys/":
            return 200, wire.ok_envelope(self.changed(query), host="fake", ts=1)
        key_id = path.removeprefix("/v0/keys/").removesuffix("/")
        key = self.keys.get(key_id)
        if key is None:
            return 404, wire.error_envelope(4, f"Key {key_id} not found", host="fake", ts=1)
        obj = wire.key_to_obj(key)
        if self.fault == "wrong_id":
            self.faulted += 1
            obj["id"] = "someone:else"
        elif self.fault == "bad_hash":
            self.faulted += 1
            obj["hash"] = "0" * 64
        return 200, wire.ok_envelope(obj, host="fake", ts=1)


@asynccontextmanager
async def fake_knox(tmp_path: Path, fake: FakeKnox) -> AsyncIterator[tuple[str, CA]]:
    """Serve ``fake`` over TLS (client certificates verified); yields its URL and CA."""
    ca = CA.create()
    cert, key = ca.server_cert().write(tmp_path, "server")
    settings = ServeSettings(
        listen=("127.0.0.1:0",), cert=cert, key=key, client_ca=ca.write_cert(tmp_path / "ca.pem")
    )
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(serve, fake, settings)
        yield urls[0], ca
        nursery.cancel_scope.cancel()


def fake_config(tmp_path: Path, url: str, ca: CA, *, refresh: float = 0.2) -> Config:
    cert, key = ca.machine_cert("web-1.example.com").write(tmp_path, "host")
    ca_path = ca.write_cert(tmp_path / "ca.pem")
    return parse_config(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
workload_socket = "{tmp_path / "w.sock"}"
admin_socket = "{tmp_path / "a.sock"}"
refresh_seconds = {refresh}
revalidate_seconds = 3600
backoff_min_seconds = 0.05
backoff_max_seconds = 0.3

[upstream]
urls = ["{url}"]
ca = "{ca_path}"
timeout_seconds = 3

[[identity]]
name = "host"
kind = "machine"
cert = "{cert}"
key = "{key}"
keys = ["app:k"]
[identity.peers]
uid = [0]
"""
    )


@pytest.mark.parametrize(
    ("fault", "reported"),
    [
        ("500", "database unavailable"),
        ("garbage", "is not a Knox response"),
        ("wrong_id", "asked for key 'app:k', got 'someone:else'"),
        ("bad_hash", "hash does not match the versions"),
    ],
)
async def test_bad_answers_keep_the_old_value(tmp_path: Path, fault: str, reported: str) -> None:
    fake = FakeKnox({"app:k": make_key("app:k", V1)})
    with trio.fail_after(WAIT):
        async with (
            fake_knox(tmp_path, fake) as (url, ca),
            running(fake_config(tmp_path, url, ca)) as context,
        ):
            await until(lambda: primary(context, "app:k") == b"first")
            fake.keys["app:k"] = make_key(
                "app:k", V2, dataclasses.replace(V1, status=VersionStatus.ACTIVE)
            )
            fake.fault = fault
            await until(lambda: fake.faulted >= 2 and error_of(context, "app:k") is not None)
            assert primary(context, "app:k") == b"first"
            assert reported in (error_of(context, "app:k") or "")
            fake.fault = None
            await until(lambda: primary(context, "app:k") == b"second")
            assert error_of(context, "app:k") is None


async def test_a_long_polling_server_delivers_changes_and_new_registrations_promptly(
    tmp_path: Path,
) -> None:
    fake = FakeKnox({"app:k": make_key("app:k", V1)}, long_poll=True)
    with trio.fail_after(WAIT):
        # A 60 s refresh interval: only the long-poll can deliver within the test.
        async with (
            fake_knox(tmp_path, fake) as (url, ca),
            running(fake_config(tmp_path, url, ca, refresh=60)) as context,
        ):
            await until(lambda: primary(context, "app:k") == b"first")
            await until(lambda: fake.held >= 1)
            fake.put(make_key("app:k", V2, dataclasses.replace(V1, status=VersionStatus.ACTIVE)))
            await until(lambda: primary(context, "app:k") == b"second")
            # A registration while a check is held: the hold is cut short for it.
            await until(lambda: fake.held >= 2)
            fake.keys["app:other"] = make_key("app:other", V1)
            await context.fetcher.register("host", ["app:other"])
            await until(lambda: primary(context, "app:other") == b"first")


# --- the command -------------------------------------------------------------------------------


async def test_knoxd_command_runs_until_sigterm(tmp_path: Path) -> None:
    async with dev_server(tmp_path / "server") as dev:
        with trio.fail_after(WAIT):
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "knoxd", "--config", str(dev.knoxd_config)],
                stderr=subprocess.PIPE,
                cwd=REPO,
            )
            assert process.stderr is not None
            output = b""
            try:
                while b"knoxd started" not in output:
                    chunk = await process.stderr.receive_some(4096)
                    assert chunk, output
                    output += chunk
                process.send_signal(signal.SIGTERM)
                async for chunk in process.stderr:
                    output += chunk
                assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.stderr.aclose()
    assert b"knoxd stopped" in output
    bad = await trio.run_process(
        [sys.executable, "-m", "knoxd", "--config", str(tmp_path / "missing.toml")],
        capture_stderr=True,
        cwd=REPO,
        check=False,
    )
    assert bad.returncode == 2
    assert b"missing.toml: cannot read" in bad.stderr


async def test_an_unexpected_error_in_a_step_is_logged_and_refreshing_goes_on(
    tmp_path: Path,
) -> None:
    failures: list[str] = []

    def faulty_listener(change: Change) -> None:
        # A bug elsewhere (listeners must not raise): the first notification blows up.
        if not failures:
            failures.append(change.key_id)
            raise RuntimeError("listener bug")

    with trio.fail_after(WAIT), structlog.testing.capture_logs() as logs:
        async with dev_server(tmp_path / "server") as dev, admin_client(dev) as admin:
            await admin.create_key("app:k", b"v1", [host_reads(dev)])
            config = fast(load_config(dev.knoxd_config), refresh=3600)
            async with running(config) as context:
                context.view.subscribe("host", "app:k", faulty_listener)
                await context.fetcher.register("host", ["app:k"])
                await until(lambda: any("unexpectedly" in e["event"] for e in logs))
                version = await admin.add_version("app:k", b"v2")
                await admin.update_version("app:k", version, VersionStatus.PRIMARY)
                context.fetcher.request_refresh("host", ["app:k"])
                await until(lambda: primary(context, "app:k") == b"v2")
    assert failures == ["app:k"]
    bugs = [e for e in logs if "unexpectedly" in e["event"]]
    assert [(b["log_level"], b["identity"]) for b in bugs] == [("error", "host")]
