"""The HTTP connection layer under the app: what happens before a request reaches a handler.

aiohttp's own answers to a request it cannot parse are plain text that quote the offending bytes
(a header line -- possibly ``Authorization: Bearer <key>`` -- comes back in the body and goes to the
log with a traceback), and it gives a client unlimited time to send a request's head, so a client
that trickles header bytes (slowloris) holds a connection forever. ``ProxyRunner`` serves the app
with a connection handler that:

- answers malformed HTTP (bad framing, request smuggling attempts such as Content-Length with
  Transfer-Encoding or two Content-Lengths, obs-fold, control characters in a header, TLS on the
  HTTP port) with an OpenAI-style JSON error -- 400, 414 for a request line over
  ``max_request_line_bytes``, 431 for a header over ``max_header_field_bytes`` or more than
  ``max_headers`` headers -- that names what was wrong and quotes none of the request's bytes, logs
  one line without them, and closes the connection (the parser's state is unknown after an error);
- gives every request ``request_header_timeout_s`` to send its whole head, counted from the
  connection's start or from the first byte of the next request on a kept-alive connection; past
  it: 408 and the connection is closed. An idle kept-alive connection (no bytes) is closed after
  ``keepalive_timeout_s``. The body's deadline (``request_body_timeout_s``) is enforced by the
  error middleware (``proxy.middleware``), where the body is read.

Both ``onpolicy proxy`` (``proxy.cli.serve``) and the in-process test server (``proxy.testing``)
serve through it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler

from proxy.errors import ProxyError, error_response

log = logging.getLogger(__name__)


def _summary(exc: BaseException | None, message: str | None) -> str:
    """What was wrong, without the request's bytes: aiohttp's messages quote them after the first line
    (``Invalid header value char:\\n\\n  b'...'``) or after ``reading:``."""
    text = (message or (exc.message if isinstance(exc, BadHttpMessage) else "") or "").strip()
    first = text.splitlines()[0] if text else ""
    for cut in (": b'", ': b"', ": bytearray(", "reading:"):
        first = first.split(cut)[0]
    return first.rstrip(":. ") or "malformed request"


def _classify(handler: RequestHandler, exc: BaseException | None, message: str | None) -> ProxyError:
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == handler.max_field_size:
            return ProxyError(431, f"a request header is longer than this proxy accepts ({limit} bytes, "
                                   "max_header_field_bytes); send shorter headers", code="header_too_large")
        return ProxyError(414, f"the request line is longer than this proxy accepts ({limit} bytes, "
                               "max_request_line_bytes); send a shorter URL", code="request_line_too_long")
    summary = _summary(exc, message)
    if "too many headers" in summary.lower():
        return ProxyError(431, f"the request has more headers than this proxy accepts ({handler.max_headers}, max_headers)",
                          code="too_many_headers")
    if isinstance(exc, BadHttpMethod):
        return ProxyError(400, f"this is not an HTTP/1.1 request this proxy can read ({summary}); send plain HTTP "
                               "(TLS is terminated in front of the proxy)", code="invalid_http")
    return ProxyError(400, f"the request is not valid HTTP/1.1 ({summary}); fix the client or whatever sits between "
                           "it and the proxy", code="invalid_http")


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler with JSON parse errors and a deadline for each request's head."""

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._head_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    # -- the head deadline -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._cancel_head_timer()  # a whole head arrived, or these are the current request's body bytes
        elif self._head_timer is None and not self._force_close:
            self._arm_head_timer()  # the first bytes of the next request's head

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timeout_s > 0:
            self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # A request being served, or a head waiting in the queue: not a slow head (the timer raced it).
        if self._request_in_progress or self._messages or self._force_close or self.transport is None:
            return
        err = ProxyError(408, f"the request's headers did not arrive within {self._head_timeout_s:g}s "
                              "(request_header_timeout_s); the connection is closed", code="request_timeout")
        body = err.body()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        log.info("closed a connection from %s: request head not complete within %gs",
                 self.transport.get_extra_info("peername"), self._head_timeout_s)
        self.force_close()

    # -- parse errors ------------------------------------------------------------------------------
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already started; the connection is closed")
        if status == 500:
            # An exception that escaped the app's error middleware: a bug; the traceback goes to the log only.
            log.error("unhandled error serving %s", request.remote, exc_info=exc)
            err = ProxyError(500, "the proxy failed to handle this request (an internal error, logged); retry, and "
                                  "report it if it persists", type="server_error", code="internal_error")
        elif status == 504:
            err = ProxyError(504, "the proxy timed out handling this request; retry", code="timeout")
        else:
            err = _classify(self, exc, message)
            # One line, no bytes of the request (they may hold credentials), no traceback: this is the client's fault.
            log.info("refused a malformed request from %s: %d %s", request.remote, err.status, err.code)
        resp = error_response(err)
        resp.force_close()
        return resp


class _GuardedServer(web.Server):
    """aiohttp's ``Server`` (the protocol factory) building ``GuardedRequestHandler``s."""

    header_timeout_s: float = 10.0

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` for the proxy app: the connection limits and deadlines of ``ProxySettings``
    (read from the app's state), served by ``GuardedRequestHandler``."""

    def __init__(self, app: web.Application, **kwargs: Any):
        from proxy.state import STATE

        super().__init__(app, **kwargs)  # the size limits and keep-alive come from create_app's handler_args
        self._header_timeout_s = app[STATE].settings.request_header_timeout_s

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app builds a plain Server (Application._make_handler); only its protocol factory differs.
        server.__class__ = _GuardedServer
        server.header_timeout_s = self._header_timeout_s
        return server
