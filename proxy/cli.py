"""``onpolicy proxy``: serve the OpenAI-compatible proxy (uvloop, graceful shutdown on SIGTERM/SIGINT)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("proxy", help="serve the OpenAI-compatible proxy in front of vLLM",
                              description="Serve the OpenAI-compatible proxy. Flags override ONPOLICY_PROXY_* env vars, "
                                          "which override the config file.")
    p.add_argument("--config", help="config file (YAML, JSON or TOML); also ONPOLICY_PROXY_CONFIG")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8080)")
    p.add_argument("--upstream-url", help="vLLM base URL ending in /v1 (default http://127.0.0.1:8000/v1)")
    p.add_argument("--no-capture", action="store_true", help="serve without emitting interaction events")
    p.add_argument("--no-follow-control", action="store_true", help="do not read routing from the control topic")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace):
    from proxy.settings import ProxySettings

    overrides = {}
    for flag, name in (("config", "config"), ("host", "host"), ("port", "port"), ("upstream_url", "upstream_url")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[name] = value
    if args.no_capture:
        overrides["capture"] = False
    if args.no_follow_control:
        overrides["follow_control"] = False
    return ProxySettings(**overrides)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    serve(settings)
    return 0


def serve(settings) -> None:
    """Run until SIGTERM/SIGINT; then drain in-flight requests for up to shutdown_grace_s.

    Like ``aiohttp.web.run_app``, but through ``ProxyRunner`` (proxy/http_server.py): malformed HTTP
    gets an OpenAI-style JSON error, and slow request heads are cut after request_header_timeout_s."""
    import asyncio
    import contextlib

    import uvloop
    from aiohttp import web

    from proxy.app import create_app

    app = create_app(settings)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, settings))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):  # SIGTERM / SIGINT (handle_signals)
        pass
    finally:
        main.cancel()  # its finally: stop accepting, drain, run the cleanups
        with contextlib.suppress(asyncio.CancelledError, web.GracefulExit, KeyboardInterrupt):
            loop.run_until_complete(main)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _serve(app, settings) -> None:
    import asyncio

    from aiohttp import web

    from proxy.http_server import ProxyRunner

    # handler_cancellation: a client that hangs up cancels its handler at once, which drops the
    # upstream connection, so vLLM stops generating for nobody (non-streaming requests included).
    runner = ProxyRunner(app, access_log=None, shutdown_timeout=settings.shutdown_grace_s, handle_signals=True,
                         handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        log.info("onpolicy proxy on http://%s:%d -> %s (capture %s)", settings.host, settings.port, settings.upstream_url,
                 "on" if settings.capture else "off")
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()
