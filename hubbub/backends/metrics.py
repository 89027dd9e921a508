"""``GET /metrics`` in the Prometheus text format, through prometheus-client.

The core only counts (``Server.metrics``, ``Server.stats``), in plain integers; this reads those
counts at scrape time and adds what only the shell sees: store and broker latency and the broker's
queue. The latencies, too, are plain counts per bucket (``Latency``): nothing on the hot path takes
a lock, and prometheus-client (about 3 MB of memory with what it imports) is loaded only when
someone first scrapes. Each server gets its own registry: two servers in one process never share
a metric.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from hubbub import core

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the latency histogram's buckets."""


class Latency:
    """One backend operation's latency histogram: counts per bucket, the sum, and nothing else."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one: over the largest bound
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


def _families(backends: Any, latencies: Mapping[tuple[str, str], Latency]) -> Iterator[Any]:
    """Every metric, as prometheus-client's metric families (imported by ``render``, at scrape time)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    yield from _core_families(backends, CounterMetricFamily, GaugeMetricFamily)
    histogram = HistogramMetricFamily(
        "hubbub_backend_seconds", "time of one store or broker operation (a batch)", labels=["backend", "op"]
    )
    for (backend, op), latency in sorted(latencies.items()):
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], latency.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        histogram.add_metric([backend, op], buckets, latency.total)
    yield histogram


def _core_families(backends: Any, CounterMetricFamily: Any, GaugeMetricFamily: Any) -> Iterator[Any]:
    """The core's counters, and the shell's and backends' own."""
    server = backends.server
    broker = backends.broker
    m = server.metrics
    stats = server.stats()
    open_conns = GaugeMetricFamily("hubbub_connections", "open WebSocket connections", labels=["route"])
    for route, n in sorted(stats["routes"].items()):
        open_conns.add_metric([route], n)
    yield open_conns
    yield GaugeMetricFamily("hubbub_rooms", "rooms with members on this instance", value=stats["rooms"])
    yield GaugeMetricFamily("hubbub_instances", "instances seen through the broker, this one included",
                            value=stats["instances"])
    messages = CounterMetricFamily("hubbub_messages_received", "messages received from clients",
                                   labels=["route"])
    for route, n in sorted(m.messages_in.items()):
        messages.add_metric([route], n)
    yield messages
    yield CounterMetricFamily("hubbub_deliveries", "messages queued to recipients by broadcasts",
                              value=m.deliveries)
    yield CounterMetricFamily("hubbub_received_bytes", "bytes received from clients", value=m.bytes_in)
    yield CounterMetricFamily("hubbub_sent_bytes", "bytes handed to sockets", value=m.bytes_out)
    yield CounterMetricFamily("hubbub_slow_consumer_closes", "connections closed with 1013",
                              value=m.slow_consumers)
    rejections = CounterMetricFamily("hubbub_handshake_rejections", "requests refused, by HTTP status",
                                     labels=["status"])
    for status, n in sorted(m.rejections.items()):
        rejections.add_metric([str(status)], n)
    yield rejections
    api = CounterMetricFamily("hubbub_api_requests", "server API requests answered, by endpoint and HTTP status",
                              labels=["endpoint", "status"])
    for (endpoint, status), n in sorted(m.http.items()):
        api.add_metric([endpoint, str(status)], n)
    yield api
    yield CounterMetricFamily("hubbub_broker_duplicates_dropped", "broker messages already delivered",
                              value=m.duplicates)
    up = GaugeMetricFamily("hubbub_backend_up", "1 while a backend is reachable", labels=["backend"])
    up.add_metric(["broker"], 1 if server.available("broker") else 0)
    up.add_metric(["store"], 1 if server.available("store") else 0)
    yield up
    yield GaugeMetricFamily("hubbub_broker_queue", "messages waiting for the broker", value=broker.queued)
    yield CounterMetricFamily("hubbub_broker_dropped", "messages dropped from a full broker queue",
                              value=broker.dropped)
    yield CounterMetricFamily("hubbub_broker_lost", "messages from other instances lost in a gap no replay filled",
                              value=broker.lost)
    yield CounterMetricFamily("hubbub_broker_malformed", "envelopes from the broker ignored as malformed",
                              value=broker.malformed)
    failures = CounterMetricFamily(
        "hubbub_failures", "exceptions contained to one connection or item (each logged once)", labels=["where"]
    )
    counts = dict(m.failures)
    counts["effect"] = backends.failures
    counts["store"] = backends.writer.failures
    counts["broker"] = broker.failures
    for where, n in sorted(counts.items()):
        failures.add_metric([where], n)
    yield failures


class PrometheusMetrics:
    """The metrics of one server: the latency histograms the shell observes into, and the ``/metrics``
    route that renders them with the core's and the backends' counts."""

    def __init__(self) -> None:
        self._latencies: dict[tuple[str, str], Latency] = {}
        self._backends: Any = None
        self._registry: Any = None  # prometheus-client's, made at the first scrape

    def observer(self, backend: str) -> Callable[[str, float], None]:
        """The ``observe(op, seconds)`` callback for one backend's operations."""
        latencies = self._latencies

        def observe(op: str, seconds: float) -> None:
            latency = latencies.get((backend, op))
            if latency is None:
                latency = latencies[(backend, op)] = Latency()
            latency.observe(seconds)

        return observe

    def attach(self, backends: Any) -> None:
        """Report the core, store worker and broker of ``backends`` (a shell's) at every scrape."""
        self._backends = backends

    def render(self, server: core.Server, headers: Mapping[bytes, bytes]) -> tuple[int, bytes, str]:
        """The ``/metrics`` route for ``core.Server(http_routes=...)``."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._registry is None:
            backends, latencies = self._backends, self._latencies

            class Collector:
                def collect(self) -> Iterator[Any]:
                    return _families(backends, latencies)

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(Collector())
        return 200, generate_latest(self._registry), CONTENT_TYPE_LATEST
