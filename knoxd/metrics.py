"""knoxd's Prometheus metrics, served over plain HTTP on ``[daemon] metrics_listen`` (opt-in).

Nothing is counted on the request path but the socket server's own tally of answered requests
(``ServerState.answered``): every figure is read from the daemon's live state when a scrape asks.

====================================================  =======  ====================================
metric                                                type     meaning
====================================================  =======  ====================================
``knoxd_requests_total{op,result}``                   counter  socket requests answered; ``result``
                                                               is ``ok`` or the error code, ``op``
                                                               is ``invalid`` for a message naming
                                                               no known op
``knoxd_cache_hits_total``                            counter  ``get`` answered with a cached value
``knoxd_cache_misses_total``                          counter  ``get`` the cache could not answer
                                                               (not registered or not fetched yet,
                                                               refused upstream, too stale, that
                                                               version not cached)
``knoxd_cache_entries{identity}``                     gauge    keys cached
``knoxd_cache_stale_entries{identity}``               gauge    of those, stale (last refresh
                                                               failed, or not confirmed for
                                                               ``revalidate_seconds``)
``knoxd_cache_max_age_seconds{identity}``             gauge    the oldest confirmation's age (0
                                                               with nothing cached)
``knoxd_registered_keys{identity}``                   gauge    keys kept fresh
``knoxd_upstream_ok{identity}``                       gauge    1 while the upstream answers, else 0
``knoxd_upstream_requests_total{identity,result}``    counter  change checks and key fetches sent
                                                               (``ok``: answered; ``error``: not)
``knoxd_upstream_last_refresh_timestamp_seconds``     gauge    unix time of the last step the
``{identity}``                                                 upstream answered (absent before)
``knoxd_connections``                                 gauge    socket connections open
====================================================  =======  ====================================

Identity names come from the configuration, so labels stay bounded; no label or value holds a key
id. Each :class:`DaemonMetrics` has a ``CollectorRegistry`` of its own.

The endpoint (:func:`serve_metrics`) answers ``GET /metrics`` (404 for other paths, 405 for other
methods), one request per connection, at most :data:`MAX_CONNECTIONS` at once, each within
:data:`REQUEST_TIMEOUT_SECONDS`. It is not authenticated: keep it on loopback or the Unix socket.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import h11
import structlog
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from knox.protocol import ErrorCode
from knoxd.cache.view import CacheView
from knoxd.config import Config
from knoxd.fetch import FetchRequester
from knoxd.socket_api.handler import ServerState
from knoxd.socket_api.listener import ListenerError, bind_unix

__all__ = [
    "MAX_CONNECTIONS",
    "REQUEST_TIMEOUT_SECONDS",
    "DaemonMetrics",
    "respond",
    "serve_metrics",
]

log = structlog.get_logger("knoxd.metrics")

MAX_CONNECTIONS = 16
REQUEST_TIMEOUT_SECONDS = 10.0
_MAX_REQUEST_BYTES = 16 * 1024
_RECV = 16 * 1024
_SOCKET_MODE = 0o666
_DIR_MODE = 0o755
_OPENMETRICS = "application/openmetrics-text; version=1.0.0"
# The results of a get that found no usable cached value.
_MISSES = frozenset(
    {
        ErrorCode.NOT_REGISTERED,
        ErrorCode.NOT_READY,
        ErrorCode.NOT_FOUND,
        ErrorCode.FORBIDDEN,
        ErrorCode.UPSTREAM_UNAVAILABLE,
        ErrorCode.STALE,
    }
)


class DaemonMetrics:
    """The daemon's figures, read from its cache view, its upstream side and its socket server
    at each scrape. Only the trio thread may scrape."""

    def __init__(
        self, config: Config, view: CacheView, fetcher: FetchRequester, sockets: ServerState
    ) -> None:
        self._identities = [i.name for i in config.identities]
        self._view = view
        self._fetcher = fetcher
        self._sockets = sockets
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now (the registry calls this at each scrape)."""
        yield from self._requests()
        yield from self._cache()
        yield from self._upstream()
        yield GaugeMetricFamily(
            "knoxd_connections", "Socket connections open.", self._sockets.connections
        )

    def _requests(self) -> Iterator[Metric]:
        answered = self._sockets.answered
        requests = CounterMetricFamily(
            "knoxd_requests",
            "Socket requests answered, by op and result (ok or the error code).",
            labels=["op", "result"],
        )
        hits = misses = 0
        for (op, result), count in sorted(answered.items()):
            requests.add_metric([op, result], count)
            if op == "get" and result == "ok":
                hits += count
            elif op == "get" and result in _MISSES:
                misses += count
        yield requests
        yield CounterMetricFamily("knoxd_cache_hits", "Gets answered from the cache.", hits)
        yield CounterMetricFamily(
            "knoxd_cache_misses", "Gets the cache had no usable value for.", misses
        )

    def _cache(self) -> Iterator[Metric]:
        sockets = self._sockets
        now = sockets.clock()
        entries = dict.fromkeys(self._identities, 0)
        stale = dict.fromkeys(self._identities, 0)
        oldest_ms = dict.fromkeys(self._identities, 0)
        for entry in self._view.entries():
            name = entry.identity
            age_ms = sockets.age_ms(entry, now)
            entries[name] = entries.get(name, 0) + 1
            stale[name] = stale.get(name, 0) + sockets.is_stale(entry, age_ms)
            oldest_ms[name] = max(oldest_ms.get(name, 0), age_ms)
        yield _by_identity("knoxd_cache_entries", "Keys cached.", entries)
        yield _by_identity(
            "knoxd_cache_stale_entries",
            "Cached keys that are stale (last refresh failed, or not confirmed upstream for "
            "revalidate_seconds).",
            stale,
        )
        yield _by_identity(
            "knoxd_cache_max_age_seconds",
            "Seconds since the oldest cached key was last confirmed upstream.",
            {name: ms / 1000 for name, ms in oldest_ms.items()},
        )

    def _upstream(self) -> Iterator[Metric]:
        statuses = self._fetcher.status()
        yield _by_identity(
            "knoxd_registered_keys", "Keys kept fresh.", {s.name: s.keys for s in statuses}
        )
        yield _by_identity(
            "knoxd_upstream_ok",
            "1 while the upstream answers, else 0.",
            {s.name: 1 if s.upstream_ok else 0 for s in statuses},
        )
        requests = CounterMetricFamily(
            "knoxd_upstream_requests",
            "Upstream requests (change checks and key fetches) by identity and result.",
            labels=["identity", "result"],
        )
        for s in sorted(statuses, key=lambda s: s.name):
            requests.add_metric([s.name, "ok"], s.requests_answered)
            requests.add_metric([s.name, "error"], s.requests_failed)
        yield requests
        yield _by_identity(
            "knoxd_upstream_last_refresh_timestamp_seconds",
            "Unix time of the last refresh step the upstream answered.",
            {s.name: s.last_refresh_at for s in statuses if s.last_refresh_at is not None},
        )


def _by_identity(name: str, documentation: str, values: Mapping[str, float]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=["identity"])
    for identity, value in sorted(values.items()):
        family.add_metric([identity], value)
    return family


def respond(
    method: bytes, target: bytes, accept: str, registry: CollectorRegistry
) -> tuple[int, list[tuple[str, str]], bytes]:
    """The status, headers and body answering one request (pure but for the scrape): the
    metrics for ``GET /metrics`` (OpenMetrics 1.0.0 if ``accept`` names it, else the Prometheus
    text format 0.0.4), 404 for another path, 405 for another method."""
    path = target.partition(b"?")[0]
    if path != b"/metrics":
        return 404, [("content-type", "text/plain")], b"not found; try /metrics\n"
    if method != b"GET":
        return 405, [("allow", "GET")], b""
    # Only the media type is looked for: the header's parameters are never parsed (the library's
    # parser raises on some) nor echoed.
    encoder, content_type = choose_encoder(
        _OPENMETRICS if "application/openmetrics-text" in accept else ""
    )
    return 200, [("content-type", content_type)], encoder(registry)


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_RECV))
            continue
        return event if isinstance(event, h11.Request) else None


async def _answer(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_BYTES)
    try:
        request = await _read_request(stream, conn)
        if request is None:
            return
        accept = b",".join(v for k, v in request.headers if k == b"accept").decode("latin-1")
        status, headers, body = respond(request.method, request.target, accept, registry)
        headers = [*headers, ("content-length", str(len(body))), ("connection", "close")]
        await stream.send_all(
            conn.send(h11.Response(status_code=status, headers=headers))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
    except h11.RemoteProtocolError:
        # Not HTTP, or a request over the size limit: nothing worth answering.
        return


def _listeners(where: tuple[str, int] | Path) -> list[trio.SocketListener]:
    """Bound, listening sockets for ``where``. Raises :class:`ListenerError`."""
    if isinstance(where, Path):
        try:
            where.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise ListenerError(f"cannot create {where.parent}: {exc.strerror or exc}") from None
        sock = bind_unix(where, mode=_SOCKET_MODE)
        return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
    host, port = where
    made: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, proto)
            made.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(MAX_CONNECTIONS)
    except OSError as exc:
        for sock in made:
            sock.close()
        raise ListenerError(
            f"cannot listen on {host}:{port} for metrics: {exc.strerror or exc}"
        ) from None
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in made]


def _address(listener: trio.SocketListener) -> str:
    name = listener.socket.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_metrics(
    config: Config,
    registry: CollectorRegistry,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``registry`` on ``config.daemon.metrics_listen`` until cancelled.

    ``task_status.started`` receives the bound addresses (``"127.0.0.1:9102"``,
    ``"unix:/run/knoxd-metrics/metrics.sock"``; empty, and this returns at once, when
    ``metrics_listen`` is not set). Raises :class:`ListenerError` before that if the address
    cannot be bound.
    """
    where = config.daemon.metrics_listen
    if where is None:
        task_status.started([])
        return
    listeners = _listeners(where)
    active = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        async with stream:
            if active >= MAX_CONNECTIONS:
                return
            active += 1
            try:
                with trio.move_on_after(REQUEST_TIMEOUT_SECONDS):
                    await _answer(stream, registry)
            except trio.BrokenResourceError:
                # The scraper went away: nothing to answer.
                return
            except Exception:
                # A bug here must cost one scrape, never the daemon.
                log.exception("metrics request failed")
            finally:
                active -= 1

    try:
        addresses = [_address(listener) for listener in listeners]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, listeners)
            log.info("serving metrics", addresses=addresses)
            task_status.started(addresses)
    finally:
        for listener in listeners:
            listener.socket.close()
