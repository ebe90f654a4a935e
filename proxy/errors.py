"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with a message a person can
act on. Every error the proxy itself produces goes through here; upstream 4xx bodies are relayed as
they are."""

from __future__ import annotations

import orjson
from aiohttp import web

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


class ProxyError(Exception):
    """An error answered to the client as OpenAI-style JSON with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def error_response(err: ProxyError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=err.status, body=err.body(), content_type="application/json", headers=headers)
