"""The vLLM (or any OpenAI-compatible) upstream: one pooled keep-alive ``aiohttp.ClientSession``.

Bodies go out as the bytes the client sent (re-serialized only when routing changes the model
name); responses come back as bytes and are never decoded on the relay path. Headers: the client's
are forwarded except hop-by-hop ones, ``Host``, ``Content-Length``, ``Accept-Encoding`` (so the
upstream answers uncompressed and capture can read it) and our own ``x-onpolicy-*``.
"""

from __future__ import annotations

import asyncio

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import ProxyError
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
        self.api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        self.connect_timeout_s = settings.upstream_connect_timeout_s
        self.timeout_s = settings.upstream_timeout_s
        self.read_timeout_s = settings.upstream_read_timeout_s
        self.max_connections = settings.upstream_max_connections
        # Non-streaming calls: the whole call is bounded. Streams: the wait for the headers is bounded
        # by asyncio.timeout in the relay, and each later read by sock_read (silence between chunks).
        self.timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)
        self.stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s,
                                                    sock_read=self.read_timeout_s)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections,
                                         keepalive_timeout=30, enable_cleanup_closed=False, ttl_dns_cache=300)
        # auto_decompress off + no Accept-Encoding forwarded: bytes pass through as sent.
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",),
                                             read_bufsize=2**16, cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def headers(self, incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict()
        for k, v in incoming.items():
            lk = k.lower()
            if lk in _DROP_REQUEST_HEADERS or lk.startswith("x-onpolicy-"):
                continue
            out.add(k, v)
        if self.api_key is not None:
            out["Authorization"] = f"Bearer {self.api_key}"
        return out

    async def request(self, method: str, path: str, body: bytes | None, headers: CIMultiDict[str], *,
                      stream: bool, query: str = "") -> aiohttp.ClientResponse:
        """Send one request; return the response once its headers arrived. Raises ProxyError 502/504."""
        url = self.base + path + (f"?{query}" if query else "")
        assert self.session is not None, "UpstreamClient.start() was not awaited"
        try:
            if stream:
                async with asyncio.timeout(self.timeout_s):
                    return await self.session.request(method, url, data=body, headers=headers, timeout=self.stream_timeout)
            return await self.session.request(method, url, data=body, headers=headers, timeout=self.timeout)
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise ProxyError(504, f"the upstream model server at {self.base} did not answer within {self.timeout_s:g}s; "
                                  "try again, or raise upstream_timeout_s if long generations are expected",
                             code="upstream_timeout") from None
        except aiohttp.ClientConnectorError as exc:
            raise ProxyError(502, f"cannot connect to the upstream model server at {self.base} ({exc.os_error or exc}); "
                                  "check that vLLM is running and upstream_url is right", code="upstream_unreachable") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ProxyError(502, f"the upstream model server at {self.base} failed: {type(exc).__name__}: {exc}",
                             code="upstream_error") from None


def response_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    h = upstream.headers
    return {k: h[k] for k in _KEEP_RESPONSE_HEADERS if k in h}
