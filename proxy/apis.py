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


def register_apis(app: web.Application) -> None:
    """Add POST /v1/feedback and /admin/* to the proxy app (call from ``create_app`` after STATE is set,
    before the catch-all /v1 route)."""
    from proxy import admin, feedback

    api = ApiProducer(app[STATE])
    app[API_PRODUCER] = api
    feedback.register(app)
    admin.register(app)

    async def close_api_producer(app: web.Application) -> None:
        await api.close()

    app.on_cleanup.append(close_api_producer)
