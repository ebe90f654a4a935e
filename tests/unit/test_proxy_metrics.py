"""The proxy's per-request metrics are plain numbers exported at scrape time: what /metrics shows
must be what Prometheus' own Counter, Gauge and Histogram would have shown."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import _LATENCY_BUCKETS, MAX_MODELS, ProxyMetrics


def _samples(registry) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(generate_latest(registry).decode())
            for s in fam.samples if not s.name.endswith("_created")}


def test_what_is_exported_is_what_prometheus_client_would_export():
    ours = ProxyMetrics()
    ref = CollectorRegistry()
    labels = ("route", "model", "version", "status")
    requests = Counter("onpolicy_proxy_requests_total", "x", labels, registry=ref)
    latency = Histogram("onpolicy_proxy_request_seconds", "x", labels, buckets=_LATENCY_BUCKETS, registry=ref)
    upstream = Histogram("onpolicy_proxy_upstream_seconds", "x", ("route", "upstream"), buckets=_LATENCY_BUCKETS, registry=ref)
    ttft = Histogram("onpolicy_proxy_time_to_first_token_seconds", "x", ("route", "model", "version"),
                     buckets=_LATENCY_BUCKETS, registry=ref)
    in_flight = Gauge("onpolicy_proxy_in_flight_requests", "x", registry=ref)
    abandoned = Counter("onpolicy_proxy_abandoned_total", "x", ("route",), registry=ref)
    errors = Counter("onpolicy_proxy_upstream_errors_total", "x", ("route", "kind"), registry=ref)
    rng = random.Random(1)
    for _ in range(5000):
        route = rng.choice(("/chat/completions", "/completions"))
        model, version = rng.choice(("a", "b")), rng.choice((None, "a-v0001"))
        status = rng.choice((200, 200, 404, 502))
        # bucket bounds exactly, and values between and beyond them
        seconds = rng.choice((*_LATENCY_BUCKETS, rng.uniform(0, 0.01), rng.uniform(0, 400)))
        ours.in_flight.inc()
        in_flight.inc()
        ours.observe(route, model, version, status, seconds)
        requests.labels(route, model, version or "base", str(status)).inc()
        latency.labels(route, model, version or "base", str(status)).observe(seconds)
        ours.observe_upstream(route, "vllm", seconds / 2)
        upstream.labels(route, "vllm").observe(seconds / 2)
        ours.observe_ttft(route, model, version, seconds / 3)
        ttft.labels(route, model, version or "base").observe(seconds / 3)
        if rng.random() < 0.1:
            ours.abandoned.labels(route).inc()
            abandoned.labels(route).inc()
            ours.upstream_errors.labels(route, "cut").inc()
            errors.labels(route, "cut").inc()
        if rng.random() < 0.9:
            ours.in_flight.dec()
            in_flight.dec()
    got, want = _samples(ours.registry), _samples(ref)
    assert set(got) == set(want)
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-6 * max(1.0, abs(value)), key


def test_model_names_beyond_the_cap_share_one_label():
    m = ProxyMetrics()
    for i in range(MAX_MODELS + 50):
        m.observe("/chat/completions", f"model-{i}", None, 200, 0.01)
        m.observe_ttft("/chat/completions", f"model-{i}", None, 0.01)
    models = {labels[1] for labels in m.requests.children} | {labels[1] for labels in m.ttft.children}
    assert len(models) == MAX_MODELS + 1 and "other" in models
    assert m.requests.children[("/chat/completions", "other", "base", "200")].value == 50
