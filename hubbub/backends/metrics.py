"""``GET /metrics`` in the Prometheus text format, through prometheus-client.

The core only counts (``Server.metrics``, ``Server.stats``); this reads those counts
at scrape time and adds what only the shell sees: store and broker latency and the
broker's queue. Each server gets its own registry: two servers in one process never
share a metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hubbub import core


class CoreCollector(Collector):
    """The core's counters, and the shell's and backends' own, read when Prometheus scrapes."""

    def __init__(self, backends: Any) -> None:
        self.backends = backends

    def collect(self) -> Iterator[Any]:
        backends = self.backends
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
    """The registry of one server and the latency histograms the shell observes into."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        buckets = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
        self.latency = Histogram(
            "hubbub_backend_seconds", "time of one store or broker operation (a batch)",
            ["backend", "op"], registry=self.registry, buckets=buckets,
        )

    def observer(self, backend: str) -> Callable[[str, float], None]:
        children: dict[str, Any] = {}

        def observe(op: str, seconds: float) -> None:
            child = children.get(op)
            if child is None:
                child = children[op] = self.latency.labels(backend, op)
            child.observe(seconds)

        return observe

    def attach(self, backends: Any) -> None:
        """Report the core, store worker and broker of ``backends`` (a shell's) at every scrape."""
        self.registry.register(CoreCollector(backends))

    def render(self, server: core.Server, headers: Mapping[bytes, bytes]) -> tuple[int, bytes, str]:
        """The ``/metrics`` route for ``core.Server(http_routes=...)``."""
        return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST
