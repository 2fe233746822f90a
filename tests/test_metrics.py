"""Prometheus metrics: the server's ``GET /metrics`` and knoxd's opt-in endpoint, scraped for real.

Every scrape goes over the real transport (TLS to the dev server, a Unix socket or TCP to knoxd)
with httpx and, where it is installed, curl, and is read with prometheus-client's own parser. The
figures must match what the test did, and no key id or secret may appear anywhere in the text.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import structlog
import trio
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from knox.client import AsyncClient, NotRegisteredError
from knox.errors import KeyNotFoundError
from knox.http_client import KnoxHTTPClient, ssl_context_for
from knox.model import Access, AccessType, PrincipalType
from knox_server.app import AppSettings, create_app
from knox_server.audit import AuditLog, AuditRecord, FileSink
from knox_server.auth import Authenticator
from knox_server.changes import ChangeHub
from knox_server.config import ConfigError, parse_config
from knox_server.crypto import MasterKeyring
from knox_server.dev import prepare_dev_state
from knox_server.main import open_store
from knox_server.metrics import ServerMetrics
from knox_server.serve import ServeSettings, serve
from knox_server.tokens import TokenDB
from knoxd.config import Config as KnoxdConfig
from knoxd.config import ConfigError as KnoxdConfigError
from knoxd.config import load_config
from knoxd.config import parse_config as parse_knoxd_config
from knoxd.metrics import serve_metrics
from knoxd.socket_api.listener import ListenerError
from tests.knoxd_process import NotifySocket, knoxd_argv, knoxd_environ, knoxd_process
from tests.server_fixtures import DevServer, dev_server

WAIT = 20
KEY = "app:metrics_secret_id"
SECRET = b"never-in-metrics"
CURL = shutil.which("curl")
SCRAPERS = [
    "httpx",
    pytest.param("curl", marks=pytest.mark.skipif(CURL is None, reason="curl is not installed")),
]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels (the parser rejects malformed text)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def scrape(scraper: str, url: str, *, ca: Path | None = None, uds: Path | None = None) -> str:
    """The body of ``GET url`` as ``scraper`` fetches it."""
    with trio.fail_after(WAIT):
        if scraper == "curl":
            assert CURL is not None
            argv = [CURL, "--silent", "--show-error", "--fail", "--max-time", str(WAIT)]
            if ca is not None:
                argv += ["--cacert", str(ca)]
            if uds is not None:
                argv += ["--unix-socket", str(uds)]
            done = await trio.run_process([*argv, url], capture_stdout=True)
            return done.stdout.decode()
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca)) if ca is not None else False
        )
        transport = httpx.AsyncHTTPTransport(uds=str(uds), verify=verify) if uds else None
        async with httpx.AsyncClient(verify=verify, transport=transport) as client:
            reply = await client.get(url)
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
        return reply.text


# What scrapers send (Prometheus asks for OpenMetrics first), and versions the library cannot read.
ACCEPT_HEADERS = [
    "*/*",
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/openmetrics-text; version=abc",
    "text/plain; version=abc",
    "text/plain; version=1.0.0\u00e9",
]


# The OpenMetrics parser has no annotations; this is its documented signature.
openmetrics_families: Callable[[str], Iterator[Metric]] = (
    openmetrics_parser.text_string_to_metric_families
)


def assert_exposition(accept: str, content_type: str, text: str) -> None:
    """``text`` is OpenMetrics 1.0.0 if ``accept`` names it, else the text format 0.0.4."""
    if "openmetrics" in accept:
        assert content_type.startswith("application/openmetrics-text; version=1.0.0;")
        assert list(openmetrics_families(text))
    else:
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        assert parse(text)


def assert_no_secrets(text: str, *secrets: str) -> None:
    for secret in (KEY, SECRET.decode(), *secrets):
        assert secret not in text


@asynccontextmanager
async def admin_client(dev: DevServer) -> AsyncIterator[KnoxHTTPClient]:
    async with KnoxHTTPClient(
        dev.url, auth="0u" + dev.admin_token, ssl_context=ssl_context_for(dev.ca)
    ) as client:
        yield client


def host_reads(dev: DevServer) -> Access:
    return Access(PrincipalType.MACHINE, dev.hostname, AccessType.READ)


# --- the server --------------------------------------------------------------------------------


@pytest.mark.parametrize("scraper", SCRAPERS)
async def test_server_metrics_count_requests_by_route_and_code(
    tmp_path: Path, scraper: str
) -> None:
    async with dev_server(tmp_path) as dev, admin_client(dev) as admin:
        await admin.create_key(KEY, SECRET, [host_reads(dev)])
        for _ in range(3):
            assert (await admin.get_key(KEY)).primary.data == SECRET
        with pytest.raises(KeyNotFoundError, match="No such key"):
            await admin.get_key("app:missing_one")
        text = await scrape(scraper, dev.url + "/metrics", ca=dev.ca)
    samples = parse(text)
    requests = "knox_server_requests_total"
    assert value(samples, requests, route="postkeys", code="0") == 1
    assert value(samples, requests, route="getkey", code="0") == 3
    assert value(samples, requests, route="getkey", code="4") == 1
    assert total(samples, requests) == 5
    # Every request is timed, long-polls included; the bucket counts are cumulative.
    assert value(samples, "knox_server_request_seconds_count", route="getkey") == 4
    assert value(samples, "knox_server_request_seconds_bucket", route="getkey", le="+Inf") == 4
    assert value(samples, "knox_server_request_seconds_sum", route="getkey") > 0
    assert value(samples, "knox_server_audit_records_total") == 5
    assert value(samples, "knox_server_audit_records_lost_total") == 0
    assert value(samples, "knox_server_longpolls_held") == 0
    assert_no_secrets(text, "app:missing_one", dev.admin_token)


async def test_a_held_long_poll_shows_until_its_client_leaves(tmp_path: Path) -> None:
    async with dev_server(tmp_path) as dev, admin_client(dev) as admin:
        await admin.create_key(KEY, SECRET, [host_reads(dev)])
        current = (await admin.get_key(KEY)).hash

        async def until_held(count: int) -> None:
            with trio.fail_after(WAIT):
                while True:
                    text = await scrape("httpx", dev.url + "/metrics", ca=dev.ca)
                    if value(parse(text), "knox_server_longpolls_held") == count:
                        return
                    await trio.sleep(0.02)

        async def long_poll() -> None:
            # A client of its own, so that leaving closes the connection the poll is held on.
            context = ssl.create_default_context(cafile=str(dev.ca))
            async with httpx.AsyncClient(verify=context, timeout=WAIT * 2) as client:
                await client.get(
                    f"{dev.url}/v0/keys/?{KEY}={current}",
                    headers={"Authorization": "0u" + dev.admin_token, "Prefer": "wait=60"},
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await until_held(1)
            nursery.cancel_scope.cancel()
        await until_held(0)


async def test_the_metrics_route_answers_only_get_and_can_be_turned_off(tmp_path: Path) -> None:
    state = prepare_dev_state(tmp_path)
    config = state.server_config("127.0.0.1:0", knox_compat=False)
    store = await open_store(config.storage_url)
    audit = AuditLog.to_file(tmp_path / "audit.jsonl")
    tokens = TokenDB.load(state.token_file)
    try:
        for enabled in (True, False):
            app = create_app(
                store=store,
                keyring=MasterKeyring.load(config.master_key_file),
                authenticator=Authenticator(config.client_ca.read_bytes(), tokens),
                audit=audit,
                settings=AppSettings(host="h", metrics=enabled),
            )
            settings = ServeSettings(
                listen=config.listen, cert=config.cert, key=config.key, client_ca=config.client_ca
            )
            async with trio.open_nursery() as nursery:
                urls: list[str] = await nursery.start(serve, app, settings)
                context = ssl.create_default_context(cafile=str(config.client_ca))
                token = state.token_path("admin").read_text().strip()
                admin = {b"authorization": b"0u" + token.encode()}
                async with httpx.AsyncClient(verify=context, timeout=WAIT) as client:
                    posted = await client.post(urls[0] + "/metrics", headers=admin)
                    got = {
                        accept: await client.get(
                            urls[0] + "/metrics",
                            headers={**admin, b"accept": accept.encode("latin-1")},
                        )
                        for accept in ACCEPT_HEADERS
                    }
                nursery.cancel_scope.cancel()
            if enabled:
                assert (posted.status_code, posted.content) == (405, b"")
                for accept, reply in got.items():
                    assert reply.status_code == 200
                    assert_exposition(accept, reply.headers["content-type"], reply.text)
            else:
                # An unknown route, after authentication, as any other.
                for reply in (posted, *got.values()):
                    assert reply.status_code == 404
                    assert reply.json()["code"] == 8
    finally:
        await store.aclose()
        audit.close()


def test_the_server_config_turns_metrics_on_by_default() -> None:
    def server(**extra: object) -> dict[str, object]:
        return {
            "server": {"cert": "c", "key": "k", "client_ca": "ca", "host": "h", **extra},
            "storage": {"url": "sqlite:///k.db", "master_key_file": "m"},
        }

    assert parse_config(server(), Path("/etc")).metrics is True
    assert parse_config(server(metrics=False), Path("/etc")).metrics is False
    with pytest.raises(ConfigError, match=r"server\.metrics: expected true or false"):
        parse_config(server(metrics="no"), Path("/etc"))


def test_audit_records_that_could_not_be_written_are_counted_as_lost(tmp_path: Path) -> None:
    sink = FileSink.open(tmp_path / "audit.jsonl")
    audit = AuditLog(sink)
    metrics = ServerMetrics(hub=ChangeHub(), audit=audit)
    record = AuditRecord(
        ts=0, request_id="r", route="getkey", method="GET", path="/", code=0, status=200
    )
    audit.emit(record)
    metrics.request_done("getkey", 0, 0.001)
    sink.close()
    with structlog.testing.capture_logs():
        for _ in range(2):
            audit.emit(record)
            metrics.request_done("getkey", 0, 0.001)
    body, content_type = metrics.render("")
    assert content_type.startswith("text/plain")
    samples = parse(body.decode())
    assert value(samples, "knox_server_audit_records_total") == 1
    assert value(samples, "knox_server_audit_records_lost_total") == 2
    assert value(samples, "knox_server_requests_total", route="getkey", code="0") == 3


# --- knoxd ------------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for Unix sockets (at most 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="knoxd-metrics-", dir="/tmp") as d:
        yield Path(d)


def metrics_config(dev: DevServer, directory: Path) -> Path:
    """The dev server's knoxd.toml, its sockets in ``directory``, ``KEY`` registered for the
    identity ``host`` and metrics on the Unix socket ``directory/m.sock``."""
    text = dev.knoxd_config.read_text()
    text = text.replace(str(dev.knoxd_config.parent / "knoxd.sock"), str(directory / "w.sock"))
    text = text.replace(
        str(dev.knoxd_config.parent / "admin" / "admin.sock"), str(directory / "a" / "a.sock")
    )
    text = text.replace("keys = []", f'keys = ["{KEY}"]', 1)
    text = text.replace("[daemon]\n", f'[daemon]\nmetrics_listen = "unix:{directory / "m.sock"}"\n')
    config = directory / "knoxd.toml"
    config.write_text(text)
    assert load_config(config).daemon.metrics_listen == directory / "m.sock"
    return config


@pytest.mark.parametrize("scraper", SCRAPERS)
async def test_knoxd_serves_its_metrics_on_a_unix_socket(short_dir: Path, scraper: str) -> None:
    async with dev_server(short_dir / "server") as dev, admin_client(dev) as admin:
        await admin.create_key(KEY, SECRET, [host_reads(dev)])
        config = metrics_config(dev, short_dir)
        log = short_dir / "knoxd.log"
        environ = knoxd_environ(NOTIFY_SOCKET=str(short_dir / "notify"))
        async with (
            NotifySocket(short_dir / "notify") as systemd,
            knoxd_process(knoxd_argv(config), log, environ) as knoxd,
        ):
            await systemd.ready(knoxd, log)
            with trio.fail_after(WAIT):
                async with AsyncClient(short_dir / "w.sock", cache=False) as client:
                    # The first get waits for the first fetch; the next three are cache hits.
                    assert (await client.get(KEY, wait_ms=WAIT * 1000)).primary.data == SECRET
                    for _ in range(3):
                        assert (await client.get(KEY)).primary.data == SECRET
                    with pytest.raises(NotRegisteredError):
                        await client.get("app:not_registered")
                    text = await scrape(
                        scraper, "http://localhost/metrics", uds=short_dir / "m.sock"
                    )
            knoxd.terminate()
            with trio.fail_after(WAIT):
                assert await knoxd.wait() == 0, log.read_text()
    assert os.stat(short_dir / "m.sock").st_mode & 0o777 == 0o666
    samples = parse(text)
    assert value(samples, "knoxd_requests_total", op="get", result="ok") == 4
    assert value(samples, "knoxd_requests_total", op="get", result="not_registered") == 1
    assert total(samples, "knoxd_requests_total") == 5
    assert value(samples, "knoxd_cache_hits_total") == 4
    assert value(samples, "knoxd_cache_misses_total") == 1
    assert value(samples, "knoxd_cache_entries", identity="host") == 1
    assert value(samples, "knoxd_cache_entries", identity="demo") == 0
    assert value(samples, "knoxd_cache_stale_entries", identity="host") == 0
    assert 0 <= value(samples, "knoxd_cache_max_age_seconds", identity="host") < WAIT
    assert value(samples, "knoxd_registered_keys", identity="host") == 1
    assert value(samples, "knoxd_upstream_ok", identity="host") == 1
    # At least the fetch of the key (a new registration is fetched at once), all answered.
    assert value(samples, "knoxd_upstream_requests_total", identity="host", result="ok") >= 1
    assert value(samples, "knoxd_upstream_requests_total", identity="host", result="error") == 0
    assert value(samples, "knoxd_upstream_last_refresh_timestamp_seconds", identity="host") > 0
    # The scraping client's connection is still open.
    assert value(samples, "knoxd_connections") == 1
    assert_no_secrets(text, "app:not_registered")


async def test_knoxd_metrics_endpoint_over_tcp_answers_only_get_metrics() -> None:
    registry = CollectorRegistry()
    Counter("probe", "A counter of the test's own.", registry=registry).inc(3)
    base = knoxd_config()
    config = dataclasses.replace(
        base, daemon=dataclasses.replace(base.daemon, metrics_listen=("127.0.0.1", 0))
    )
    async with trio.open_nursery() as nursery:
        addresses: list[str] = await nursery.start(serve_metrics, config, registry)
        assert len(addresses) == 1 and addresses[0].startswith("127.0.0.1:")
        url = f"http://{addresses[0]}"
        samples = parse(await scrape("httpx", url + "/metrics?x=1"))
        assert value(samples, "probe_total") == 3
        with trio.fail_after(WAIT):
            async with httpx.AsyncClient() as client:
                for accept in ACCEPT_HEADERS:
                    reply = await client.get(
                        url + "/metrics", headers={b"accept": accept.encode("latin-1")}
                    )
                    assert reply.status_code == 200
                    assert_exposition(accept, reply.headers["content-type"], reply.text)
                assert (await client.get(url + "/")).status_code == 404
                posted = await client.post(url + "/metrics")
                assert (posted.status_code, posted.headers["allow"]) == (405, "GET")
            # Not HTTP: closed without an answer, and the endpoint still serves.
            host, port = addresses[0].rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(b"\x00\x01garbage\r\n\r\n")
                assert await stream.receive_some(100) == b""
        assert value(parse(await scrape("httpx", url + "/metrics")), "probe_total") == 3
        nursery.cancel_scope.cancel()


async def test_knoxd_metrics_endpoint_is_off_without_an_address_and_fails_on_a_taken_port() -> None:
    config = knoxd_config()
    assert config.daemon.metrics_listen is None
    async with trio.open_nursery() as nursery:
        assert await nursery.start(serve_metrics, config, CollectorRegistry()) == []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = dataclasses.replace(
            config, daemon=dataclasses.replace(config.daemon, metrics_listen=("127.0.0.1", port))
        )
        with pytest.raises(
            ListenerError, match=rf"cannot listen on 127\.0\.0\.1:{port} for metrics"
        ):
            await serve_metrics(busy, CollectorRegistry())


KNOXD_BASE = """
[upstream]
urls = ["https://knox.example:9000"]
[[identity]]
name = "host"
kind = "machine"
cert = "/etc/knoxd/host.pem"
key = "/etc/knoxd/host.key"
peers.uid = [0]
[daemon]
"""


def knoxd_config() -> KnoxdConfig:
    return parse_knoxd_config(KNOXD_BASE)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ('"127.0.0.1:9102"', ("127.0.0.1", 9102)),
        ('"[::1]:9102"', ("::1", 9102)),
        ('"localhost:9102"', ("localhost", 9102)),
        ('"unix:/run/knoxd/metrics.sock"', Path("/run/knoxd/metrics.sock")),
    ],
)
def test_metrics_listen_takes_an_address_or_a_unix_socket(
    text: str, parsed: tuple[str, int] | Path
) -> None:
    assert (
        parse_knoxd_config(KNOXD_BASE + f"metrics_listen = {text}\n").daemon.metrics_listen
        == parsed
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('"::1:9102"', "expected"),
        ('"knox.example:9102"', "expected"),
        ('"127.0.0.1:0"', "expected"),
        ('"127.0.0.1:99999999999999"', "expected"),
        ('"unix:metrics.sock"', "must be absolute"),
        ('"unix:/run/knoxd/knoxd.sock"', "must differ"),
        ("9102", "expected a string"),
    ],
)
def test_metrics_listen_errors_name_the_key(text: str, problem: str) -> None:
    with pytest.raises(KnoxdConfigError, match=problem) as caught:
        parse_knoxd_config(KNOXD_BASE + f"metrics_listen = {text}\n")
    assert caught.value.key == "daemon.metrics_listen"
