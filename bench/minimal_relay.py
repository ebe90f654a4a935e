"""The benchmark's floor: the least a Python relay can do (uvloop + aiohttp server + one pooled
aiohttp ClientSession forwarding bytes; no parsing, no ids, no capture, no metrics).

Run: ``python bench/minimal_relay.py --port 9100 --upstream http://127.0.0.1:9000``.
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web


def make_app(upstream: str) -> web.Application:
    key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app):
        app[key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024), auto_decompress=False)
        yield
        await app[key].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        try:
            return await _relay(request)
        except ConnectionError:  # wrk closes connections mid-response at the end of a run
            return web.Response(status=499)

    async def _relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app[key].post(upstream + request.path, data=body,
                                         headers={"Content-Type": "application/json"}) as up:
            if up.content_type == "text/event-stream":
                resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers["Content-Type"]})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            return web.Response(status=up.status, body=await up.read(), headers={"Content-Type": up.headers["Content-Type"]})

    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", relay)
    app.cleanup_ctx.append(session_ctx)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--upstream", default="http://127.0.0.1:9000")
    args = ap.parse_args()
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
