"""Middleware: every error the proxy answers is OpenAI-style JSON; nothing leaks a traceback.

Before a handler runs, the request is checked where a hostile client could hurt the proxy or reach
further than its own request:

- every header value must be valid UTF-8 (aiohttp hands invalid bytes on as surrogates, which would
  break hashing an API key or forwarding the header upstream): else 400 ``invalid_header``;
- the id headers the proxy reads -- ``ID_HEADERS`` -- must also be at most ``MAX_ID_HEADER_CHARS``
  characters with no control characters (they become event fields, routing keys and idempotency
  keys): else 400 ``invalid_header``. Errors name the header, never echo its value;
- vLLM's runtime LoRA API is refused however its path is spelled (``/v1//load_lora_adapter``,
  a trailing slash, dot segments): the /v1 catch-all would otherwise forward it upstream;
- the body is read here, within ``request_body_timeout_s`` (a trickled body gets 408 and the
  connection is closed) and ``max_body_bytes`` (413); handlers then read it from memory.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath

from aiohttp import web

from proxy.errors import ProxyError, error_response
from proxy.state import STATE

_ROUTES = frozenset({"/chat/completions", "/completions", "/embeddings", "/responses"})

log = logging.getLogger(__name__)

ID_HEADERS = ("x-onpolicy-episode-id", "x-onpolicy-interaction-id", "x-onpolicy-user", "x-onpolicy-tenant",
              "idempotency-key")
MAX_ID_HEADER_CHARS = 256


def _valid_utf8(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:  # aiohttp decodes header bytes with surrogateescape
        return False
    return True


def check_headers(request: web.Request) -> None:
    """Raise 400 ``invalid_header`` for a header the proxy must not read or forward (see the module doc)."""
    headers = request.headers
    for name, value in headers.items():
        if not _valid_utf8(value):
            raise ProxyError(400, f"the {name[:64]!r} header is not valid UTF-8; send header values as UTF-8 (ASCII for "
                                  "ids and keys)", param=name[:64], code="invalid_header")
    for name in ID_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        if len(value) > MAX_ID_HEADER_CHARS:
            raise ProxyError(400, f"the {name} header is {len(value)} characters; at most {MAX_ID_HEADER_CHARS}",
                             param=name, code="invalid_header")
        if not value.isprintable():
            raise ProxyError(400, f"the {name} header holds a control character; ids are printable text",
                             param=name, code="invalid_header")


def _upstream_admin(path: str) -> bool:
    """True for any spelling of vLLM's runtime LoRA API under /v1 (only the learner's publisher calls it)."""
    from proxy.relay import UPSTREAM_ADMIN

    if not path.startswith("/v1/") or "lora_adapter" not in path.lower():  # the hot path stops here
        return False
    tail = posixpath.normpath("/" + path[4:].lstrip("/")).lower()  # collapses //, ./, ../ and a trailing /
    return tail in UPSTREAM_ADMIN


async def read_body(request: web.Request) -> None:
    """Read the whole body now (aiohttp keeps it for the handler's ``read()``), within the body deadline."""
    if not request.body_exists or not request.can_read_body:
        return
    settings = request.app[STATE].settings
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        # Refused on the declared length: neither read nor waited for.
        raise ProxyError(413, f"the request body is larger than this proxy accepts ({settings.max_body_bytes} bytes, "
                              "max_body_bytes); send a smaller body or raise max_body_bytes", code="request_too_large")
    if request.content.is_eof():  # the whole body came with the head (the usual case): no deadline to arm
        await request.read()
        return
    timeout_s = settings.request_body_timeout_s
    try:
        async with asyncio.timeout(timeout_s or None):
            await request.read()
    except TimeoutError:
        raise ProxyError(408, f"the request body did not arrive within {timeout_s:g}s (request_body_timeout_s); send it "
                              "at once, or raise request_body_timeout_s for slow links", code="request_timeout") from None


async def _refuse_and_close(request: web.Request, err: ProxyError) -> web.StreamResponse:
    """Answer, then close the connection now: the rest of a body that is still trickling in is not
    waited for (aiohttp would otherwise keep reading it for its lingering time)."""
    resp = error_response(err)
    resp.force_close()
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        pass
    request.protocol.force_close()
    return resp


def _count(request: web.Request, status: int) -> None:
    """Requests the proxy refused before they became interactions: counted, not captured."""
    route = request.path[3:] if request.path.startswith("/v1/") else "other"
    request.app[STATE].metrics.observe(route if route in _ROUTES else "other", "-", "-", status, 0.0)


@web.middleware
async def openai_errors(request: web.Request, handler):
    try:
        check_headers(request)
        if _upstream_admin(request.path):
            raise ProxyError(404, f"{request.path} is not exposed through the proxy: adapters are loaded by the learner's "
                                  "publisher and routed with the admin API", code="not_found")
        try:
            await read_body(request)
        except ProxyError as err:
            _count(request, err.status)
            return await _refuse_and_close(request, err)
        return await handler(request)
    except ProxyError as err:
        _count(request, err.status)
        return error_response(err)
    except web.HTTPRequestEntityTooLarge:
        _count(request, 413)
        limit = request.app[STATE].settings.max_body_bytes
        return error_response(ProxyError(
            413, f"the request body is larger than this proxy accepts ({limit} bytes, max_body_bytes); "
                 "send a smaller body or raise max_body_bytes", code="request_too_large"))
    except web.HTTPMethodNotAllowed as exc:
        return error_response(ProxyError(405, f"{request.method} is not allowed on {request.path}; allowed: "
                                              f"{', '.join(sorted(exc.allowed_methods))}", code="method_not_allowed"),
                              headers={"Allow": ",".join(sorted(exc.allowed_methods))})
    except web.HTTPNotFound:
        return error_response(ProxyError(404, f"no route {request.method} {request.path}; the OpenAI API lives under /v1/",
                                         code="not_found"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(ProxyError(exc.status, exc.reason or "request failed"))
    except Exception:
        # A bug in the proxy: log it with the traceback here, answer the client without one.
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error_response(ProxyError(500, "the proxy failed to handle this request (an internal error, logged); "
                                              "retry, and report it if it persists", type="server_error", code="internal_error"))
