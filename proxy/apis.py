"""Wiring of the feedback and admin APIs into the proxy app, and the producer they share.

Both APIs write events (``FeedbackEvent``, ``ControlEvent``) through a spool-backed
``streams.producer.EventProducer``. When the app already has one in this process (inline capture, or
a producer a test passed to ``create_app``) it is reused; in process capture mode the interaction
producer lives in the capture worker, so this module opens its own, with its own spool directory
(``<producer.spool_dir>-api``), on the first write -- a proxy that never takes feedback never opens
one (and never waits on a broker at shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from aiohttp import web

from proxy.state import STATE, ProxyState

log = logging.getLogger(__name__)


class ApiProducer:
    """``emit(event) -> bool`` for the feedback and admin APIs; never blocks on Kafka."""

    def __init__(self, state: ProxyState):
        self.state = state
        self.settings = state.settings
        self._own: Any | None = None
        self._lock = threading.Lock()

    def _producer(self) -> Any:
        # Read at each call: the capture context sets state.producer at start-up, after registration.
        shared = self.state.producer
        if shared is not None and hasattr(shared, "emit"):
            return shared
        if self._own is None:
            with self._lock:
                if self._own is None:
                    from streams.producer import EventProducer
                    from streams.settings import ProducerSettings

                    spool = self.settings.producer.spool_dir
                    ps = ProducerSettings(**{**self.settings.producer.model_dump(),
                                             "spool_dir": spool.with_name(spool.name + "-api")})
                    self._own = EventProducer(self.settings.kafka, ps)
        return self._own

    def emit(self, event: Any) -> bool:
        """True once the event is in the spool (the producer's promise); False: it was dropped."""
        return bool(self._producer().emit(event))

    async def close(self) -> None:
        if self._own is not None:
            await asyncio.to_thread(self._own.close, 10.0)


API_PRODUCER: web.AppKey[ApiProducer] = web.AppKey("onpolicy_api_producer", ApiProducer)


class ApiMetrics:
    """Counters of the feedback and admin APIs, in the proxy's registry (label values are bounded: routes
    and error codes are fixed sets, kinds and sources are enums)."""

    def __init__(self, registry) -> None:
        from prometheus_client import Counter

        self.requests = Counter("onpolicy_api_requests_total", "Feedback and admin API requests, by route, status and error code.",
                                ("route", "status", "code"), registry=registry)
        self.feedback = Counter("onpolicy_feedback_events_total", "Feedback events accepted, by kind and source.",
                                ("kind", "source"), registry=registry)

    def counted(self, route: str, handler):
        """``handler`` with every answer counted; errors are re-raised for the error middleware."""
        from proxy.errors import ProxyError

        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                resp = await handler(request)
            except ProxyError as err:
                self.requests.labels(route, str(err.status), err.code or "").inc()
                raise
            except Exception:
                self.requests.labels(route, "500", "internal_error").inc()
                raise
            self.requests.labels(route, str(resp.status), "").inc()
            return resp

        wrapped.__name__ = getattr(handler, "__name__", "handler")
        return wrapped


API_METRICS: web.AppKey[ApiMetrics] = web.AppKey("onpolicy_api_metrics", ApiMetrics)


def register_apis(app: web.Application) -> None:
    """Add POST /v1/feedback and /admin/* to the proxy app (call from ``create_app`` after STATE is set,
    before the catch-all /v1 route)."""
    from proxy import admin, feedback

    api = ApiProducer(app[STATE])
    app[API_PRODUCER] = api
    app[API_METRICS] = ApiMetrics(app[STATE].metrics.registry)
    feedback.register(app)
    admin.register(app)

    async def close_api_producer(app: web.Application) -> None:
        await api.close()

    app.on_cleanup.append(close_api_producer)


def openapi_paths() -> dict[str, Any]:
    """The OpenAPI description of /v1/feedback and /admin/* (merged into ``proxy.openapi.openapi_spec``)."""
    error = {"description": "An OpenAI-style error.", "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["message", "type"]}}}}}}
    auth = [{"name": "Authorization", "in": "header", "required": False, "schema": {"type": "string"},
             "description": "Bearer <API key> (feedback) or Bearer <admin token> (/admin)."}]
    item = {"type": "object", "required": ["kind"], "additionalProperties": False, "properties": {
        "interaction_id": {"type": "string", "maxLength": 256}, "episode_id": {"type": "string", "maxLength": 256},
        "kind": {"type": "string", "enum": ["thumbs", "score", "outcome", "comment", "correction"]},
        "value": {"type": ["number", "boolean", "string", "null"]}, "comment": {"type": "string"},
        "correction": {"type": ["string", "object", "array"]}, "source": {"type": "string", "enum": ["explicit", "implicit"]},
        "weight": {"type": "number", "minimum": 0, "maximum": 1}, "idempotency_key": {"type": "string", "maxLength": 256},
        "user": {"type": "string"}, "metadata": {"type": "object"}}}
    ok = {"description": "Accepted (queued for Kafka through the spool)."}

    def post(summary: str, body: dict[str, Any], params: list | None = None) -> dict[str, Any]:
        return {"post": {"summary": summary, "parameters": auth + (params or []),
                         "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                         "responses": {"202": ok, "default": error}}}

    action = {"type": "object", "required": ["reason"], "additionalProperties": True, "properties": {
        "version": {"type": "string"}, "public_model": {"type": "string"}, "base": {"type": "string"},
        "to": {"type": "string"}, "reason": {"type": "string"}, "actor": {"type": "string"},
        "fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "force": {"type": "boolean"},
        "family": {"type": "string"}}}
    get = lambda summary, params=None: {"get": {"summary": summary, "parameters": auth + (params or []),  # noqa: E731
                                                "responses": {"200": {"description": "JSON"}, "default": error}}}
    paths: dict[str, Any] = {
        "/v1/feedback": post("Feedback on an interaction or episode: one item or a list (a batch).",
                             {"oneOf": [item, {"type": "array", "items": item, "minItems": 1}]},
                             [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}},
                              {"name": "x-onpolicy-user", "in": "header", "required": False, "schema": {"type": "string"}}]),
        "/admin/versions": get("Adapter versions with lineage, evaluations and control history; the routing table.",
                               [{"name": "family", "in": "query", "required": False, "schema": {"type": "string"}}]),
        "/admin/routing": get("This replica's routing table and pins."),
    }
    for op, summary in (("promote", "Route the public model to a version."), ("pin", "Route to a version and pin it."),
                        ("unpin", "Unpin a public model."), ("rollback", "Back to the previous version, or 'to'."),
                        ("canary", "Send a fraction of traffic to a version."), ("pause", "Pause learning."),
                        ("resume", "Resume learning.")):
        paths[f"/admin/{op}"] = post(summary, action)
    return paths
