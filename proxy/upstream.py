"""The vLLM (or any OpenAI-compatible) upstream: pooled keep-alive HTTP/1.1 connections (``proxy.http1``).

Bodies go out as the bytes the client sent (re-serialized only when routing changes the model
name); responses come back as bytes and are never decoded on the relay path. Headers: the client's
are forwarded except hop-by-hop ones, ``Host``, ``Content-Length``, ``Accept-Encoding`` (so the
upstream answers uncompressed and capture can read it) and our own ``x-onpolicy-*``.
"""

from __future__ import annotations

import asyncio
from typing import Mapping
from urllib.parse import urlsplit

from proxy.errors import ProxyError
from proxy.http1 import Http1Pool, Http1Response, UpstreamConnectError
from proxy.settings import ProxySettings

_DROP_REQUEST_HEADERS = frozenset({
    "host", "content-length", "accept-encoding", "connection", "keep-alive", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-authorization", "expect",
})
_KEEP_RESPONSE_HEADERS = ("content-type", "openai-organization", "openai-processing-ms", "openai-version",
                          "x-request-id", "retry-after", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests")


class UpstreamClient:
    """Pooled connections to one upstream base URL (ending in /v1)."""

    def __init__(self, settings: ProxySettings):
        self.base = settings.upstream_url
        self.name = self.base
        u = urlsplit(self.base)
        self._origin = f"{u.scheme}://{u.netloc}"
        self._prefix = u.path.rstrip("/")
        self.api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        self.connect_timeout_s = settings.upstream_connect_timeout_s
        # Non-streaming calls: the whole call (head and body) is bounded by timeout_s. Streams: the
        # wait for the head is bounded by timeout_s, and each later read by read_timeout_s (silence
        # between chunks).
        self.timeout_s = settings.upstream_timeout_s
        self.read_timeout_s = settings.upstream_read_timeout_s
        self.max_connections = settings.upstream_max_connections
        self.pool: Http1Pool | None = None

    async def start(self) -> None:
        self.pool = Http1Pool(self._origin, max_connections=self.max_connections,
                              connect_timeout_s=self.connect_timeout_s)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    def headers(self, incoming: Mapping[str, str], request_id: str | None = None) -> list[tuple[str, str]]:
        """The client's headers as forwarded upstream; ``request_id`` replaces any X-Request-Id."""
        out = []
        for k, v in incoming.items():
            lk = k.lower()
            if lk in _DROP_REQUEST_HEADERS or lk.startswith("x-onpolicy-") or (request_id is not None and lk == "x-request-id"):
                continue
            if lk == "authorization" and self.api_key is not None:
                continue
            out.append((k, v))
        if self.api_key is not None:
            out.append(("Authorization", f"Bearer {self.api_key}"))
        if request_id is not None:
            out.append(("X-Request-Id", request_id))
        return out

    async def request(self, method: str, path: str, body: bytes | None, headers: list[tuple[str, str]], *,
                      stream: bool, query: str = "") -> Http1Response:
        """Send one request; return the response once its headers arrived. Raises ProxyError 502/504."""
        assert self.pool is not None, "UpstreamClient.start() was not awaited"
        target = self._prefix + path + (f"?{query}" if query else "")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                resp = await self.pool.request(method, target, headers, body,
                                               read_timeout_s=self.read_timeout_s if stream else None)
        except TimeoutError:
            raise ProxyError(504, f"the upstream model server at {self.base} did not answer within {self.timeout_s:g}s; "
                                  "try again, or raise upstream_timeout_s if long generations are expected",
                             code="upstream_timeout") from None
        except UpstreamConnectError as exc:
            raise ProxyError(502, f"cannot connect to the upstream model server at {self.base} ({exc}); "
                                  "check that vLLM is running and upstream_url is right", code="upstream_unreachable") from None
        except (OSError, ValueError) as exc:
            raise ProxyError(502, f"the upstream model server at {self.base} failed: {type(exc).__name__}: {exc}",
                             code="upstream_error") from None
        if not stream:
            resp.deadline = deadline  # the body, too, by the call's deadline
        return resp


def response_headers(upstream: Http1Response) -> dict[str, str]:
    h = upstream.headers
    return {k: h[k] for k in _KEEP_RESPONSE_HEADERS if k in h}
