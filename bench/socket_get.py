"""Benchmark: ``get`` through knoxd's socket, beside the raw socket round trip (issue 6's goals).

Starts the real knoxd socket server (``knoxd.socket_api.server``) in a child process with a cache
view filled directly (no Knox server needed), then measures, each for a fixed window:

* ``raw_roundtrip`` (A): a blocking socketpair ping-pong between 2 unpinned processes with the
  byte counts of a get request and its response (case A of ``bench/ipc_limits.md``);
* ``persistent_1``: one lean client process on one persistent connection;
* ``clients_16``: 16 lean client processes, one persistent connection each, all at once;
* ``conn_per_request``: one lean client process, a new connection (hello included) per get;
* ``library_1`` / ``library_16``: the same as the persistent cases with ``knox.client.Client``
  (``cache=False``), the library's own rate;
* ``client_cached_get``: ``Client.get_primary`` on a watched key, in-process.

The lean client (blocking socket, msgpack, like ``ipc_limits.py``'s) measures the server: it
packs each request, decodes each response and checks its id, and takes the primary secret, so
latency is end to end. Every repetition is preceded by a check of the CPU that other processes
use (``bg %``, 100 = one cpu) and a bounded wait for quiet. The repetitions are interleaved
(round 1 runs every case, then round 2, ...) and each figure is the median of the rounds; ``srv
us/req`` is the server process's CPU (utime + stime, 10 ms ticks) per request.

The goals are ratios to A measured in the same run, since absolute figures drift by +-30 % on
shared machines. Note that A is bimodal: when the scheduler keeps both of its processes on one
CPU (A's p50 then falls under about 25 us) it is 2-3x faster than the usual cross-CPU hand-off,
and every ratio against it looks worse; repeat the run.

``--floor`` adds ``floor_1`` and ``floor_16``: the same lean clients against the least a trio
server can do per get (no peer checks, no validation), to tell knoxd's own cost from the host's.

Usage: ``python bench/socket_get.py [--json] [--seconds S] [--rounds N] [--floor]``; the default
run takes about 40 s (50 s with ``--floor``) and every run stays under 60 s.
"""

from __future__ import annotations

import argparse
import array
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
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
CLIENTS = 16
QUIET_PCT = 25.0
QUIET_BUDGET = 8.0
# Per repetition beyond its measured window: load check, process start, warm-up.
REP_OVERHEAD = 0.6
HEADER = struct.Struct(">I")
Op = Callable[[], object]


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


def _floor(path: str, key: Key, ready: Connection) -> None:
    """The least a trio server can do per get on this host, for ``--floor``: the same frames as
    knoxd (so the lean client reads both), but no peer checks, no validation, no cache view; raw
    non-blocking sockets, a wait only when a read finds nothing, one checkpoint per batch."""
    key_obj = p.cached_key_obj(key)

    async def connection(sock: socket.socket) -> None:
        packer = msgpack.Packer()
        buf = bytearray()
        with sock:
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                if not data:
                    return
                buf += data
                out = []
                while len(buf) >= 4 and len(buf) >= (end := 4 + HEADER.unpack_from(buf)[0]):
                    msg = msgpack.unpackb(buf[4:end])
                    del buf[:end]
                    reply = (
                        {"op": "hello"}
                        if msg.get("op") == "hello"
                        else {"id": msg["id"], "ok": True, "key": key_obj, "age_ms": 0}
                    )
                    body = packer.pack(reply)
                    out.append(HEADER.pack(len(body)) + body)
                view = memoryview(b"".join(out))
                while view:
                    try:
                        view = view[sock.send(view) :]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                await trio.lowlevel.checkpoint()

    async def main() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(1024)
            listener.setblocking(False)
            ready.send(True)
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(listener)
                        continue
                    sock.setblocking(False)
                    nursery.start_soon(connection, sock)

    trio.run(main)


def _start(target: Callable[..., None], *args: Any) -> mp.process.BaseProcess:
    """A server process, once it says it is ready."""
    ready_r, ready_w = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=target, args=(*args, ready_w), daemon=True)
    proc.start()
    try:
        if not ready_r.poll(10):
            proc.terminate()
            raise RuntimeError(f"the {target.__name__} server did not start")
        ready_r.recv()
    finally:
        ready_r.close()
        ready_w.close()
    return proc


# --- measuring ------------------------------------------------------------------------------------


def _cpu_ns(pid: int) -> int:
    """utime + stime of a process, in ns (10 ms ticks)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * (1_000_000_000 // os.sysconf("SC_CLK_TCK"))


def _host_busy_ns() -> int:
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) * (1_000_000_000 // os.sysconf("SC_CLK_TCK"))


def background_load(seconds: float) -> float:
    """CPU % (100 = one cpu) the machine uses while this benchmark is idle: other processes."""
    busy, start = _host_busy_ns(), time.monotonic_ns()
    time.sleep(seconds)
    return (_host_busy_ns() - busy) / (time.monotonic_ns() - start) * 100


def _measure(op: Op, start: float, end: float) -> tuple[int, float, bytes]:
    """Run ``op`` until ``start`` (warm-up), then time each call until ``end``."""
    while time.monotonic() < start:
        op()
    latencies = array.array("d")
    now = first = time.monotonic()
    while now < end:
        op()
        after = time.monotonic()
        latencies.append(after - now)
        now = after
    return len(latencies), now - first, latencies.tobytes()


def _summary(count: int, elapsed: float, latencies: array.array[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "rps": count / elapsed,
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
    }


def _child(make_op: Callable[[], Op], start: float, end: float, out: Connection) -> None:
    try:
        out.send(_measure(make_op(), start, end))
    except BaseException as exc:  # the parent reports it instead of waiting forever
        out.send(("error", repr(exc)))
    finally:
        out.close()


def in_children(
    make_op: Callable[[], Op], n: int, seconds: float, server_pid: int
) -> dict[str, float]:
    """``n`` client processes each running ``make_op()``'s op over one common window."""
    start = time.monotonic() + 0.1 + 0.01 * n + WARMUP
    end = start + seconds
    pipes = [FORK.Pipe(duplex=False) for _ in range(n)]
    procs = [FORK.Process(target=_child, args=(make_op, start, end, w)) for _, w in pipes]
    for proc in procs:
        proc.start()
    for _, w in pipes:
        w.close()
    time.sleep(max(0.0, start - time.monotonic()))
    cpu = _cpu_ns(server_pid)
    time.sleep(max(0.0, end - time.monotonic()))
    cpu = _cpu_ns(server_pid) - cpu
    latencies: array.array[float] = array.array("d")
    count = 0
    try:
        for r, _ in pipes:
            result = r.recv()
            if result[0] == "error":
                raise RuntimeError(f"a client process failed: {result[1]}")
            count += result[0]
            latencies.frombytes(result[2])
    finally:
        for proc in procs:
            proc.join(10)
        for r, _ in pipes:
            r.close()
    summary = _summary(count, end - start, latencies)
    summary["srv_us"] = cpu / 1000 / max(1, count)
    return summary


# --- clients --------------------------------------------------------------------------------------


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(p.encode_frame(p.client_hello()))
        reply = _read_frame(sock, bytearray())
        if reply.get("op") != "hello":
            raise RuntimeError(f"knoxd refused the hello: {reply.get('error')}")
    except BaseException:
        sock.close()
        raise
    return sock


def _read_frame(sock: socket.socket, buf: bytearray) -> dict[str, Any]:
    """The next frame's map; ``buf`` holds bytes read past it."""
    while True:
        if len(buf) >= 4:
            end = 4 + HEADER.unpack_from(buf)[0]
            if len(buf) >= end:
                msg: dict[str, Any] = msgpack.unpackb(bytes(buf[4:end]))
                del buf[:end]
                return msg
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("knoxd closed the connection")
        buf += data


def _lean_get(sock: socket.socket) -> Op:
    """One get per call on ``sock``: pack, send, read, decode, check, take the primary."""
    packer = msgpack.Packer()
    buf = bytearray()
    state = [0]

    def op() -> bytes:
        request_id = state[0] = state[0] + 1
        body = packer.pack({"id": request_id, "op": "get", "key": KEY_ID})
        sock.sendall(HEADER.pack(len(body)) + body)
        msg = _read_frame(sock, buf)
        if msg.get("id") != request_id or msg.get("ok") is not True:
            raise RuntimeError(f"unexpected answer: {msg.get('error')}")
        data: bytes = msg["key"]["versions"][0]["data"]
        return data

    return op


def lean_persistent(path: str) -> Callable[[], Op]:
    return lambda: _lean_get(_connect(path))


def lean_per_request(path: str) -> Callable[[], Op]:
    def make() -> Op:
        def op() -> object:
            sock = _connect(path)
            try:
                return _lean_get(sock)()
            finally:
                sock.close()

        return op

    return make


def library_persistent(path: str) -> Callable[[], Op]:
    def make() -> Op:
        client = Client(path, cache=False)
        return lambda: client.get_primary(KEY_ID)

    return make


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
        start = time.monotonic() + WARMUP
        count, elapsed, raw = _measure(once, start, start + seconds)
    finally:
        client.close()
        proc.join(10)
    latencies: array.array[float] = array.array("d")
    latencies.frombytes(raw)
    return _summary(count, elapsed, latencies)


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


# --- the run --------------------------------------------------------------------------------------

CASES = (
    "raw_roundtrip",
    "persistent_1",
    f"clients_{CLIENTS}",
    "conn_per_request",
    "library_1",
    f"library_{CLIENTS}",
)
FLOOR_CASES = ("floor_1", f"floor_{CLIENTS}")


def _median(reps: list[dict[str, float]]) -> dict[str, float]:
    result = {name: statistics.median(r[name] for r in reps) for name in reps[0]}
    result["rps_min"] = min(r["rps"] for r in reps)
    result["rps_max"] = max(r["rps"] for r in reps)
    return result


def run(seconds: float, rounds: int, floor: bool) -> dict[str, Any]:
    key = bench_key()
    request_size = len(p.encode_frame(p.request_obj(p.Get(1, KEY_ID))))
    response_size = len(p.encode_get_ok(1, p.encode_cached_key(key), 0, False))
    names = CASES + (FLOOR_CASES if floor else ())
    reps: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    quiet_budget = QUIET_BUDGET
    load_before = os.getloadavg()
    servers: list[mp.process.BaseProcess] = []
    with tempfile.TemporaryDirectory(prefix="knoxbench") as tmp:
        root = Path(tmp)
        path = str(root / "run" / "knoxd.sock")
        floor_path = str(root / "floor.sock")
        try:
            servers.append(_start(_serve, root, key))
            pid = servers[0].pid
            assert pid is not None
            cases: dict[str, Callable[[], dict[str, float]]] = {
                "raw_roundtrip": lambda: raw_roundtrip(request_size, response_size, seconds),
                "persistent_1": lambda: in_children(lean_persistent(path), 1, seconds, pid),
                f"clients_{CLIENTS}": lambda: in_children(
                    lean_persistent(path), CLIENTS, seconds, pid
                ),
                "conn_per_request": lambda: in_children(lean_per_request(path), 1, seconds, pid),
                "library_1": lambda: in_children(library_persistent(path), 1, seconds, pid),
                f"library_{CLIENTS}": lambda: in_children(
                    library_persistent(path), CLIENTS, seconds, pid
                ),
            }
            if floor:
                servers.append(_start(_floor, floor_path, key))
                floor_pid = servers[1].pid
                assert floor_pid is not None
                cases["floor_1"] = lambda: in_children(
                    lean_persistent(floor_path), 1, seconds, floor_pid
                )
                cases[f"floor_{CLIENTS}"] = lambda: in_children(
                    lean_persistent(floor_path), CLIENTS, seconds, floor_pid
                )
            for _ in range(rounds):
                for name, measure in cases.items():
                    bg = background_load(0.15)
                    while bg > QUIET_PCT and quiet_budget > 0:
                        waited = time.monotonic()
                        bg = background_load(0.5)
                        quiet_budget -= time.monotonic() - waited
                    result = measure()
                    result["bg_pct"] = bg
                    reps[name].append(result)
            cached = cached_rate(path, min(seconds, 1.0))
        finally:
            for server in servers:
                server.terminate()
                server.join(10)
    results: dict[str, Any] = {name: _median(r) for name, r in reps.items()}
    for name, r in reps.items():
        results[name]["bg_pct"] = max(rep["bg_pct"] for rep in r)
    results["client_cached_get_rps"] = cached
    results["frames"] = {"request_bytes": request_size, "response_bytes": response_size}
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    results["seconds"] = seconds
    results["rounds"] = rounds
    return results


def goals(results: dict[str, Any]) -> list[tuple[str, bool]]:
    """Issue 6's goals, each with whether this run met it."""
    raw = results["raw_roundtrip"]
    many = results[f"clients_{CLIENTS}"]
    one = results["persistent_1"]
    many_ratio = many["rps"] / raw["rps"]
    one_ratio = one["rps"] / raw["rps"]
    one_p50 = one["p50_us"] / raw["p50_us"]
    return [
        (f"clients_{CLIENTS} >= 2.0x A: {many_ratio:.2f}x", many_ratio >= 2.0),
        (f"clients_{CLIENTS} p99 <= 1 ms: {many['p99_us'] / 1000:.2f} ms", many["p99_us"] <= 1000),
        (f"persistent_1 >= 0.85x A: {one_ratio:.2f}x", one_ratio >= 0.85),
        (f"persistent_1 p50 <= 1.2x A's: {one_p50:.2f}x", one_p50 <= 1.2),
    ]


def _print_table(results: dict[str, Any]) -> None:
    raw = results["raw_roundtrip"]
    frames = results["frames"]
    load = results["load_average"]
    print(
        f"frames: request {frames['request_bytes']} B, response {frames['response_bytes']} B; "
        f"os.cpu_count()={os.cpu_count()}; {results['rounds']} rounds of "
        f"{results['seconds']:g} s, medians; load average before "
        f"{' '.join(f'{x:.2f}' for x in load['before'])}, after "
        f"{' '.join(f'{x:.2f}' for x in load['after'])}"
    )
    print(
        f"{'case':<18} {'req/s':>9} {'min-max':>15} {'p50 us':>8} {'p99 us':>8} "
        f"{'thr/A':>6} {'p50/A':>6} {'srv us/req':>10} {'bg %':>5}"
    )
    for name in (*CASES, *FLOOR_CASES):
        if name not in results:
            continue
        r = results[name]
        srv = f"{r['srv_us']:.1f}" if "srv_us" in r else "-"
        spread = f"{r['rps_min']:,.0f}-{r['rps_max']:,.0f}"
        print(
            f"{name:<18} {r['rps']:>9,.0f} {spread:>15} {r['p50_us']:>8.1f} {r['p99_us']:>8.1f} "
            f"{r['rps'] / raw['rps']:>5.2f}x {r['p50_us'] / raw['p50_us']:>5.1f}x "
            f"{srv:>10} {r['bg_pct']:>5.0f}"
        )
    cached = results["client_cached_get_rps"]
    print(f"client_cached_get  {cached:>9,.0f} /s in-process ({cached / raw['rps']:,.0f}x A)")
    for text, met in goals(results):
        print(f"goal {'met   ' if met else 'MISSED'} {text}")
    if "floor_1" in results:
        print(
            "knoxd / floor (the share of what trio does here that knoxd reaches): "
            f"persistent_1 {_rate_ratio(results, 'persistent_1', 'floor_1'):.2f}x, "
            f"clients_{CLIENTS} "
            f"{_rate_ratio(results, f'clients_{CLIENTS}', f'floor_{CLIENTS}'):.2f}x"
        )


def _rate_ratio(results: dict[str, Any], case: str, floor: str) -> float:
    return float(results[case]["rps"] / results[floor]["rps"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--seconds", type=float, default=1.0, help="measured window per rep")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of every case")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure the least a trio server can do per get (adds about 10 s)",
    )
    args = parser.parse_args(argv)
    if not 0.1 <= args.seconds <= 2.5 or not 1 <= args.rounds <= 5:
        parser.error("--seconds must be in 0.1..2.5 and --rounds in 1..5")
    cases = len(CASES) + (len(FLOOR_CASES) if args.floor else 0)
    estimate = cases * args.rounds * (args.seconds + REP_OVERHEAD) + QUIET_BUDGET + 3
    if estimate > 60:
        parser.error(f"that run would take up to {estimate:.0f} s; it must stay under 60 s")
    results = run(args.seconds, args.rounds, args.floor)
    if args.json:
        json.dump(results, sys.stdout)
        print()
    else:
        _print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
