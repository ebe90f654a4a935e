"""The app factory: ``create_app(settings) -> web.Application``.

Each long-lived resource is a cleanup context, started in order and closed in reverse: the event
producer (capture), the control follower (routing), the upstream session. On shutdown aiohttp stops
accepting, marks /readyz 503 (``on_shutdown``), waits up to ``shutdown_grace_s`` for in-flight
requests and streams, then runs the cleanups: the upstream session closes, and the producer flushes
what it can (the rest stays in its spool for the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.apis import register_apis
from proxy.capture import Capture
from proxy.interaction_ids import InteractionIds
from proxy.metrics import CaptureCollector, ProxyMetrics
from proxy.middleware import openai_errors
from proxy.openapi import openapi_spec
from proxy.redaction import load_redactor
from proxy.relay import ENDPOINTS, forward_other, list_models, openai_post
from proxy.routing import ControlFollower, Router
from proxy.settings import ProxySettings
from proxy.state import STATE, ProxyState
from proxy.upstream import UpstreamClient

log = logging.getLogger(__name__)


def create_app(settings: ProxySettings, *, producer: Any | None = None, router: Router | None = None) -> web.Application:
    """Build the proxy. ``producer`` overrides the EventProducer built from settings (tests pass
    their own); ``router`` lets a test drive routing without Kafka."""
    metrics = ProxyMetrics()
    state = ProxyState(
        settings=settings,
        upstream=UpstreamClient(settings),
        router=router or Router(),
        ids=InteractionIds(settings.signing_key()),
        metrics=metrics,
        hosted={m.model_name: m for m in settings.model_list},
        producer=producer,
    )
    redactor = load_redactor(settings.redactor)  # fail at start, not on the first request
    # Connection limits for whichever runner serves the app; the head deadline and JSON parse errors
    # need ProxyRunner (proxy/http_server.py), which `onpolicy proxy` and proxy.testing use.
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[openai_errors],
                          handler_args={"max_field_size": settings.max_header_field_bytes,
                                        "max_line_size": settings.max_request_line_bytes,
                                        "max_headers": settings.max_headers,
                                        "keepalive_timeout": settings.keepalive_timeout_s})
    app[STATE] = state
    for path in ENDPOINTS:
        app.router.add_post("/v1" + path, openai_post)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_handler)
    register_apis(app)  # POST /v1/feedback and /admin/* (before the /v1 catch-all)
    app.router.add_route("*", "/v1/{tail:.*}", forward_other)

    async def upstream_ctx(app: web.Application):
        await state.upstream.start()
        yield
        await state.upstream.close()

    async def capture_ctx(app: web.Application):
        owned = worker = None
        injected = state.producer is not None  # a test's producer: it sees only its requests' events
        if settings.capture:
            if state.producer is None and settings.capture_mode == "process":
                from proxy.capture_worker import CaptureWorker

                stats_path = settings.producer.spool_dir.parent / f"{settings.producer.spool_dir.name}.capture-stats.json"
                stats_path.parent.mkdir(parents=True, exist_ok=True)
                config = {"kafka": settings.kafka.model_dump(), "producer": settings.producer.model_dump(mode="json"),
                          "redactor": settings.redactor, "stats_path": str(stats_path),
                          "max_event_bytes": settings.capture_max_event_bytes,
                          "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel())}
                worker = CaptureWorker(config, max_queue_bytes=settings.capture_queue_bytes, cpus=settings.capture_worker_cpus,
                                       stats_path=stats_path)
                worker.start()
                state.capture = worker
                state.producer = worker
            else:
                if state.producer is None:
                    from streams.producer import EventProducer, ProducerCollector

                    owned = state.producer = EventProducer(settings.kafka, settings.producer)
                    metrics.registry.register(ProducerCollector(owned))
                state.capture = Capture(state.producer, redactor, settings.capture_max_event_bytes)
        metrics.registry.register(CaptureCollector(state.capture, state.router))
        tally = None
        if state.capture is not None and settings.reconcile_tally_interval_s > 0 and not injected:
            # Per-minute counts for reconciliation, reported through the API producer (its own spool).
            from proxy.apis import API_PRODUCER
            from streams.reconcile import Tally

            tally = Tally(app[API_PRODUCER].emit, interval_s=settings.reconcile_tally_interval_s).start()
            state.tally = state.capture.tally = tally
        yield
        if tally is not None:
            state.capture.tally = None
            await asyncio.to_thread(tally.close)
        if worker is not None:
            await worker.close(timeout_s=15.0)
        if owned is not None:
            # Off the loop: close() waits for the broker to acknowledge what it can.
            await asyncio.to_thread(owned.close, 10.0)

    async def control_ctx(app: web.Application):
        if settings.follow_control and router is None:
            state.follower = ControlFollower(settings.kafka, state.router).start()
        yield
        if state.follower is not None:
            await asyncio.to_thread(state.follower.stop)

    async def hosted_ctx(app: web.Application):
        if state.hosted:
            # Import litellm (~3 s) now, off the loop, rather than on the first hosted request.
            from proxy.hosted import _import_litellm

            await asyncio.to_thread(_import_litellm)
        yield

    async def upstream_probe_ctx(app: web.Application):
        # /readyz reflects whether the upstream answers: probed off the request path every few
        # seconds, so readiness checks cost nothing and a dead vLLM takes the replica out of rotation.
        task = asyncio.create_task(_probe_upstream(state))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def on_shutdown(app: web.Application):
        state.draining = True

    app.cleanup_ctx.extend([capture_ctx, control_ctx, upstream_ctx, hosted_ctx, upstream_probe_ctx])
    app.on_shutdown.append(on_shutdown)
    state.started_at = time.monotonic()
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# How long readiness waits for the control topic's replay before serving on whatever table it has
# (a broker outage at boot must not keep the proxy down: names then pass through).
CONTROL_REPLAY_WAIT_S = 15.0


UPSTREAM_PROBE_INTERVAL_S = 2.0


async def _probe_upstream(state: ProxyState) -> None:
    from multidict import CIMultiDict

    while True:
        try:
            resp = await state.upstream.request("GET", "/models", None, state.upstream.headers(CIMultiDict()),
                                                stream=False)
            async with resp:
                await resp.read()
                ok = resp.status < 500
                detail = f"HTTP {resp.status}"
        except Exception as exc:  # ProxyError for unreachable / timeout; anything else is also "down"
            ok, detail = False, str(getattr(exc, "message", exc))[:300]
        state.extra["upstream_ok"] = ok
        state.extra["upstream_detail"] = detail
        await asyncio.sleep(UPSTREAM_PROBE_INTERVAL_S)


async def readyz(request: web.Request) -> web.Response:
    st = request.app[STATE]
    checks: dict[str, Any] = {"draining": st.draining}
    ready = not st.draining
    if st.follower is not None:
        caught_up = st.follower.caught_up.is_set()
        checks["routing_replayed"] = caught_up
        if not caught_up and time.monotonic() - st.started_at < CONTROL_REPLAY_WAIT_S:
            ready = False
    checks["routing_offset"] = st.router.table.offset
    if "upstream_ok" in st.extra:
        checks["upstream"] = "ok" if st.extra["upstream_ok"] else st.extra.get("upstream_detail", "down")
        ready = ready and bool(st.extra["upstream_ok"])
    else:
        checks["upstream"] = "not probed yet"
        ready = False
    if st.producer is not None:
        checks["capture_connected"] = bool(getattr(st.producer, "connected", False))
    return web.json_response({"status": "ready" if ready else "not ready", **checks}, status=200 if ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    data = generate_latest(request.app[STATE].metrics.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec())
