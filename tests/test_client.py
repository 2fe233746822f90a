"""knox.client against the real knoxd socket server (knoxd.socket_api.server) on real Unix sockets.

The server runs in its own thread with its own trio loop, as the daemon would in its own process;
the cache view is filled directly. Only the seam to the refreshers (:class:`FetchRequester`) is a
small in-test implementation, because the refreshers need a Knox server to talk to.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from knox import client as kc
from knox.model import Key, KeyVersion, VersionStatus, version_hash
from knox.protocol import (
    ErrorCode,
    ErrorReply,
    HelloReply,
    Ping,
    RevokedEvent,
    UpdateEvent,
    encode_frame,
)
from knoxd.cache.entry import CacheEntry
from knoxd.cache.view import CacheView, RemovalReason
from knoxd.config import (
    Config,
    DaemonConfig,
    IdentityConfig,
    IdentityKind,
    PeerSelectors,
    UpstreamConfig,
)
from knoxd.fetch import IdentityStatus, Refusal
from knoxd.socket_api.server import SocketContext, serve_sockets

pytestmark = pytest.mark.filterwarnings("error")


def make_key(key_id: str, primary: bytes, *actives: bytes, first_id: int = 1) -> Key:
    versions = [KeyVersion(first_id, primary, VersionStatus.PRIMARY, 1_000)]
    versions += [
        KeyVersion(first_id + 1 + n, data, VersionStatus.ACTIVE, 2_000)
        for n, data in enumerate(actives)
    ]
    return Key(key_id, (), tuple(versions), version_hash(versions))


class Fetch:
    """The refresher seam: remembers registrations and the upstream refusals a test sets."""

    def __init__(self, identities: Sequence[str]) -> None:
        self.registered: dict[str, dict[str, None]] = {name: {} for name in identities}
        self.refusals: dict[tuple[str, str], Refusal] = {}
        self.refreshes: list[tuple[str | None, tuple[str, ...] | None]] = []

    async def register(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        keys = self.registered[identity]
        keys.update(dict.fromkeys(key_ids))
        return list(key_ids)

    async def unregister(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        keys = self.registered[identity]
        return [k for k in key_ids if keys.pop(k, 0) is None]

    def is_registered(self, identity: str, key_id: str) -> bool:
        return key_id in self.registered.get(identity, {})

    def refusal(self, identity: str, key_id: str) -> Refusal | None:
        return self.refusals.get((identity, key_id))

    def request_refresh(self, identity: str | None, key_ids: Sequence[str] | None) -> int:
        self.refreshes.append((identity, None if key_ids is None else tuple(key_ids)))
        return len(key_ids) if key_ids is not None else 0

    def status(self) -> list[IdentityStatus]:
        return [
            IdentityStatus(name, f"0t{name}", len(keys), None, None, True)
            for name, keys in self.registered.items()
        ]


class Daemon:
    """The real socket server in a thread; ``put``/``remove`` change its cache view."""

    def __init__(self, root: Path, *, max_stale: float = 0.0, fetch_burst: float = 100.0) -> None:
        self.root = root
        self.workload = root / "run" / "knoxd.sock"
        self.admin = root / "admin" / "admin.sock"
        unused = root / "unused.pem"
        self.config = Config(
            DaemonConfig(
                state_dir=root,
                workload_socket=self.workload,
                admin_socket=self.admin,
                max_stale_seconds=max_stale,
            ),
            UpstreamConfig(("https://127.0.0.1:1",)),
            (
                IdentityConfig("host", IdentityKind.MACHINE, unused, unused, "h", (), _uid(0)),
                IdentityConfig("other", IdentityKind.MACHINE, unused, unused, "o", (), _uid(4321)),
            ),
        )
        self.view = CacheView()
        self.fetch = Fetch(["host", "other"])
        self.fetch_burst = fetch_burst
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main, ready), daemon=True)
        self._thread.start()
        assert ready.wait(10), "the socket server did not start"

    async def _main(self, ready: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        ctx = SocketContext(
            self.config, self.view, self.fetch, "test", fetch_burst=self.fetch_burst, activated={}
        )
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_sockets, ctx)
                ready.set()

    def stop(self) -> None:
        assert self._token is not None and self._scope is not None and self._thread is not None
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)

    def call(self, fn: Any, *args: Any) -> Any:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def put(self, key: Key, identity: str = "host", fetched_at: float | None = None) -> None:
        at = time.time() if fetched_at is None else fetched_at
        self.call(self.view.set, CacheEntry(identity, key, key.hash, at))

    def remove(self, key_id: str, reason: RemovalReason, identity: str = "host") -> None:
        self.call(self.view.remove, identity, key_id, reason)


def _uid(uid: int) -> PeerSelectors:
    return PeerSelectors(uid=(uid,))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    d.start()
    yield d
    d.stop()


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# --- pure core -----------------------------------------------------------------------------------


def test_every_error_code_maps_to_its_exception() -> None:
    expected = {
        ErrorCode.PROTOCOL: kc.ProtocolViolation,
        ErrorCode.VERSION: kc.ProtocolViolation,
        ErrorCode.BAD_REQUEST: kc.BadRequestError,
        ErrorCode.UNAUTHORIZED: kc.UnauthorizedError,
        ErrorCode.FORBIDDEN: kc.ForbiddenError,
        ErrorCode.NOT_FOUND: kc.NotFoundError,
        ErrorCode.NOT_REGISTERED: kc.NotRegisteredError,
        ErrorCode.NOT_READY: kc.NotReadyError,
        ErrorCode.STALE: kc.StaleError,
        ErrorCode.UPSTREAM_UNAVAILABLE: kc.UpstreamUnavailableError,
        ErrorCode.BUSY: kc.BusyError,
        ErrorCode.INTERNAL: kc.DaemonInternalError,
    }
    assert set(expected) == set(ErrorCode)
    for code, cls in expected.items():
        exc = kc.error_for_reply(ErrorReply(7, code, "why", code.retry))
        assert type(exc) is cls
        assert exc.code is code and exc.retry is code.retry
        assert "why" in str(exc)


def test_protocol_core_rejects_out_of_order_answers() -> None:
    proto = kc.ClientProtocol()
    proto.receive_data(
        encode_frame(
            {
                "op": "hello",
                "magic": "knoxd",
                "v": 1,
                "server": "knoxd/x",
                "peer": {"uid": 0, "gid": 0, "unit": None},
                "identity": "host",
            }
        )
    )
    assert isinstance(proto.next_incoming(), HelloReply)
    first, second = proto.new_id(), proto.new_id()
    proto.send(Ping(first))
    proto.send(Ping(second))
    proto.receive_data(encode_frame({"id": second, "ok": True}))
    with pytest.raises(kc.ProtocolViolation, match="out of order"):
        proto.next_incoming()


def test_protocol_core_rejects_garbage_as_protocol_violation() -> None:
    proto = kc.ClientProtocol()
    proto.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(kc.ProtocolViolation):
        proto.next_incoming()


def test_socket_path_resolution() -> None:
    assert kc.socket_path_from("/x.sock", {"KNOXD_SOCKET": "/y"}) == "/x.sock"
    assert kc.socket_path_from(None, {"KNOXD_SOCKET": "/y"}) == "/y"
    assert kc.socket_path_from(None, {"KNOXD_SOCKET": ""}) == kc.DEFAULT_SOCKET


# --- blocking client against the real server -----------------------------------------------------


def test_get_methods_and_registration(daemon: Daemon) -> None:
    daemon.put(make_key("db:pw", b"p1", b"a1", b"a2"))
    with kc.Client(daemon.workload, timeout=5, cache=False) as client:
        assert client.hello().identity == "host"
        client.ping()
        key = client.get("db:pw")
        assert key.id == "db:pw" and key.primary.data == b"p1"
        assert client.get_primary("db:pw") == b"p1"
        assert client.get_active("db:pw") == [b"p1", b"a1", b"a2"]
        assert client.get("db:pw", version=2).primary.data == b"p1"
        assert client.register(["a:b", "c:d"]) == ["a:b", "c:d"]
        assert daemon.fetch.is_registered("host", "a:b")
        assert client.unregister(["a:b", "zz:z"]) == ["a:b"]
        assert "secret" not in repr(key) and "p1" not in repr(key)


def test_errors_from_the_real_server(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, max_stale=60, fetch_burst=2)
    daemon.start()
    try:
        daemon.fetch.refusals[("host", "no:perm")] = Refusal.FORBIDDEN
        daemon.fetch.refusals[("host", "no:such")] = Refusal.NOT_FOUND
        daemon.fetch.refusals[("host", "no:net")] = Refusal.UNREACHABLE
        daemon.fetch.registered["host"]["pending:key"] = None
        daemon.put(make_key("old:key", b"x"), fetched_at=time.time() - 3600)
        daemon.put(make_key("ok:key", b"y"))
        with kc.Client(daemon.workload, timeout=5, cache=False) as client:
            cases: list[tuple[Any, type[kc.DaemonError]]] = [
                (lambda: client.get("no:perm"), kc.ForbiddenError),
                (lambda: client.get("no:such"), kc.NotFoundError),
                (lambda: client.get("no:net"), kc.UpstreamUnavailableError),
                (lambda: client.get("never:registered"), kc.NotRegisteredError),
                (lambda: client.get("pending:key"), kc.NotReadyError),
                (lambda: client.get("old:key"), kc.StaleError),
                (lambda: client.get("ok:key", version=99), kc.NotFoundError),
                (client.status, kc.BadRequestError),
            ]
            for call, cls in cases:
                with pytest.raises(cls) as info:
                    call()
                assert info.value.retry is (cls.code is not None and cls.code.retry)
            other = kc.Client(daemon.workload, timeout=5, cache=False, identity="other")
            with other, pytest.raises(kc.UnauthorizedError):
                other.get("ok:key")
            # The fetch budget is 2: the third fetch-causing request is refused as busy.
            client.register(["r:1"])
            client.register(["r:2"])
            with pytest.raises(kc.BusyError) as busy:
                client.register(["r:3"])
            assert busy.value.retry
            # The connection survives every refusal.
            assert client.get_primary("ok:key") == b"y"
    finally:
        daemon.stop()


def test_no_daemon_is_a_prompt_precise_error(tmp_path: Path) -> None:
    with (
        kc.Client(tmp_path / "none.sock", timeout=2, reconnect_window=0.1) as client,
        pytest.raises(kc.DaemonUnavailable, match="is knoxd running"),
    ):
        client.get_primary("a:b")


def test_reconnects_after_the_daemon_restarts(tmp_path: Path) -> None:
    first = Daemon(tmp_path)
    first.start()
    first.put(make_key("db:pw", b"v1"))
    with kc.Client(first.workload, timeout=5, reconnect_window=5, cache=False) as client:
        assert client.get_primary("db:pw") == b"v1"
        first.stop()
        second = Daemon(tmp_path)
        second.start()
        try:
            second.put(make_key("db:pw", b"v2"))
            assert client.get_primary("db:pw") == b"v2"
        finally:
            second.stop()


def test_watch_sees_a_rotation_and_a_revocation(daemon: Daemon) -> None:
    daemon.put(make_key("db:pw", b"v1"))
    with (
        kc.Client(daemon.workload, timeout=5) as client,
        client.watch(["db:pw"], idle_timeout=5) as events,
    ):
        first = next(events)
        assert isinstance(first, UpdateEvent) and first.key.primary.data == b"v1"
        daemon.put(make_key("db:pw", b"v2", b"v1", first_id=2))
        second = next(events)
        assert isinstance(second, UpdateEvent) and second.key.primary.data == b"v2"
        daemon.remove("db:pw", RemovalReason.FORBIDDEN)
        third = next(events)
        assert isinstance(third, RevokedEvent) and third.key_id == "db:pw"


def test_cached_get_sees_the_rotation(daemon: Daemon) -> None:
    daemon.put(make_key("db:pw", b"v1"))
    with kc.Client(daemon.workload, timeout=5) as client:
        assert client.get_primary("db:pw") == b"v1"
        wait_until(lambda: client._cache is not None and "db:pw" in client._cache.primary)
        daemon.put(make_key("db:pw", b"v2", first_id=2))
        wait_until(lambda: client.get_primary("db:pw") == b"v2")
        daemon.remove("db:pw", RemovalReason.DELETED)
        wait_until(lambda: client._cache is not None and "db:pw" not in client._cache.primary)
        with pytest.raises(kc.NotRegisteredError):
            client.get_primary("db:pw")


def test_cache_is_dropped_when_the_daemon_goes_away(tmp_path: Path) -> None:
    first = Daemon(tmp_path)
    first.start()
    first.put(make_key("db:pw", b"v1"))
    with kc.Client(first.workload, timeout=5, reconnect_window=5) as client:
        assert client.get_primary("db:pw") == b"v1"
        wait_until(lambda: client._cache is not None and "db:pw" in client._cache.primary)
        first.stop()
        wait_until(lambda: client._cache is not None and not client._cache.primary)
        second = Daemon(tmp_path)
        second.start()
        try:
            second.put(make_key("db:pw", b"v2", first_id=2))
            wait_until(lambda: client.get_primary("db:pw") == b"v2")
        finally:
            second.stop()


def test_client_is_thread_safe(daemon: Daemon) -> None:
    for n in range(8):
        daemon.put(make_key(f"k:{n}", f"secret-{n}".encode()))
    failures: list[BaseException] = []
    with kc.Client(daemon.workload, timeout=10, cache=False) as client:

        def work(n: int) -> None:
            try:
                for _ in range(100):
                    assert client.get_primary(f"k:{n}") == f"secret-{n}".encode()
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    assert not failures


# --- trio client ---------------------------------------------------------------------------------


async def test_async_client(daemon: Daemon) -> None:
    await trio.to_thread.run_sync(daemon.put, make_key("db:pw", b"v1", b"a1"))
    with trio.fail_after(10):
        async with kc.AsyncClient(daemon.workload, timeout=5) as client:
            assert await client.get_primary("db:pw") == b"v1"
            assert await client.get_active("db:pw") == [b"v1", b"a1"]
            with pytest.raises(kc.NotRegisteredError):
                await client.get("nope:nope")
            assert await client.register(["x:y"]) == ["x:y"]
            async with client.watch(["db:pw"], idle_timeout=5) as events:
                first = await events.__anext__()
                assert isinstance(first, UpdateEvent)
                await trio.to_thread.run_sync(daemon.put, make_key("db:pw", b"v2", first_id=2))
                second = await events.__anext__()
                assert isinstance(second, UpdateEvent) and second.key.primary.data == b"v2"
            # The in-process copy follows the rotation (the loop is bounded by fail_after).
            for _ in range(1000):
                if await client.get_primary("db:pw") == b"v2":
                    break
                await trio.sleep(0.01)
