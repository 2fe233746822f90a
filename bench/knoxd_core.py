"""knoxd core figures: upstream requests per refresh cycle, and the daemon's memory per cached key.

1. **Requests per cycle.** A dev ``knox_server`` (in this process) holds ``--keys`` keys (default
   1,000) that the host identity may read; knoxd's root (:func:`knoxd.daemon.run_daemon`, in this
   process) registers all of them with ``refresh_seconds = --refresh``. Once every key is cached,
   nothing changes upstream for ``--window`` seconds, and the server's audit log (one record per
   request) is read back: the host identity's requests are grouped into cycles (bursts separated by
   more than half the refresh interval) and counted by route. ``getkeys`` and ``postchanges``
   are change checks, ``getkey`` a key fetch (none expected when nothing changed).
2. **RSS.** ``python -m knoxd`` as a child process whose cache file holds ``--cached`` keys
   (default 10,000) of 1 KiB each (one Primary version), registered for the host identity, with
   its upstream unreachable (so it serves from the cache and records the error on every key).
   ``VmRSS`` and ``VmHWM`` from ``/proc/<pid>/status`` once it has started and failed its first
   check, next to the same daemon with an empty cache.

Usage: ``python bench/knoxd_core.py [--keys 1000] [--window 5] [--refresh 1] [--cached 10000]
[--json]``. Bounded: about 20 s + window with the defaults.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from knox.http_client import KnoxHTTPClient, change_check_requests, ssl_context_for
from knox.model import Access, AccessType, Key, KeyVersion, PrincipalType, VersionStatus
from knox.model import version_hash as compute_hash
from knox_server.dev import prepare_dev_state, write_dev_outputs
from knox_server.main import run_server
from knoxd.cache.cache_key import load_cache_key
from knoxd.cache.entry import CacheEntry
from knoxd.cache.rows import seal_entry
from knoxd.cache.store import CacheStore
from knoxd.config import Config, load_config
from knoxd.daemon import DaemonContext, run_daemon

REPO = Path(__file__).resolve().parent.parent
KEY_DATA = 1024


def key_ids(count: int) -> list[str]:
    return [f"svc{i:05d}:db_password" for i in range(count)]


def audit_time(text: str) -> float:
    # RFC 3339 with nanoseconds: keep microseconds for fromisoformat.
    head, _, frac = text.rstrip("Z").partition(".")
    return dt.datetime.fromisoformat(f"{head}.{frac[:6]:0<6}+00:00").timestamp()


def cycles_from_audit(path: Path, principal: str, since: float, gap: float) -> dict[str, Any]:
    times: list[tuple[float, str]] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            at = audit_time(record["time"])
            if record.get("principal") == principal and at >= since:
                times.append((at, record["route"]))
    times.sort()
    bursts: list[list[str]] = []
    last = -1e18
    for at, route in times:
        if at - last > gap:
            bursts.append([])
        bursts[-1].append(route)
        last = at
    # The first and last bursts may be cut by the window's edges.
    whole = bursts[1:-1] if len(bursts) > 2 else bursts
    per_cycle = [len(b) for b in whole]
    return {
        "cycles": len(whole),
        "requests_per_cycle": per_cycle,
        "change_checks_per_cycle": [b.count("getkeys") + b.count("postchanges") for b in whole],
        "getkey_total": sum(b.count("getkey") for b in whole),
    }


async def requests_per_cycle(count: int, window: float, refresh: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="knoxd-bench-") as tmp:
        state = prepare_dev_state(Path(tmp) / "server")
        server_config = state.server_config("127.0.0.1:0", knox_compat=False)
        async with trio.open_nursery() as nursery:
            urls: list[str] = await nursery.start(
                lambda task_status: run_server(server_config, task_status=task_status)
            )
            info = write_dev_outputs(state, urls[0])
            admin_token = (await trio.Path(info["tokens"]["admin"]).read_text()).strip()
            reads = Access(PrincipalType.MACHINE, state.hostname, AccessType.READ)
            ids = key_ids(count)
            started = time.monotonic()
            async with KnoxHTTPClient(
                urls[0], auth="0u" + admin_token, ssl_context=ssl_context_for(state.pki.ca)
            ) as admin:
                limiter = trio.CapacityLimiter(8)

                async def create(key_id: str) -> None:
                    async with limiter:
                        await admin.create_key(key_id, os.urandom(64), [reads])

                async with trio.open_nursery() as creators:
                    for key_id in ids:
                        creators.start_soon(create, key_id)
            created_in = time.monotonic() - started
            base = load_config(Path(info["knoxd_config"]))
            host = replace(base.identities[0], keys=tuple(ids))
            config = Config(
                replace(base.daemon, refresh_seconds=refresh, revalidate_seconds=3600.0),
                base.upstream,
                (host,),
            )
            context: DaemonContext = await nursery.start(
                lambda task_status: run_daemon(config, environ={}, task_status=task_status)
            )
            started = time.monotonic()
            with trio.fail_after(120):
                while True:
                    if len(context.view) == count:
                        break
                    await trio.sleep(0.05)
            cached_in = time.monotonic() - started
            since = time.time()
            await trio.sleep(window)
            nursery.cancel_scope.cancel()
        hashes = {e.key_id: e.hash for e in context.view.entries()}
        figures = cycles_from_audit(
            state.directory / "audit.jsonl", state.hostname, since, refresh / 2
        )
    figures.update(
        keys=count,
        refresh_seconds=refresh,
        window_seconds=window,
        change_check_chunks=len(change_check_requests(hashes)),
        create_seconds=round(created_in, 2),
        first_fetch_seconds=round(cached_in, 2),
    )
    return figures


# --- RSS -------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def fill_cache(config: Config, count: int) -> None:
    """Write ``count`` entries and registrations for the first identity in one transaction."""
    state_dir = config.daemon.state_dir
    cache_key = load_cache_key(state_dir, {})
    async with await CacheStore.open(state_dir, cache_key) as store:
        path = store.path
    identity = config.identities[0].name
    aead = AESGCM(cache_key.key)
    rows = []
    for i, key_id in enumerate(key_ids(count)):
        versions = (KeyVersion(i + 1, os.urandom(KEY_DATA), VersionStatus.PRIMARY, 1),)
        key = Key(key_id, (), versions, compute_hash(versions))
        entry = CacheEntry(identity, key, key.hash, time.time())
        rows.append((identity, key_id, seal_entry(aead, entry)))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO keys (identity, key_id, sealed) VALUES (?, ?, ?)", rows)
        conn.executemany(
            "INSERT INTO registrations (identity, key_id) VALUES (?, ?)",
            [(identity, key_id) for identity, key_id, _ in rows],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def daemon_rss(config_path: Path, settle: float) -> dict[str, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "knoxd", "--config", str(config_path)],
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert process.stderr is not None
    try:
        deadline = time.monotonic() + 60
        for line in process.stderr:
            if b'"knoxd started"' in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("knoxd did not start")
        time.sleep(settle)
        return {
            "vm_rss_kib": status_kib(process.pid, "VmRSS"),
            "vm_hwm_kib": status_kib(process.pid, "VmHWM"),
        }
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        process.stderr.close()


async def rss(count: int) -> dict[str, Any]:
    results: dict[str, Any] = {"cached_keys": count, "key_bytes": KEY_DATA}
    with tempfile.TemporaryDirectory(prefix="knoxd-bench-") as tmp:
        state = prepare_dev_state(Path(tmp) / "server")
        info = write_dev_outputs(state, f"https://127.0.0.1:{closed_port()}")
        config_path = Path(info["knoxd_config"])
        config = load_config(config_path)
        results["empty"] = await trio.to_thread.run_sync(daemon_rss, config_path, 2.0)
        started = time.monotonic()
        await fill_cache(config, count)
        results["fill_seconds"] = round(time.monotonic() - started, 2)
        results["full"] = await trio.to_thread.run_sync(daemon_rss, config_path, 2.0)
    per_key = (results["full"]["vm_rss_kib"] - results["empty"]["vm_rss_kib"]) * 1024 / count
    results["rss_bytes_per_key"] = round(per_key)
    return results


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "requests_per_cycle": await requests_per_cycle(args.keys, args.window, args.refresh),
        "rss": await rss(args.cached),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--refresh", type=float, default=1.0)
    parser.add_argument("--cached", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = trio.run(main_async, args)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    cycle = figures["requests_per_cycle"]
    memory = figures["rss"]
    print(f"## knoxd core ({os.cpu_count()} CPUs, Python {sys.version.split()[0]})")
    print()
    print(f"Upstream requests per refresh cycle, {cycle['keys']} registered keys, nothing changed")
    print(f"  cycles observed in {cycle['window_seconds']} s: {cycle['cycles']}")
    print(f"  requests per cycle: {cycle['requests_per_cycle']} (goal: 1)")
    print(f"  of which change checks: {cycle['change_checks_per_cycle']}")
    print(f"  key fetches in the window: {cycle['getkey_total']}")
    print(f"  change-check chunks for these ids (URL limit): {cycle['change_check_chunks']}")
    print(
        f"  (setup: {cycle['create_seconds']} s to create, first fetch of all keys "
        f"{cycle['first_fetch_seconds']} s)"
    )
    print()
    print(f"knoxd RSS, {memory['cached_keys']} cached keys of {memory['key_bytes']} B")
    print(
        f"  empty cache: VmRSS {memory['empty']['vm_rss_kib']} KiB "
        f"(peak {memory['empty']['vm_hwm_kib']} KiB)"
    )
    print(
        f"  full cache:  VmRSS {memory['full']['vm_rss_kib']} KiB "
        f"(peak {memory['full']['vm_hwm_kib']} KiB)"
    )
    print(f"  difference per cached key: {memory['rss_bytes_per_key']} B")


if __name__ == "__main__":
    main()
