"""Run a real proxy on its own thread and event loop (uvloop), for tests and benchmarks in-process."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

from aiohttp import web

from proxy.app import create_app
from proxy.http_server import ProxyRunner
from proxy.settings import ProxySettings
from proxy.state import STATE, ProxyState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningProxy:
    """``RunningProxy(settings).start()`` serves ``create_app(settings, **kwargs)`` on 127.0.0.1, on
    ``port`` or a free one (``settings.port`` is ignored: tests must not collide on 8080)."""

    def __init__(self, settings: ProxySettings, *, port: int | None = None, **create_kwargs: Any):
        self.settings = settings
        self.create_kwargs = create_kwargs
        self.port = port or free_port()
        self.app: web.Application | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="proxy-under-test", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> ProxyState:
        assert self.app is not None
        return self.app[STATE]

    def start(self, timeout_s: float = 30.0) -> "RunningProxy":
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("proxy did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.app = create_app(self.settings, **self.create_kwargs)
        self._runner = ProxyRunner(self.app, access_log=None, shutdown_timeout=self.settings.shutdown_grace_s,
                                     handler_cancellation=True)  # as `onpolicy proxy` runs it
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def call(self, coro, timeout_s: float = 60.0):
        """Run a coroutine on the proxy's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful: stop accepting, drain in-flight requests (shutdown_grace_s), run the cleanups."""
        if self.loop is None or self._runner is None:
            return
        self.call(self._runner.cleanup(), timeout_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
