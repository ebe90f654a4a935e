"""Middleware: every error the proxy answers is OpenAI-style JSON; nothing leaks a traceback."""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.errors import ProxyError, error_response
from proxy.state import STATE

_ROUTES = frozenset({"/chat/completions", "/completions", "/embeddings", "/responses"})

log = logging.getLogger(__name__)


def _count(request: web.Request, status: int) -> None:
    """Requests the proxy refused before they became interactions: counted, not captured."""
    route = request.path[3:] if request.path.startswith("/v1/") else "other"
    request.app[STATE].metrics.observe(route if route in _ROUTES else "other", "-", "-", status, 0.0)


@web.middleware
async def openai_errors(request: web.Request, handler):
    try:
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
