"""GET-key and change-check throughput of knox_server over mTLS keep-alive connections.

Starts ``knox-server dev`` as a child process on 127.0.0.1, creates the keys it needs, then drives
it from client processes that speak HTTP/1.1 over blocking TLS sockets with the dev machine
certificate (``0t<hostname>``): lean clients, so the figures describe the server, not httpx.
Prints requests/s, p50/p99 latency and the server's CPU per request for

* ``get_1`` / ``get_16``: ``GET /v0/keys/bench:key/`` at 1 and 16 concurrent connections;
* ``changes_100_16``: ``GET /v0/keys/?id=hash…`` with 100 unchanged ids at 16 connections.

Usage: ``python bench/server_get.py [--seconds 5] [--json]``. Bounded: about 4 x seconds + 10 s.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

CLIENT_PROCESSES = 2


def _ticks(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _connect(host: str, port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _read_response(sock: ssl.SSLSocket, buf: bytearray) -> bytes:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        rest += chunk
    buf[:] = rest[length:]
    if status != b"200":
        raise RuntimeError(f"HTTP {status.decode()}: {rest[:length][:200]!r}")
    return rest[:length]


def _connection_loop(
    host: str, port: int, ctx: ssl.SSLContext, request: bytes, deadline: float, out: list[float]
) -> None:
    sock = _connect(host, port, ctx)
    buf = bytearray()
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                sock.sendall(request)
                _read_response(sock, buf)
            except ConnectionError:
                # The server may recycle a keep-alive connection; reconnect as a client would.
                sock.close()
                sock, buf = _connect(host, port, ctx), bytearray()
                continue
            out.append(time.perf_counter() - start)
    finally:
        sock.close()


def _client_process(args: tuple[str, int, dict[str, str], bytes, int, float, float]) -> list[float]:
    host, port, files, request, connections, start_at, seconds = args
    ctx = ssl.create_default_context(cafile=files["ca"])
    ctx.load_cert_chain(files["cert"], files["key"])
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = time.perf_counter() + seconds
    results: list[list[float]] = [[] for _ in range(connections)]
    threads = [
        threading.Thread(
            target=_connection_loop, args=(host, port, ctx, request, deadline, results[i])
        )
        for i in range(connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for r in results for x in r]


def _run_case(
    pool: Any,
    server_pid: int,
    host: str,
    port: int,
    files: dict[str, str],
    request: bytes,
    conns: int,
    seconds: float,
) -> dict[str, float]:
    processes = min(conns, CLIENT_PROCESSES)
    per_process = [
        conns // processes + (1 if i < conns % processes else 0) for i in range(processes)
    ]
    start_at = time.time() + 0.5
    cpu_before = _ticks(server_pid)
    latencies_lists = pool.map(
        _client_process, [(host, port, files, request, n, start_at, seconds) for n in per_process]
    )
    cpu = _ticks(server_pid) - cpu_before
    latencies = sorted(x for lst in latencies_lists for x in lst)
    count = len(latencies)
    return {
        "rps": round(count / seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[min(count - 1, int(count * 0.99))] * 1000, 3),
        "server_cpu_us_per_req": round(cpu / count * 1e6, 1),
        "requests": count,
    }


def _setup(url: str, ca: str, token: str, hostname: str) -> dict[str, str]:
    ctx = ssl.create_default_context(cafile=ca)
    auth = {"Authorization": "0u" + token}
    grant = json.dumps({"type": "Machine", "id": hostname, "access": "Read"})
    hashes: dict[str, str] = {}
    with httpx.Client(base_url=url, verify=ctx, headers=auth, timeout=10) as client:
        for key_id in ["bench:key"] + [f"bench:k{i:03d}" for i in range(100)]:
            data = base64.b64encode(os.urandom(64)).decode()
            client.post("/v0/keys/", data={"id": key_id, "data": data}).raise_for_status()
            client.put(f"/v0/keys/{key_id}/access/", data={"access": grant}).raise_for_status()
            hashes[key_id] = client.get(f"/v0/keys/{key_id}/").json()["data"]["hash"]
    return hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "knox_server.cli",
                "dev",
                "--state-dir",
                tmp,
                "--listen",
                "127.0.0.1:0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert server.stdout is not None
            info = json.loads(server.stdout.readline())
            token = Path(info["tokens"]["admin"]).read_text().strip()
            hostname = socket.gethostname()
            hashes = _setup(info["url"], info["ca"], token, hostname)
            host, port = info["url"].removeprefix("https://").rsplit(":", 1)
            files = {
                "ca": info["ca"],
                "cert": info["certs"]["host"][0],
                "key": info["certs"]["host"][1],
            }
            head = (
                f"Host: {host}:{port}\r\nAuthorization: 0t{hostname}\r\n"
                "User-Agent: knox-bench\r\n\r\n"
            )
            get = f"GET /v0/keys/bench:key/ HTTP/1.1\r\n{head}".encode()
            query = "&".join(f"{k}={v}" for k, v in hashes.items() if k != "bench:key")
            changes = f"GET /v0/keys/?{query} HTTP/1.1\r\n{head}".encode()
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(CLIENT_PROCESSES) as pool:
                results = {
                    "get_1": _run_case(
                        pool, server.pid, host, int(port), files, get, 1, args.seconds
                    ),
                    "get_16": _run_case(
                        pool, server.pid, host, int(port), files, get, 16, args.seconds
                    ),
                    "changes_100_16": _run_case(
                        pool, server.pid, host, int(port), files, changes, 16, args.seconds
                    ),
                }
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    if args.json:
        print(
            json.dumps(
                {k: {m: v[m] for m in ("rps", "p50_ms", "p99_ms")} for k, v in results.items()}
            )
        )
        return
    print(
        f"knox_server, 1 worker, mTLS keep-alive, {args.seconds:.0f} s per case, "
        f"{os.cpu_count()} cpus"
    )
    print(f"{'case':<16}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'srv CPU us/req':>16}")
    for name, r in results.items():
        print(
            f"{name:<16}{r['rps']:>10}{r['p50_ms']:>10}{r['p99_ms']:>10}{r['server_cpu_us_per_req']:>16}"
        )


if __name__ == "__main__":
    main()
