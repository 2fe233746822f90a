"""knoxd's socket API over real Unix sockets: every op and error code, limits, watch streams,
hostile input, listeners."""

from __future__ import annotations

import os
import resource
import stat
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knox import protocol as p
from knox.model import Key, KeyVersion, VersionStatus, version_hash
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
from knoxd.socket_api.handler import ServerState
from knoxd.socket_api.listener import ListenerError, activated_sockets, bind_unix
from knoxd.socket_api.peer import unit_from_cgroup
from knoxd.socket_api.server import SocketContext, serve_sockets

ROOT_UID = os.getuid()


def make_key(key_id: str, *secrets: bytes) -> Key:
    versions = tuple(
        KeyVersion(i + 1, s, VersionStatus.PRIMARY if i == 0 else VersionStatus.ACTIVE, 1000 + i)
        for i, s in enumerate(secrets)
    )
    return Key(key_id, (), versions, version_hash(versions))


def put(view: CacheView, identity: str, key: Key, *, at: float | None = None) -> None:
    view.set(CacheEntry(identity, key, key.hash, time.time() if at is None else at))


class InTestRequester:
    """A FetchRequester over a real CacheView: registrations in memory, refusals set by tests."""

    def __init__(self, view: CacheView, identities: Sequence[str]) -> None:
        self.view = view
        self.identities = set(identities)
        self.registered: set[tuple[str, str]] = set()
        self.refusals: dict[tuple[str, str], Refusal] = {}
        self.registered_any = trio.Event()
        self.refreshed: list[tuple[str | None, tuple[str, ...] | None]] = []

    async def register(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        if identity not in self.identities:
            raise KeyError(identity)
        self.registered.update((identity, k) for k in key_ids)
        self.registered_any.set()
        return list(key_ids)

    async def unregister(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        if identity not in self.identities:
            raise KeyError(identity)
        dropped = [k for k in key_ids if (identity, k) in self.registered]
        for k in dropped:
            self.registered.discard((identity, k))
            self.view.remove(identity, k, RemovalReason.UNREGISTERED)
        return dropped

    def is_registered(self, identity: str, key_id: str) -> bool:
        return (identity, key_id) in self.registered

    def refusal(self, identity: str, key_id: str) -> Refusal | None:
        return self.refusals.get((identity, key_id))

    def request_refresh(self, identity: str | None, key_ids: Sequence[str] | None) -> int:
        self.refreshed.append((identity, None if key_ids is None else tuple(key_ids)))
        return len(key_ids) if key_ids is not None else len(self.registered)

    def status(self) -> list[IdentityStatus]:
        return [IdentityStatus(n, f"0t{n}", 1, None, None, True) for n in sorted(self.identities)]


def identity(name: str, **peers: Any) -> IdentityConfig:
    return IdentityConfig(
        name,
        IdentityKind.MACHINE,
        Path("/nonexistent"),
        Path("/nonexistent"),
        peers=PeerSelectors(**peers),
    )


@dataclass
class Server:
    dir: Path
    view: CacheView
    fetch: InTestRequester
    state: ServerState
    workload: Path = field(init=False)
    admin: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workload = self.state.config.workload_socket
        self.admin = self.state.config.admin_socket


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Not tmp_path: other uids must be able to reach the sockets (pytest's dirs are 0700).
    with tempfile.TemporaryDirectory(prefix="knoxd-sock-", dir="/tmp") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def make_config(d: Path, identities: Sequence[IdentityConfig], **daemon: Any) -> Config:
    options: dict[str, Any] = {"max_connections_per_uid": 2000, **daemon}
    return Config(
        DaemonConfig(d, d / "run" / "knoxd.sock", d / "admin" / "admin.sock", **options),
        UpstreamConfig(("https://knox.invalid",)),
        tuple(identities),
    )


async def start(
    nursery: trio.Nursery, d: Path, identities: Sequence[IdentityConfig] | None = None, **kw: Any
) -> Server:
    ids = identities or [identity("host", uid=[ROOT_UID]), identity("web", uid=[4242])]
    fetch_kw = {k: kw.pop(k) for k in ("fetch_rate", "fetch_burst") if k in kw}
    config = make_config(d, ids, **kw)
    view = CacheView()
    fetch = InTestRequester(view, [i.name for i in ids])
    ctx = SocketContext(config, view, fetch, "0.test", activated={}, **fetch_kw)
    state = await nursery.start(serve_sockets, ctx)
    return Server(d, view, fetch, state)


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = p.FrameDecoder()
        self.next_id = 0
        self.hello: dict[str, Any] = {}

    @classmethod
    async def open(cls, path: Path, *, hello: bool = True) -> Client:
        client = cls(await trio.open_unix_socket(str(path)))
        if hello:
            client.hello = await client.send_recv(p.client_hello())
        return client

    async def send(self, obj: dict[str, Any]) -> None:
        await self.stream.send_all(p.encode_frame(obj))

    async def recv(self) -> dict[str, Any] | None:
        with trio.fail_after(10):
            while True:
                msg = self.decoder.next_message()
                if msg is not None:
                    return msg
                data = await self.stream.receive_some(65536)
                self.decoder.feed(data)
                if not data:
                    return self.decoder.next_message()

    async def send_recv(self, obj: dict[str, Any]) -> dict[str, Any]:
        await self.send(obj)
        msg = await self.recv()
        assert msg is not None
        return msg

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.next_id += 1
        reply = await self.send_recv({"id": self.next_id, "op": op, **args})
        assert reply["id"] == self.next_id
        return reply

    async def aclose(self) -> None:
        await self.stream.aclose()


def code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    return str(reply["error"]["code"])


@pytest.fixture
async def server(nursery: trio.Nursery, sock_dir: Path) -> Server:
    return await start(nursery, sock_dir)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    c = await Client.open(server.workload)
    yield c
    await c.aclose()


# --- hello and key ops -------------------------------------------------------------------------


async def test_hello_names_peer_and_identity(server: Server, client: Client) -> None:
    assert client.hello["op"] == "hello"
    assert client.hello["server"] == "knoxd/0.test"
    assert client.hello["peer"]["uid"] == ROOT_UID
    assert client.hello["identity"] == "host"


async def test_get_serves_cached_key_with_age(server: Server, client: Client) -> None:
    key = make_key("db:pw", b"s3cret", b"old")
    put(server.view, "host", key, at=time.time() - 2)
    reply = await client.call("get", key="db:pw")
    result = p.get_result(p.Ok(reply["id"], reply))
    assert result.key.primary.data == b"s3cret"
    assert [v.data for v in result.key.versions] == [b"s3cret", b"old"]
    assert 1500 <= result.age_ms < 60_000
    assert result.stale is False
    assert (await client.call("get", key="db:pw", version=2))["ok"] is True
    assert code(await client.call("get", key="db:pw", version=9)) == "not_found"


async def test_get_errors(server: Server, client: Client) -> None:
    assert code(await client.call("get", key="nope")) == "not_registered"
    server.fetch.registered.add(("host", "pending"))
    reply = await client.call("get", key="pending")
    assert code(reply) == "not_ready" and reply["error"]["retry"] is True
    for refusal, expected in [
        (Refusal.FORBIDDEN, "forbidden"),
        (Refusal.NOT_FOUND, "not_found"),
        (Refusal.UNREACHABLE, "upstream_unavailable"),
    ]:
        server.fetch.refusals[("host", "refused")] = refusal
        assert code(await client.call("get", key="refused")) == expected
    put(server.view, "web", make_key("webkey", b"x"))
    reply = await client.call("get", key="webkey", identity="web")
    assert code(reply) == "unauthorized" and "uid 0" in reply["error"]["message"]
    assert code(await client.call("get", key="bad key!")) == "bad_request"
    assert code(await client.call("status")) == "bad_request"


async def test_stale_marking_and_limit(nursery: trio.Nursery, sock_dir: Path) -> None:
    server = await start(nursery, sock_dir, max_stale_seconds=100.0, revalidate_seconds=10.0)
    c = await Client.open(server.workload)
    put(server.view, "host", make_key("old", b"x"), at=time.time() - 50)
    reply = await c.call("get", key="old")
    assert reply["ok"] and reply["stale"] is True
    put(server.view, "host", make_key("older", b"y"), at=time.time() - 500)
    reply = await c.call("get", key="older")
    assert code(reply) == "stale" and reply["error"]["retry"] is True
    await c.aclose()


async def test_get_wait_registers_and_waits_for_first_fetch(
    server: Server, client: Client, nursery: trio.Nursery
) -> None:
    async def deliver() -> None:
        await server.fetch.registered_any.wait()
        put(server.view, "host", make_key("fresh", b"new"))

    nursery.start_soon(deliver)
    reply = await client.call("get", key="fresh", wait_ms=5000)
    assert reply["ok"] and reply["key"]["versions"][0]["data"] == b"new"
    # Registered but never fetched: wait_ms runs out with not_ready.
    assert code(await client.call("get", key="never", wait_ms=50)) == "not_ready"
    assert ("host", "never") in server.fetch.registered


async def test_register_unregister_ping(server: Server, client: Client) -> None:
    reply = await client.call("register", keys=["a", "b", "a"])
    assert reply["registered"] == ["a", "b"]
    assert (await client.call("unregister", keys=["a", "zz"]))["unregistered"] == ["a"]
    assert (await client.call("ping")) == {"id": client.next_id, "ok": True}
    assert code(await client.call("register", keys=["a"], identity="web")) == "unauthorized"


async def test_pipelined_requests_answered_in_order(server: Server, client: Client) -> None:
    put(server.view, "host", make_key("k", b"v"))
    frames = b"".join(
        p.encode_frame(
            {"id": i, "op": "get" if i % 2 else "ping", "key": "k"}
            if i % 2
            else {"id": i, "op": "ping"}
        )
        for i in range(1, 201)
    )
    await client.stream.send_all(frames)
    for i in range(1, 201):
        reply = await client.recv()
        assert reply is not None and reply["id"] == i and reply["ok"] is True


async def test_fetch_rate_limit_answers_busy(nursery: trio.Nursery, sock_dir: Path) -> None:
    server = await start(nursery, sock_dir, fetch_rate=0.001, fetch_burst=2)
    c = await Client.open(server.workload)
    assert (await c.call("register", keys=["a"]))["ok"]
    assert (await c.call("register", keys=["b"]))["ok"]
    reply = await c.call("register", keys=["c"])
    assert code(reply) == "busy" and reply["error"]["retry"] is True
    assert code(await c.call("get", key="d", wait_ms=10)) == "busy"
    await c.aclose()


# --- watch -------------------------------------------------------------------------------------


async def test_watch_update_revoke_unwatch(server: Server, client: Client) -> None:
    put(server.view, "host", make_key("w", b"one"))
    reply = await client.call("watch", keys=["w", "later"])
    assert reply["watching"] == ["later", "w"]
    event = await client.recv()
    assert event is not None and event["event"] == "update"
    assert event["key"]["versions"][0]["data"] == b"one"
    put(server.view, "host", make_key("later", b"two"))
    event = await client.recv()
    assert event is not None and event["key"]["id"] == "later"
    server.view.remove("host", "w", RemovalReason.FORBIDDEN)
    assert await client.recv() == {"event": "revoked", "key_id": "w", "reason": "forbidden"}
    assert (await client.call("unwatch", keys=["w"]))["watching"] == ["later"]


async def test_slow_watch_reader_gets_latest_without_backlog(
    server: Server, client: Client
) -> None:
    big = os.urandom(200_000)
    put(server.view, "host", make_key("rot", big, b"0"))
    await client.call("watch", keys=["rot"])
    # The reader reads nothing while the key rotates 1,000 times with large values.
    for i in range(1, 1001):
        put(server.view, "host", make_key("rot", big, str(i).encode()))
        if i % 100 == 0:
            await trio.sleep(0.01)
    await trio.sleep(0.05)
    assert server.state.connections == 1
    # At most one pending state per key inside the server, whatever was written meanwhile.
    seen: list[bytes] = []
    while True:
        event = await client.recv()
        assert event is not None
        seen.append(event["key"]["versions"][1]["data"])
        if seen[-1] == b"1000":
            break
    assert len(seen) < 100


# --- admin -------------------------------------------------------------------------------------


async def test_admin_ops(server: Server) -> None:
    put(server.view, "web", make_key("adm", b"topsecret"))
    admin = await Client.open(server.admin)
    status = await admin.call("status")
    assert status["version"] == "0.test" and status["cache"]["entries"] == 1
    assert {i["name"] for i in status["identities"]} == {"host", "web"}
    assert status["connections"] == 1
    listed = await admin.call("list", identity="web")
    (entry,) = listed["entries"]
    assert entry["key_id"] == "adm" and entry["versions"] == [{"id": 1, "status": "Primary"}]
    assert b"topsecret" not in msgpack.packb(listed)
    assert (await admin.call("refresh", keys=["adm"], identity="web"))["queued"] == 1
    reply = await admin.call("register", keys=["x"], identity="web")
    assert reply["registered"] == ["x"]
    assert code(await admin.call("register", keys=["x"])) == "bad_request"
    assert code(await admin.call("register", keys=["x"], identity="ghost")) == "bad_request"
    await admin.aclose()


# --- limits and hostile input -----------------------------------------------------------------


async def test_connection_limits_answer_busy(nursery: trio.Nursery, sock_dir: Path) -> None:
    server = await start(nursery, sock_dir, max_connections_per_uid=3)
    clients = [await Client.open(server.workload) for _ in range(3)]
    extra = await Client.open(server.workload, hello=False)
    reply = await extra.recv()
    assert reply is not None and code(reply) == "busy"
    assert await extra.recv() is None
    for c in (*clients, extra):
        await c.aclose()


async def test_idle_timeout_closes(nursery: trio.Nursery, sock_dir: Path) -> None:
    server = await start(nursery, sock_dir, idle_timeout_seconds=0.2)
    c = await Client.open(server.workload)
    assert await c.recv() is None
    await c.aclose()


async def test_thousand_concurrent_connections(server: Server) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))
    put(server.view, "host", make_key("k", b"v"))
    clients: list[Client] = []
    try:
        async with trio.open_nursery() as n:

            async def one() -> None:
                c = await Client.open(server.workload)
                clients.append(c)

            for _ in range(1000):
                n.start_soon(one)
        assert server.state.connections == 1000
        answers: list[bool] = []

        async def get(c: Client) -> None:
            answers.append((await c.call("get", key="k"))["key"]["versions"][0]["data"] == b"v")

        async with trio.open_nursery() as n:
            for c in clients:
                n.start_soon(get, c)
        assert answers == [True] * 1000
    finally:
        for c in clients:
            await c.aclose()


def _frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=10,
)
_names = st.sampled_from(["id", "op", "key", "keys", "identity", "wait_ms", "version"])
_ops = st.sampled_from(["get", "register", "watch", "unwatch", "ping", "status", "hello", "x"])
hostile = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(_frame_of),
    st.dictionaries(_names | st.text(max_size=8), _values | _ops, max_size=5).map(
        lambda m: _frame_of(msgpack.packb(m))
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=hostile)
def test_hostile_frames_never_break_the_server(data: bytes) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            async with trio.open_nursery() as nursery:
                server = await start(nursery, Path(d))
                bad = await trio.open_unix_socket(str(server.workload))
                await bad.send_all(p.encode_frame(p.client_hello()) + data)
                good = await Client.open(server.workload)
                assert (await good.call("ping"))["ok"] is True
                decoder = p.FrameDecoder()
                with trio.fail_after(5):
                    await bad.send_eof()
                    while chunk := await bad.receive_some(65536):
                        decoder.feed(chunk)
                await bad.aclose()
                assert (await good.call("ping"))["ok"] is True
                await good.aclose()
                nursery.cancel_scope.cancel()

    trio.run(main)


async def test_protocol_errors_close_with_error_frame(server: Server) -> None:
    c = await Client.open(server.workload, hello=False)
    reply = await c.send_recv({"op": "get", "key": "k", "id": 1})
    assert code(reply) == "protocol" and reply["id"] is None
    assert await c.recv() is None
    await c.aclose()
    c = await Client.open(server.workload, hello=False)
    assert code(await c.send_recv({"op": "hello", "magic": "knoxd", "v": 2})) == "version"
    await c.aclose()
    c = await Client.open(server.workload)
    await c.stream.send_all(struct.pack(">I", p.MAX_FRAME + 1))
    too_long = await c.recv()
    assert too_long is not None and code(too_long) == "protocol"
    await c.aclose()


# --- listeners ---------------------------------------------------------------------------------


async def test_socket_modes_and_stale_and_live(server: Server, sock_dir: Path) -> None:
    assert stat.S_IMODE(server.workload.stat().st_mode) == 0o666
    admin_stat = server.admin.stat()
    assert stat.S_IMODE(admin_stat.st_mode) == 0o600 and admin_stat.st_uid == ROOT_UID
    with pytest.raises(ListenerError, match="already listening"):
        bind_unix(server.workload, mode=0o666)
    stale = sock_dir / "stale.sock"
    s = bind_unix(stale, mode=0o600)
    s.close()
    again = bind_unix(stale, mode=0o640)
    assert stat.S_IMODE(stale.stat().st_mode) == 0o640
    again.close()
    (sock_dir / "file").write_text("x")
    with pytest.raises(ListenerError, match="not a socket"):
        bind_unix(sock_dir / "file", mode=0o600)


def test_activated_sockets_ignores_other_pid() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "workload"}
    assert activated_sockets(env) == {}
    assert env == {}


def test_unit_from_cgroup() -> None:
    assert unit_from_cgroup("0::/system.slice/web.service\n") == "web.service"
    assert unit_from_cgroup("0::/\n") is None
    assert unit_from_cgroup("1:name=systemd:/x\n") is None
