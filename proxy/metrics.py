"""Prometheus metrics of one proxy (its own registry, so tests can build many apps in one process).

The per-request series are plain Python numbers updated on the event loop (the only writer) and
turned into Prometheus families at scrape time: prometheus_client's own Counter and Histogram take a
lock per increment and walk the buckets in Python, 2.4 us per request for the four updates a request
makes (3.7 us with a stream's time to first token); these take ~0.8 us. Label children are cached
and the label values bounded (at most ``MAX_MODELS`` model names, then ``other``), so a client
sending random model names cannot grow /metrics without bound.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

MAX_MODELS = 64
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def dec(self, amount: int = 1) -> None:
        self.value -= amount


class _Hist:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)  # per bucket (le = bound), the last one +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds


class _Family:
    """A labelled metric: ``labels(*values)`` gives the child (created on first use)."""

    def __init__(self, kind: str, name: str, doc: str, labels: tuple[str, ...]):
        self.kind, self.name, self.doc, self.label_names = kind, name, doc, labels
        self.children: dict[tuple[str, ...], _Count | _Hist] = {}
        self._child = _Hist if kind == "histogram" else _Count

    def labels(self, *values: str):
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self._child()
        return child

    def family(self):
        if self.kind == "counter":
            fam = CounterMetricFamily(self.name, self.doc, labels=self.label_names)
            for values, child in self.children.items():
                fam.add_metric(values, child.value)
            return fam
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.label_names)
        for values, child in self.children.items():
            running, buckets = 0, []
            for bound, n in zip((*_LATENCY_BUCKETS, float("inf")), child.counts):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
            fam.add_metric(values, buckets, child.sum)
        return fam


class ProxyMetrics(Collector):
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = _Family("counter", "onpolicy_proxy_requests", "Requests answered, by route, model, version and status.",
                                ("route", "model", "version", "status"))
        self.latency = _Family("histogram", "onpolicy_proxy_request_seconds", "Time from request received to last byte sent.",
                               ("route", "model", "version", "status"))
        self.upstream_latency = _Family("histogram", "onpolicy_proxy_upstream_seconds",
                                        "Time until the upstream's response headers.", ("route", "upstream"))
        self.ttft = _Family("histogram", "onpolicy_proxy_time_to_first_token_seconds",
                            "Streams: time until the first chunk reached the client.", ("route", "model", "version"))
        self.in_flight = _Count()
        self.abandoned = _Family("counter", "onpolicy_proxy_abandoned",
                                 "Requests whose client left before the response was complete.", ("route",))
        self.upstream_errors = _Family("counter", "onpolicy_proxy_upstream_errors",
                                       "Upstream unreachable, timed out or cut a stream.", ("route", "kind"))
        self._children: dict[tuple, tuple] = {}
        self._models: set[str] = set()
        self.registry.register(self)

    def collect(self):
        for fam in (self.requests, self.latency, self.upstream_latency, self.ttft):
            yield fam.family()
        g = GaugeMetricFamily("onpolicy_proxy_in_flight_requests", "Requests being served now.")
        g.add_metric([], self.in_flight.value)
        yield g
        yield self.abandoned.family()
        yield self.upstream_errors.family()

    def _model_label(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return "other"

    def observe_upstream(self, route: str, upstream: str, seconds: float) -> None:
        self.upstream_latency.labels(route, upstream).observe(seconds)

    def observe_ttft(self, route: str, model: str, version: str | None, seconds: float) -> None:
        self.ttft.labels(route, self._model_label(model), version or "base").observe(seconds)

    def observe(self, route: str, model: str, version: str | None, status: int, seconds: float) -> None:
        key = (route, model, version, status)
        pair = self._children.get(key)
        if pair is None:
            labels = (route, self._model_label(model), version or "base", str(status))
            pair = (self.requests.labels(*labels), self.latency.labels(*labels))
            if len(self._children) < 10_000:
                self._children[key] = pair
        pair[0].value += 1
        pair[1].observe(seconds)


class CaptureCollector(Collector):
    """Capture counters read at scrape time (plain ints on the hot path, no locks)."""

    def __init__(self, capture, router, follower=None):
        self.capture = capture
        self.router = router
        self.follower = follower

    def collect(self):
        cap = self.capture
        if cap is not None:
            for name, help_ in (("emitted", "Interaction events handed on (to the producer, or to the capture worker)."),
                                ("dropped", "Interaction events dropped because the capture queue or the producer's budgets were full."),
                                ("failed", "Interaction events that could not be built (a bug: see the log).")):
                c = CounterMetricFamily(f"onpolicy_proxy_capture_{name}", help_)
                c.add_metric([], getattr(cap, name))
                yield c
            worker_stats = cap.worker_stats() if hasattr(cap, "worker_stats") else None
            counts = getattr(cap.redactor, "counts", None) if cap.redactor is not None else None
            if worker_stats is not None:
                counts = worker_stats.get("redactions", {})
                g = GaugeMetricFamily("onpolicy_proxy_capture_queue_bytes", "Exchanges waiting for the capture worker (bytes).")
                g.add_metric([], cap.queue_bytes)
                yield g
                for name, help_ in (("restarts", "Capture worker restarts."),
                                    ("lost_bytes", "Bytes of exchanges left unread in a dead capture worker's pipe (lost).")):
                    c = CounterMetricFamily(f"onpolicy_proxy_capture_worker_{name}", help_)
                    c.add_metric([], getattr(cap, name))
                    yield c
                # The worker's producer, as the in-process ProducerCollector would show it.
                for name in ("accepted", "sent", "spooled", "replayed", "overflowed", "dropped", "send_failures"):
                    c = CounterMetricFamily(f"onpolicy_producer_events_{name}", f"Events {name.replace('_', ' ')} by the capture worker's producer.")
                    c.add_metric([], worker_stats.get(name, 0))
                    yield c
                for name in ("spool_bytes", "backlog_bytes"):
                    g = GaugeMetricFamily(f"onpolicy_producer_{name}", f"Capture worker producer {name.replace('_', ' ')}.")
                    g.add_metric([], worker_stats.get(name, 0))
                    yield g
                g = GaugeMetricFamily("onpolicy_producer_connected", "1 while the producer is delivering to Kafka.")
                g.add_metric([], 1 if worker_stats.get("connected") else 0)
                yield g
            c = CounterMetricFamily("onpolicy_proxy_redactions", "Strings redacted before capture, by rule.", labels=["rule"])
            for rule, n in (counts or {}).items():
                c.add_metric([rule], n)
            yield c
        g = GaugeMetricFamily("onpolicy_proxy_routing_routes", "Public model names in the routing table.")
        g.add_metric([], len(self.router.table.routes))
        yield g
        g = GaugeMetricFamily("onpolicy_proxy_routing_offset", "Control-topic offset the routing table reflects (-1: none yet).")
        g.add_metric([], self.router.table.offset)
        yield g
        c = CounterMetricFamily("onpolicy_proxy_routing_bad_events", "routing_changed events that could not be applied.")
        c.add_metric([], self.router.bad_events)
        yield c
