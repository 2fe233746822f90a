"""knoxd stopping under load: the ``knoxd`` command as systemd runs it (a real process with a
real notify socket) against a real dev server, SIGTERM while 100 clients are connected: readers,
watch streams, and registrations in flight (held up by another process's lock on the cache file).
"""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from knox import protocol as p
from knox.client import ClientProtocol, Incoming, check_hello
from knox.http_client import KnoxHTTPClient, ssl_context_for
from knox.model import Access, AccessType, PrincipalType
from knoxd.cache.cache_key import load_cache_key
from knoxd.cache.store import DB_NAME, CacheStore
from knoxd.config import load_config
from tests.knoxd_process import NotifySocket, knoxd_argv, knoxd_environ, knoxd_process
from tests.server_fixtures import dev_server

WAIT = 30
STOP_TIMEOUT = 10
CLIENTS = 100
READERS = 10  # fetch a key each (get with wait) before the stop
WATCHERS = 40  # hold a watch stream open
REGISTERING = 20  # send registrations around the stop: half just before, half just after
PIPELINED = 4  # registrations each of those sends at once (within the fetch burst of 100)


@contextmanager
def holding_write_lock(db: Path) -> Iterator[None]:
    """Hold the SQLite write lock of ``db`` for the block, as another process could."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


class Connection:
    """One raw protocol connection to knoxd."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.protocol = ClientProtocol()

    @classmethod
    async def open(cls, path: Path) -> Connection:
        conn = cls(await trio.open_unix_socket(str(path)))
        await conn.stream.send_all(conn.protocol.hello())
        item = await conn.next()
        assert item is not None
        check_hello(item)
        return conn

    async def next(self) -> Incoming | None:
        """The next message, or None once knoxd closed the connection."""
        while (item := self.protocol.next_incoming()) is None:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.protocol.receive_data(data)
            if not data:
                return self.protocol.next_incoming()
        return item

    async def send(self, request: p.Request) -> None:
        await self.stream.send_all(self.protocol.send(request))

    async def answer(self) -> p.Ok | p.ErrorReply | None:
        """The next answer (events skipped), or None if the connection ended first."""
        while True:
            item = await self.next()
            if item is None or isinstance(item, p.Ok | p.ErrorReply):
                return item


async def test_sigterm_with_100_clients_stops_in_time_and_keeps_every_acknowledged_write(
    tmp_path: Path,
) -> None:
    log = tmp_path / "knoxd.log"
    registered_ok: list[str] = []
    closed = 0
    with trio.fail_after(WAIT + STOP_TIMEOUT):
        async with dev_server(tmp_path / "server") as dev:
            reads = Access(PrincipalType.MACHINE, dev.hostname, AccessType.READ)
            async with KnoxHTTPClient(
                dev.url, auth="0u" + dev.admin_token, ssl_context=ssl_context_for(dev.ca)
            ) as admin:
                for i in range(READERS):
                    await admin.create_key(f"app:k{i}", f"value {i}".encode(), [reads])
                for i in range(REGISTERING * PIPELINED):
                    await admin.create_key(f"app:n{i}", b"late", [reads])
            config = load_config(dev.knoxd_config)
            workload = config.daemon.workload_socket
            async with NotifySocket(tmp_path / "notify") as systemd:
                env = knoxd_environ(NOTIFY_SOCKET=str(systemd.path))
                argv = knoxd_argv(dev.knoxd_config, "--stop-timeout", str(STOP_TIMEOUT))
                async with knoxd_process(argv, log, env) as knoxd:
                    await systemd.ready(knoxd, log)
                    conns = [await Connection.open(workload) for _ in range(CLIENTS)]
                    for i, conn in enumerate(conns[:READERS]):
                        await conn.send(p.Get(conn.protocol.new_id(), f"app:k{i}", wait_ms=20000))
                        answer = await conn.answer()
                        assert isinstance(answer, p.Ok), answer
                    watchers = conns[READERS : READERS + WATCHERS]
                    for i, conn in enumerate(watchers):
                        await conn.send(p.Watch(conn.protocol.new_id(), (f"app:k{i % READERS}",)))
                        assert isinstance(await conn.answer(), p.Ok)
                    registering = conns[READERS + WATCHERS : READERS + WATCHERS + REGISTERING]
                    sent: dict[int, list[str]] = {}

                    async def register(index: int, conn: Connection) -> None:
                        keys = [f"app:n{index * PIPELINED + j}" for j in range(PIPELINED)]
                        frames = [
                            conn.protocol.send(p.Register(conn.protocol.new_id(), (k,)))
                            for k in keys
                        ]
                        try:
                            await conn.stream.send_all(b"".join(frames))
                        except trio.BrokenResourceError:
                            return
                        sent[index] = keys

                    # Another program holds the cache file's write lock, so registrations wait
                    # in knoxd: they are in flight when the stop begins.
                    with holding_write_lock(config.daemon.state_dir / DB_NAME):
                        half = REGISTERING // 2
                        for index, conn in enumerate(registering[:half]):
                            await register(index, conn)
                        # Time for knoxd to read them (and block on the lock).
                        await trio.sleep(1)
                        knoxd.send_signal(signal.SIGTERM)
                        await systemd.until("STOPPING=1")
                        for index, conn in enumerate(registering[half:], start=half):
                            await register(index, conn)
                    in_flight = [k for i in range(half) for k in sent[i]]

                    async def finish(conn: Connection, keys: list[str]) -> None:
                        nonlocal closed
                        for key_id in keys:
                            answer = await conn.answer()
                            if answer is None:
                                break
                            assert isinstance(answer, p.Ok), answer
                            registered_ok.append(key_id)
                        while await conn.next() is not None:
                            pass
                        await conn.stream.aclose()
                        closed += 1

                    async with trio.open_nursery() as nursery:
                        for index, conn in enumerate(conns):
                            keys = sent.get(index - READERS - WATCHERS, [])
                            nursery.start_soon(finish, conn, keys)
                    # Exit status 0: the daemon finished its stop within --stop-timeout.
                    assert await knoxd.wait() == 0, log.read_text()
    assert closed == CLIENTS
    # Every request knoxd was answering when the stop began was answered.
    assert set(in_flight) <= set(registered_ok)
    text = log.read_text()
    assert '"knoxd stopped"' in text
    assert "Traceback" not in text
    assert '"level": "error"' not in text

    # The cache file as the next start finds it: every fetched value, every acknowledged
    # registration.
    state_dir = config.daemon.state_dir
    key = load_cache_key(state_dir, {})
    async with await CacheStore.open(state_dir, key) as store:
        registrations = await store.registrations()
        entries = {e.key_id: e for e in await store.load_all() if e.identity == "host"}
    for i in range(READERS):
        assert entries[f"app:k{i}"].key.primary.data == f"value {i}".encode()
    assert set(registered_ok) <= registrations["host"]
