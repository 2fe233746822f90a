"""Rotation propagation: from ``promote`` on the server to the new primary in a watching
application on every host, and the upstream load of an idle fleet.

Setup, all on this machine:

* **PostgreSQL** at ``--dsn`` (default ``$KNOX_TEST_POSTGRES_DSN``, else
  ``postgresql://postgres@127.0.0.1:5432/test``): a fresh schema, dropped at the end. With
  ``--sqlite`` (or when PostgreSQL cannot be reached) one SQLite replica serves instead, and the
  output says so.
* **Two knox-server replicas** (``knox-server serve`` child processes) on that one database, each
  with its change listener and long-poll hub.
* **N knoxd** (``python -m knoxd`` child processes, ``--hosts``), each with its own cache, sockets
  and the dev PKI's machine identity, one key registered, long-poll window ``--refresh`` seconds.
  Host ``i`` lists replica ``i % 2`` first, so half the long-polls are held on the replica that
  does not take the promote (they are woken through PostgreSQL ``NOTIFY``).
* **One watching application per host**: a :class:`knox.client.AsyncClient` watch stream on that
  host's socket, all in this process, recording when each new primary first reaches it.

Method: ``--rotations`` times, a new version is added and every host is let to settle (all apps
have the new version), then after a random pause (so the promote lands anywhere in the fleet's
long-poll cycles) the version is promoted through replica A. The latency of a host is the time
from just before the promote request is sent to its application's event with the new primary.
Then the fleet idles for ``--idle`` seconds and the replicas' audit logs (one record per request)
give the upstream requests per host per second. A revalidation sweep (one GET per key every
600 s) does not fall inside the run.

Usage: ``python bench/propagation.py [--hosts 50] [--rotations 20] [--refresh 10] [--idle 30]
[--sqlite] [--json]``. Bounded: every wait has a timeout (``--timeout`` per rotation); about
2-3 minutes with the defaults on 2 cores. ``--json`` prints one line:
``{"hosts", "rotations", "p50_s", "p99_s", "max_s", "idle_upstream_rps_per_host"}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
import trio

from knox.client import AsyncClient, DaemonError
from knox.http_client import KnoxHTTPClient, ssl_context_for
from knox.model import Access, AccessType, PrincipalType, VersionStatus
from knox.protocol import UpdateEvent
from knox_server.dev import DevState, prepare_dev_state
from knox_server.pg_store import migrate

KEY = "bench:rotating_secret"
START_TIMEOUT = 180.0
SETTLE_TIMEOUT = 60.0


class BenchFailed(Exception):
    """The setup did not come up, or a rotation did not reach every host in time."""


@dataclass
class Host:
    """One knoxd and what its watching application has seen (primary data → trio time)."""

    index: int
    directory: Path
    process: trio.Process | None = None
    seen: dict[bytes, float] = field(default_factory=dict)
    hash: str | None = None

    @property
    def socket(self) -> Path:
        return self.directory / "knoxd.sock"


# --- setup ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def postgres_reachable(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@asynccontextmanager
async def database(dsn: str | None, directory: Path) -> AsyncIterator[str]:
    """A storage URL: a fresh PostgreSQL schema (dropped afterwards), or an SQLite file."""
    if dsn is None:
        yield f"sqlite:///{directory / 'knox.db'}"
        return
    schema = "bench_" + secrets.token_hex(6)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in dsn else "?"
    url = f"{dsn}{separator}options={quote(f'-c search_path={schema}')}"
    try:
        await migrate(url)
        yield url
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def server_toml(state: DevState, directory: Path, url: str, port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "server.toml"
    config.write_text(
        f"""[server]
listen = ["127.0.0.1:{port}"]
cert = "{state.pki.server[0]}"
key = "{state.pki.server[1]}"
client_ca = "{state.pki.ca}"
host = "{directory.name}"

[storage]
url = "{url}"
master_key_file = "{state.master_key_file}"

[auth]
token_file = "{state.token_file}"

[audit]
file = "{directory / "audit.jsonl"}"
""",
        encoding="utf-8",
    )
    return config


def knoxd_toml(state: DevState, host: Host, urls: list[str], refresh: float) -> Path:
    host.directory.mkdir(parents=True, exist_ok=True)
    config = host.directory / "knoxd.toml"
    config.write_text(
        f"""[daemon]
state_dir = "{host.directory / "state"}"
workload_socket = "{host.socket}"
admin_socket = "{host.directory / "admin" / "admin.sock"}"
refresh_seconds = {refresh}
revalidate_seconds = 600

[upstream]
urls = {json.dumps(urls)}
ca = "{state.pki.ca}"

[[identity]]
name = "host"
kind = "machine"
cert = "{state.pki.host[0]}"
key = "{state.pki.host[1]}"
hostname = "{state.hostname}"
keys = ["{KEY}"]
[identity.peers]
uid = [{os.getuid()}]
""",
        encoding="utf-8",
    )
    return config


async def start(command: list[str], log: Path) -> trio.Process:
    with log.open("ab") as out:
        return await trio.lowlevel.open_process(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


async def stop(processes: Sequence[trio.Process]) -> None:
    """SIGTERM all, wait up to 10 s in all, then SIGKILL what is left."""
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    with trio.move_on_after(10):
        for process in processes:
            await process.wait()
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def wait_healthy(url: str, ca: Path, process: trio.Process, log: Path) -> None:
    async with httpx.AsyncClient(verify=ssl_context_for(ca), timeout=5) as client:
        with trio.fail_after(START_TIMEOUT):
            while True:
                if process.returncode is not None:
                    raise BenchFailed(f"knox-server exited at start: see {log}")
                try:
                    if (await client.get(url + "/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)


# --- the watching applications -------------------------------------------------------------------


async def watch(host: Host) -> None:
    """The application of one host: record every primary it is told about (first sighting)."""
    with trio.fail_after(START_TIMEOUT):
        while not host.socket.exists():
            if host.process is not None and host.process.returncode is not None:
                log = host.directory / "knoxd.log"
                raise BenchFailed(f"knoxd {host.index} exited: see {log}")
            await trio.sleep(0.1)
    while True:
        try:
            async with (
                AsyncClient(host.socket, cache=False, timeout=30, reconnect_window=10) as client,
                client.watch([KEY]) as events,
            ):
                async for event in events:
                    if isinstance(event, UpdateEvent):
                        host.seen.setdefault(event.key.primary.data, trio.current_time())
                        host.hash = event.key.hash
        except* DaemonError:
            # A daemon still starting (50 at once on 2 cores): watch again.
            await trio.sleep(0.2)


async def until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``predicate`` (the watch tasks record their own times; this only waits)."""
    with trio.move_on_after(seconds) as scope:
        while not predicate():  # noqa: ASYNC110 (fleet-wide condition: no single event)
            await trio.sleep(0.005)
    if scope.cancelled_caught:
        raise BenchFailed(f"timed out after {seconds:g} s waiting for {what}")


def all_hashed(hosts: Sequence[Host], expected: str) -> bool:
    return all(h.hash == expected for h in hosts)


def all_seen(hosts: Sequence[Host], target: bytes) -> bool:
    return all(target in h.seen for h in hosts)


# --- measurement ---------------------------------------------------------------------------------


def cpu_seconds(processes: Sequence[trio.Process]) -> float:
    """User + system CPU time of the processes so far (from ``/proc/PID/stat``)."""
    ticks = 0
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/stat", encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def audit_time(text: str) -> float:
    head, _, frac = text.rstrip("Z").partition(".")
    return dt.datetime.fromisoformat(f"{head}.{frac[:6]:0<6}+00:00").timestamp()


def host_requests(audits: list[Path], principal: str, since: float, until_: float) -> int:
    count = 0
    for path in audits:
        with path.open(encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if (
                    record.get("principal") == principal
                    and since <= audit_time(record["time"]) <= until_
                ):
                    count += 1
    return count


async def run(args: argparse.Namespace) -> dict[str, object]:
    dsn: str | None = None if args.sqlite else args.dsn
    note = ""
    if dsn is not None and not postgres_reachable(dsn):
        note = "PostgreSQL not reachable: one SQLite replica instead"
        dsn = None
    elif dsn is None:
        note = "--sqlite: one SQLite replica"
    root = Path(tempfile.mkdtemp(prefix="knox-prop-"))
    try:
        return await measure(args, dsn, root, note)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def measure(
    args: argparse.Namespace, dsn: str | None, root: Path, note: str
) -> dict[str, object]:
    load_before = os.getloadavg()[0]
    state = prepare_dev_state(root / "dev")
    admin_token = state.token_path("admin").read_text(encoding="utf-8").strip()
    replicas = 2 if dsn is not None else 1
    progress = sys.stderr
    async with database(dsn, root) as url, AsyncExitStack() as stack:
        servers: list[str] = []
        server_processes: list[trio.Process] = []
        audits: list[Path] = []
        for r in range(replicas):
            directory = root / f"server{r}"
            port = free_port()
            config = server_toml(state, directory, url, port)
            log = directory / "server.log"
            process = await start(
                [sys.executable, "-m", "knox_server.cli", "serve", "--config", str(config)], log
            )
            stack.push_async_callback(stop, [process])
            server_processes.append(process)
            servers.append(f"https://127.0.0.1:{port}")
            audits.append(directory / "audit.jsonl")
            await wait_healthy(servers[-1], state.pki.ca, process, log)
        admin = await stack.enter_async_context(
            KnoxHTTPClient(
                servers[0], auth="0u" + admin_token, ssl_context=ssl_context_for(state.pki.ca)
            )
        )
        await admin.create_key(
            KEY, b"rot-0", [Access(PrincipalType.MACHINE, state.hostname, AccessType.READ)]
        )
        # The floor under any propagation: one GET of the key over TLS keep-alive, here.
        floor: list[float] = []
        for _ in range(20):
            t = time.perf_counter()
            await admin.get_key(KEY)
            floor.append(time.perf_counter() - t)
        floor.sort()

        hosts = [Host(i, root / f"h{i}") for i in range(args.hosts)]
        print(f"starting {len(hosts)} knoxd ...", file=progress, flush=True)
        daemons: list[trio.Process] = []
        stack.push_async_callback(stop, daemons)
        for host in hosts:
            order = servers[host.index % len(servers) :] + servers[: host.index % len(servers)]
            config = knoxd_toml(state, host, order, args.refresh)
            host.process = await start(
                [sys.executable, "-m", "knoxd", "--config", str(config)],
                host.directory / "knoxd.log",
            )
            daemons.append(host.process)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        for host in hosts:
            nursery.start_soon(watch, host)
        await until(partial(all_seen, hosts, b"rot-0"), START_TIMEOUT, "every host's first key")
        print("fleet up; rotating", file=progress, flush=True)

        latencies: list[float] = []
        per_rotation: list[float] = []
        rng = random.Random()
        cpu_before = cpu_seconds(server_processes), cpu_seconds(daemons), time.process_time()
        for rotation in range(1, args.rotations + 1):
            target = f"rot-{rotation}".encode()
            version = await admin.add_version(KEY, target)
            expected = (await admin.get_key(KEY, VersionStatus.ACTIVE)).hash
            await until(
                partial(all_hashed, hosts, expected),
                SETTLE_TIMEOUT,
                f"rotation {rotation}'s new version on every host",
            )
            await trio.sleep(rng.uniform(0.2, 1.0))
            started = trio.current_time()
            await admin.update_version(KEY, version, VersionStatus.PRIMARY)
            await until(
                partial(all_seen, hosts, target),
                args.timeout,
                f"rotation {rotation} on every host",
            )
            these = [h.seen[target] - started for h in hosts]
            latencies.extend(these)
            per_rotation.append(max(these))
            print(
                f"rotation {rotation:2d}: max {max(these) * 1000:7.1f} ms",
                file=progress,
                flush=True,
            )

        cpu_used = (
            cpu_seconds(server_processes) - cpu_before[0],
            cpu_seconds(daemons) - cpu_before[1],
            time.process_time() - cpu_before[2],
        )
        await trio.sleep(1.0)
        idle_from = time.time()
        await trio.sleep(args.idle)
        idle_to = time.time()
        # A request is audited when it ends: a long-poll running across the end lands later.
        await trio.sleep(0.5)
        requests = host_requests(audits, state.hostname, idle_from, idle_to)
        idle_rps = requests / (len(hosts) * (idle_to - idle_from))

    latencies.sort()
    result: dict[str, object] = {
        "hosts": args.hosts,
        "rotations": args.rotations,
        "p50_s": round(percentile(latencies, 50), 4),
        "p99_s": round(percentile(latencies, 99), 4),
        "max_s": round(latencies[-1], 4),
        "idle_upstream_rps_per_host": round(idle_rps, 4),
    }
    if not args.json:
        backend = "PostgreSQL, 2 replicas" if replicas == 2 else "SQLite, 1 replica"
        print(f"backend: {backend}{f' ({note})' if note else ''}")
        print(
            f"hosts: {args.hosts} knoxd + 1 watching app each; long-poll window "
            f"{args.refresh:g} s (jittered down by up to 10 %)"
        )
        print(
            f"cpus: {os.cpu_count()}; load average (1 min) at start {load_before:.1f}, at end "
            f"{os.getloadavg()[0]:.1f} (other work on the machine slows every figure here)"
        )
        print(
            f"floor: one GET of the key over TLS keep-alive from here: p50 "
            f"{percentile(floor, 50) * 1000:.1f} ms, max {floor[-1] * 1000:.1f} ms"
        )
        print(
            f"rotation to every application ({len(latencies)} samples): "
            f"p50 {result['p50_s']} s, p99 {result['p99_s']} s, max {result['max_s']} s "
            "(goal: p99 < 1 s)"
        )
        print("slowest host per rotation (s): " + " ".join(f"{v:.3f}" for v in per_rotation))
        # Each rotation here is two fleet-wide changes: the added version, then the promote.
        per = 1000 / args.rotations
        print(
            f"CPU per rotation (add + promote): servers {cpu_used[0] * per:.0f} ms, all knoxd "
            f"{cpu_used[1] * per:.0f} ms ({cpu_used[1] * per / args.hosts:.1f} ms per host), "
            f"applications {cpu_used[2] * per:.0f} ms; the {os.cpu_count()} cores give "
            f"{(os.cpu_count() or 1) * 1000} ms per second"
        )
        print(
            f"idle upstream: {requests} requests from {args.hosts} hosts in "
            f"{idle_to - idle_from:.1f} s = {idle_rps:.4f} req/s per host "
            f"(goal: at most one per long-poll window, {1 / args.refresh:.4f} req/s at "
            f"{args.refresh:g} s; a plain Knox poller at that interval makes the same count, "
            "but its changes wait up to the interval)"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--refresh", type=float, default=10.0, help="knoxd long-poll window (s)")
    parser.add_argument("--idle", type=float, default=30.0, help="idle measurement (s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per rotation (s)")
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "KNOX_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--sqlite", action="store_true", help="one SQLite replica, no PostgreSQL")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.hosts < 1 or args.rotations < 1 or args.refresh < 1:
        parser.error("--hosts, --rotations and --refresh must be at least 1")
    try:
        result = trio.run(run, args)
    except* BenchFailed as failed:
        for reason in failed.exceptions:
            print(f"propagation: {reason}", file=sys.stderr)
        sys.exit(1)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
