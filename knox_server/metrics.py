"""The server's Prometheus metrics, served by the app at ``GET /metrics``.

Each :class:`ServerMetrics` has a ``CollectorRegistry`` of its own (never prometheus-client's
global one), so that several apps in one process (tests, workers) never mix their figures. The
request path pays a dictionary update and a bisect per request; everything else is read from the
live objects when a scrape asks:

=====================================  =========  ===========================================
metric                                 type       meaning
=====================================  =========  ===========================================
``knox_server_requests_total``         counter    requests answered, by ``route`` (the audit
                                                  record's route id: ``getkey``, ``404``, …)
                                                  and ``code`` (the v0 code; ``none`` for a
                                                  405, which has none)
``knox_server_request_seconds``        histogram  time from the request's arrival to its
                                                  audit record, by ``route`` (a held
                                                  long-poll counts its whole wait)
``knox_server_longpolls_held``         gauge      change checks held open now
``knox_server_audit_records_total``    counter    audit records written
``knox_server_audit_records_lost_``    counter    audit records the sink failed to write
``total``
=====================================  =========  ===========================================

Labels take only bounded values (route ids and codes): never a key id, a principal or a path.
``/metrics`` and ``/healthz`` requests are not counted (they have no audit record either).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from knox_server.audit import AuditLog
from knox_server.changes import ChangeHub

__all__ = ["LATENCY_BUCKETS", "ServerMetrics"]

#: Upper bounds (seconds) of the latency histogram's buckets; a long-poll lasts up to 60 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)
_BUCKET_LABELS = [str(bound) for bound in LATENCY_BUCKETS]
_OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class _Latency:
    """One route's histogram: a count per bucket (the last one past every bound), and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket ("le").
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        cumulative: list[tuple[str, float]] = []
        running = 0
        for label, count in zip([*_BUCKET_LABELS, "+Inf"], self.counts, strict=True):
            running += count
            cumulative.append((label, running))
        return cumulative


class ServerMetrics:
    """One server's metrics over its change hub and audit log.

    Call :meth:`request_done` once per request, right after its audit record was emitted;
    :meth:`render` gives a scrape's answer. Only the trio thread may call either.
    """

    def __init__(self, *, hub: ChangeHub, audit: AuditLog) -> None:
        self._hub = hub
        self._audit = audit
        self._requests: dict[tuple[str, str], int] = {}
        self._latency: dict[str, _Latency] = {}
        self._audit_written = 0
        self._audit_lost = 0
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def request_done(self, route: str, code: int | None, seconds: float) -> None:
        """Count a request answered with ``code`` after ``seconds``, and whether its audit record
        was written (``AuditLog.lost`` is 0 exactly when the last emit succeeded)."""
        key = (route, "none" if code is None else str(code))
        self._requests[key] = self._requests.get(key, 0) + 1
        latency = self._latency.get(route)
        if latency is None:
            latency = self._latency[route] = _Latency()
        latency.observe(seconds)
        if self._audit.lost:
            self._audit_lost += 1
        else:
            self._audit_written += 1

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now (the registry calls this at each scrape)."""
        requests = CounterMetricFamily(
            "knox_server_requests",
            "Requests answered, by route id and v0 response code.",
            labels=["route", "code"],
        )
        for (route, code), count in sorted(self._requests.items()):
            requests.add_metric([route, code], count)
        yield requests
        seconds = HistogramMetricFamily(
            "knox_server_request_seconds",
            "Time from a request's arrival to its answer, by route id.",
            labels=["route"],
        )
        for route, latency in sorted(self._latency.items()):
            seconds.add_metric([route], latency.buckets(), latency.total)
        yield seconds
        yield GaugeMetricFamily(
            "knox_server_longpolls_held", "Change checks held open now.", self._hub.waiting
        )
        yield CounterMetricFamily(
            "knox_server_audit_records", "Audit records written.", self._audit_written
        )
        yield CounterMetricFamily(
            "knox_server_audit_records_lost",
            "Audit records that could not be written.",
            self._audit_lost,
        )

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for a scrape with this ``Accept`` header: OpenMetrics 1.0.0 if it names
        OpenMetrics, else the Prometheus text format 0.0.4. Returns the body and its content
        type. Only the media type is looked for: the header's parameters are never parsed (the
        library's parser raises on some) nor echoed."""
        wanted = _OPENMETRICS if "application/openmetrics-text" in accept else ""
        encoder, content_type = choose_encoder(wanted)
        return encoder(self.registry), content_type
