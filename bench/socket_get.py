"""Benchmark: ``get`` through knoxd's socket with knox.client, beside the raw socket round trip.

Starts the real knoxd socket server (``knoxd.socket_api.server``) in a child process with a cache
view filled directly (no Knox server needed), then measures, each for a fixed window:

* ``persistent_1``: one client process, one persistent connection (``Client(cache=False)``);
* ``clients_16``: 16 client processes, one persistent connection each;
* ``conn_per_request``: one client process, a new connection (hello included) per get;
* ``raw_roundtrip``: a blocking socketpair ping-pong between 2 processes with the same byte counts
  as a get request and its response (case A of ``bench/ipc_limits.md``);
* ``client_cached_get_rps``: ``Client.get_primary`` on a watched key, in-process.

Usage: ``python bench/socket_get.py [--json] [--seconds S]``; the whole run stays under 60 s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import trio

from knox import protocol as p
from knox.client import Client
from knox.model import Key, KeyVersion, VersionStatus, version_hash
from knoxd.cache.entry import CacheEntry
from knoxd.cache.view import CacheView
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

KEY_ID = "bench:db_password"
FORK = mp.get_context("fork")
WARMUP = 0.2


def bench_key() -> Key:
    versions = (
        KeyVersion(7_001_001, os.urandom(64), VersionStatus.PRIMARY, 1_717_000_000_000_000_000),
        KeyVersion(7_001_002, os.urandom(64), VersionStatus.ACTIVE, 1_717_000_000_000_000_001),
    )
    return Key(KEY_ID, (), versions, version_hash(versions))


class _NoUpstream:
    """The refresher seam with nothing behind it: the bench serves only what the view holds."""

    async def register(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        return list(key_ids)

    async def unregister(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        return []

    def is_registered(self, identity: str, key_id: str) -> bool:
        return True

    def refusal(self, identity: str, key_id: str) -> Refusal | None:
        return None

    def request_refresh(self, identity: str | None, key_ids: Sequence[str] | None) -> int:
        return 0

    def status(self) -> list[IdentityStatus]:
        return []


def _config(root: Path) -> Config:
    unused = root / "unused.pem"
    return Config(
        DaemonConfig(
            state_dir=root,
            workload_socket=root / "run" / "knoxd.sock",
            admin_socket=root / "admin" / "admin.sock",
        ),
        UpstreamConfig(("https://127.0.0.1:1",)),
        (
            IdentityConfig(
                "bench",
                IdentityKind.MACHINE,
                unused,
                unused,
                "b",
                (),
                PeerSelectors(uid=(os.getuid(),)),
            ),
        ),
    )


def _serve(root: Path, key: Key, ready: Connection) -> None:
    async def main() -> None:
        view = CacheView()
        view.set(CacheEntry("bench", key, key.hash, time.time()))
        ctx = SocketContext(
            _config(root),
            view,
            _NoUpstream(),
            "bench",
            fetch_rate=1e9,
            fetch_burst=1e9,
            activated={},
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_sockets, ctx)
            ready.send(True)

    trio.run(main)


# --- client loops (each in its own process) ------------------------------------------------------


def _summary(latencies: list[float], elapsed: float, count: int) -> dict[str, float]:
    latencies.sort()
    return {
        "rps": count / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
    }


def _timed(op: Callable[[], object], seconds: float) -> tuple[list[float], float, int]:
    end = time.perf_counter() + WARMUP
    while time.perf_counter() < end:
        op()
    latencies: list[float] = []
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end:
        op()
        after = time.perf_counter()
        latencies.append(after - now)
        now = after
    return latencies, now - start, len(latencies)


def _persistent(path: str, seconds: float, out: Connection) -> None:
    with Client(path, cache=False) as client:
        out.send(_timed(lambda: client.get_primary(KEY_ID), seconds))


def _per_request(path: str, seconds: float, out: Connection) -> None:
    def once() -> None:
        with Client(path, cache=False) as client:
            client.get_primary(KEY_ID)

    out.send(_timed(once, seconds))


def _in_children(target: Any, args: tuple[Any, ...], n: int) -> dict[str, float]:
    pipes = [FORK.Pipe(duplex=False) for _ in range(n)]
    procs = [FORK.Process(target=target, args=(*args, w)) for _, w in pipes]
    for proc in procs:
        proc.start()
    results = [r.recv() for r, _ in pipes]
    for proc in procs:
        proc.join(10)
    for r, w in pipes:
        r.close()
        w.close()
    latencies = [lat for res in results for lat in res[0]]
    elapsed = max(res[1] for res in results)
    return _summary(latencies, elapsed, sum(res[2] for res in results))


def _raw_server(
    sock: socket.socket, other_end: socket.socket, request_size: int, response: bytes
) -> None:
    # The fork copied the client's end too; keeping it open would hide the client's close.
    other_end.close()
    while True:
        got = 0
        while got < request_size:
            data = sock.recv(65536)
            if not data:
                return
            got += len(data)
        sock.sendall(response)


def raw_roundtrip(request_size: int, response_size: int, seconds: float) -> dict[str, float]:
    """Case A: blocking ping-pong over a socketpair between 2 processes, same byte counts."""
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = FORK.Process(
        target=_raw_server, args=(server, client, request_size, b"r" * response_size)
    )
    proc.start()
    server.close()
    request = b"q" * request_size

    def once() -> None:
        client.sendall(request)
        got = 0
        while got < response_size:
            got += len(client.recv(65536))

    try:
        latencies, elapsed, count = _timed(once, seconds)
    finally:
        client.close()
        proc.join(10)
    return _summary(latencies, elapsed, count)


def cached_rate(path: str, seconds: float) -> float:
    with Client(path) as client:
        client.get_primary(KEY_ID)
        deadline = time.monotonic() + 5
        while client._cache is not None and KEY_ID not in client._cache.primary:
            if time.monotonic() > deadline:
                raise RuntimeError("the watch stream did not fill the cache")
            time.sleep(0.01)
        get = client.get_primary
        count = 0
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            for _ in range(10_000):
                get(KEY_ID)
            count += 10_000
        return count / (time.perf_counter() - start)


def run(seconds: float) -> dict[str, Any]:
    key = bench_key()
    request_size = len(p.encode_frame(p.request_obj(p.Get(1, KEY_ID))))
    response_size = len(p.encode_get_ok(1, p.encode_cached_key(key), 0, False))
    with tempfile.TemporaryDirectory(prefix="knoxbench") as tmp:
        root = Path(tmp)
        path = str(root / "run" / "knoxd.sock")
        ready_r, ready_w = FORK.Pipe(duplex=False)
        server = FORK.Process(target=_serve, args=(root, key, ready_w), daemon=True)
        server.start()
        try:
            if not ready_r.poll(10):
                raise RuntimeError("the knoxd socket server did not start")
            ready_r.recv()
            results: dict[str, Any] = {
                "raw_roundtrip": raw_roundtrip(request_size, response_size, seconds),
                "persistent_1": _in_children(_persistent, (path, seconds), 1),
                "clients_16": _in_children(_persistent, (path, seconds), 16),
                "conn_per_request": _in_children(_per_request, (path, seconds), 1),
                "client_cached_get_rps": cached_rate(path, seconds),
            }
        finally:
            server.terminate()
            server.join(10)
            ready_r.close()
            ready_w.close()
    results["frames"] = {"request_bytes": request_size, "response_bytes": response_size}
    return results


def _print_table(results: dict[str, Any]) -> None:
    raw = results["raw_roundtrip"]
    frames = results["frames"]
    print(
        f"frames: request {frames['request_bytes']} B, response {frames['response_bytes']} B; "
        f"os.cpu_count()={os.cpu_count()}"
    )
    print(f"{'case':<18} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'thr/A':>7} {'p50/A':>7}")
    for name in ("raw_roundtrip", "persistent_1", "clients_16", "conn_per_request"):
        r = results[name]
        print(
            f"{name:<18} {r['rps']:>10,.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
            f"{r['rps'] / raw['rps']:>6.2f}x {r['p50_ms'] / raw['p50_ms']:>6.1f}x"
        )
    cached = results["client_cached_get_rps"]
    print(f"client_cached_get  {cached:>10,.0f} /s in-process ({cached / raw['rps']:,.0f}x A)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--seconds", type=float, default=1.5, help="measured window per case")
    args = parser.parse_args(argv)
    if not 0.1 <= args.seconds <= 8:
        parser.error("--seconds must be in 0.1..8 (the run must stay under 60 s)")
    results = run(args.seconds)
    if args.json:
        json.dump(results, sys.stdout)
        print()
    else:
        _print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
