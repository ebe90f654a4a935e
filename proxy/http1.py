"""A lean HTTP/1.1 client for the upstream: pooled keep-alive connections on asyncio protocols.

Why not aiohttp's ``ClientSession`` (which carried the upstream leg until this module): per request
it builds a ``ClientRequest`` and a ``ClientResponse``, a timer context, trace hooks, a cookie-jar
pass and a ``StreamReader``. Profiled under ``bench/proxy.py`` (c=32, non-streaming, capture off),
``ClientSession._request`` was about half of the relay handler's time. The upstream is a server the
operator configured (vLLM, or an OpenAI-compatible API), so the client needs much less: write one
request, parse a status line and headers, and deliver a body framed by ``Content-Length``, by
``Transfer-Encoding: chunked`` or by the connection's end.

What it does:

- ``Http1Pool(url_base)``: up to ``max_connections`` connections, reused newest-first while idle
  for less than ``idle_timeout_s`` (below uvicorn's 5 s keep-alive, vLLM's server, so the pool
  rarely picks a connection the server is closing). A request that finds every connection busy
  waits for one. A reused connection that dies before any byte of the answer (the server closed it
  while idle) is retried once on a new one.
- ``await pool.request(method, target, headers, body)`` returns an ``Http1Response`` once the
  status line and headers arrived. ``await resp.read()`` gives the whole body; ``async for chunk in
  resp.iter_any()`` gives body bytes as they arrive (chunked framing removed); reading pauses the
  socket when more than 256 KiB wait unread. ``resp.close()`` drops the connection (an abandoned
  stream: the upstream stops generating); ``resp.release()`` returns it to the pool when the body
  was read to its end, else drops it.
- Errors: ``UpstreamConnectError`` (cannot connect), ``UpstreamBroken`` (closed or malformed
  mid-answer) -- both ``OSError`` but not ``ConnectionError``, which the relay reads as the client
  leaving -- and ``TimeoutError`` from the caller's deadlines (``read_timeout_s`` between arrivals
  in ``iter_any``, an absolute ``deadline`` in ``read``).

Not supported, on purpose: HTTP/1.0 keep-alive, ``Expect: 100-continue`` (never sent; 1xx answers
are skipped), pipelining, compression (``Accept-Encoding`` is not forwarded upstream), proxies.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_mod
import time
from collections import deque
from typing import AsyncIterator
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
HIGH_WATER = 256 * 1024


class UpstreamConnectError(OSError):
    """The upstream could not be connected to (refused, unreachable, DNS, connect timeout)."""


class UpstreamBroken(OSError):
    """The upstream closed the connection or sent something that is not HTTP/1.1 mid-answer."""


_LENGTH, _CHUNKED, _UNTIL_CLOSE = 0, 1, 2


class Http1Response:
    """One answer: ``status``, ``headers`` (lower-case names), and its body as it arrives."""

    __slots__ = ("status", "headers", "_conn", "_chunks", "_buffered", "_done", "_exc", "_waiter", "read_timeout_s",
                 "deadline")

    def __init__(self, conn: "_Conn", status: int, headers: dict[str, str], read_timeout_s: float | None):
        self.status = status
        self.headers = headers
        self._conn: _Conn | None = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self.read_timeout_s = read_timeout_s
        self.deadline: float | None = None  # loop time by which read() must have the whole body

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    # -- fed by the connection ------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._conn = None  # the connection went back to the pool (or was closed); nothing to drop later
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._exc = exc
        self._conn = None
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- the caller's side -------------------------------------------------------------------------
    def _take(self) -> bytes:
        chunks, self._chunks = self._chunks, []
        self._buffered = 0
        if self._conn is not None:
            self._conn.resume()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def read(self) -> bytes:
        """The whole body (by ``deadline`` when one is set; past it: TimeoutError)."""
        if self._done:
            return self._take()
        parts = []
        async with asyncio.timeout_at(self.deadline):
            while True:
                if self._chunks:
                    parts.append(self._take())  # taking resumes a socket paused at the high-water mark
                if self._done:
                    break
                if self._exc is not None:
                    raise self._exc
                await self._wait()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; TimeoutError after ``read_timeout_s`` without any."""
        while True:
            if self._chunks:
                yield self._take()
            elif self._done:
                return
            elif self._exc is not None:
                raise self._exc
            else:
                async with asyncio.timeout(self.read_timeout_s):
                    await self._wait()

    def close(self) -> None:
        """Drop the connection unless the body already arrived whole (it is then back in the pool)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    release = close  # a body read to its end released the connection already; an unread one is dropped

    async def __aenter__(self) -> "Http1Response":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class _Conn(asyncio.Protocol):
    """One connection and its response parser."""

    def __init__(self, pool: "Http1Pool"):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.paused = False
        self._buf = bytearray()
        self._head_waiter: asyncio.Future | None = None
        self._resp: Http1Response | None = None
        self._method = b""
        self._read_timeout_s: float | None = None
        self._mode = _LENGTH
        self._left = 0  # Content-Length: bytes still to come; chunked: bytes left of the current chunk (-1: need a size line)
        self._keep_alive = True
        self._got_bytes = False

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp, self._resp = self._resp, None
        if resp is not None and self._mode == _UNTIL_CLOSE and self._head_waiter is None:
            resp._finish()  # the body ends with the connection
        elif resp is not None:
            resp._fail(UpstreamBroken(f"the upstream closed the connection mid-answer ({exc or 'end of stream'})"))
        w, self._head_waiter = self._head_waiter, None
        if w is not None and not w.done():
            w.set_exception(UpstreamBroken(f"the upstream closed the connection before answering ({exc or 'end of stream'})"))
        self.pool._lost(self)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._head_waiter is not None:
            self._buf += data
            self._parse_head()
        elif self._resp is not None:
            self._body(data)
        else:  # bytes nobody asked for: the connection's state is unknown
            self.abort()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost ends or fails the answer

    # -- requests --------------------------------------------------------------------------------
    def send(self, method: bytes, request: bytes, read_timeout_s: float | None) -> asyncio.Future:
        self._method = method
        self._read_timeout_s = read_timeout_s
        self._got_bytes = False
        fut = asyncio.get_running_loop().create_future()
        if self.closed:  # lost between the pool handing it out and now
            fut.set_exception(UpstreamBroken("the upstream closed the connection before the request was sent"))
            return fut
        self._head_waiter = fut
        self.transport.write(request)
        return fut

    def _parse_head(self) -> None:
        buf = self._buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self._broken(f"the upstream's response head is over {MAX_HEAD_BYTES} bytes")
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[:end + 4]
            parts = lines[0].split(b" ", 2)
            try:
                if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                    raise ValueError
                status = int(parts[1])
            except ValueError:
                self._broken("the upstream's answer is not HTTP/1.1 (bad status line)")
                return
            if 100 <= status < 200 and status != 101:
                continue  # an interim answer: the real one follows
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep:
                    self._broken("the upstream's answer has a malformed header line")
                    return
                key = name.strip().lower().decode("latin-1")
                val = value.strip().decode("latin-1")
                headers[key] = f"{headers[key]}, {val}" if key in headers else val
            break
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        self._keep_alive = parts[0] == b"HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if self._method == b"HEAD" or status in (204, 304):
            self._mode, self._left = _LENGTH, 0
        elif te is not None:
            if te.lower().rsplit(",", 1)[-1].strip() != "chunked":
                self._broken(f"the upstream's Transfer-Encoding {te!r} is not supported")
                return
            self._mode, self._left = _CHUNKED, -1
        elif cl is not None:
            try:
                self._left = int(cl)
                if self._left < 0:
                    raise ValueError
            except ValueError:
                self._broken("the upstream's Content-Length is not a number")
                return
            self._mode = _LENGTH
        else:
            self._mode, self._keep_alive = _UNTIL_CLOSE, False
        w, self._head_waiter = self._head_waiter, None
        if w is None or w.done():  # the caller gave up (cancelled, timed out) in this very loop turn
            self.abort()
            return
        resp = self._resp = Http1Response(self, status, headers, self._read_timeout_s)
        w.set_result(resp)
        rest = bytes(buf)
        buf.clear()
        if rest or (self._mode == _LENGTH and self._left == 0):
            self._body(rest)

    def _body(self, data: bytes) -> None:
        resp = self._resp
        if self._mode == _LENGTH:
            if len(data) >= self._left:
                extra = len(data) > self._left
                if self._left:
                    resp._feed(data[:self._left] if extra else data)
                self._left = 0
                if extra:
                    self._keep_alive = False  # more than announced: do not trust this connection again
                self._complete()
            else:
                self._left -= len(data)
                resp._feed(data)
        elif self._mode == _CHUNKED:
            self._chunked(data)
        elif data:
            resp._feed(data)

    def _chunked(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        out: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n:
            left = self._left
            if left > 0:  # inside a chunk's data
                take = min(left, n - pos)
                out.append(data[pos:pos + take])
                pos += take
                self._left = left - take
                if self._left == 0:
                    self._left = -2  # the CRLF after the data
            elif left == -2:
                if n - pos < 2:
                    buf += data[pos:]
                    break
                if data[pos:pos + 2] != b"\r\n":
                    self._broken("the upstream's chunked body is malformed (no CRLF after a chunk)")
                    return
                pos += 2
                self._left = -1
            elif left == -1:  # a size line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 1024:
                        self._broken("the upstream's chunk size line is too long")
                        return
                    buf += data[pos:]
                    break
                try:
                    size = int(data[pos:eol].split(b";", 1)[0], 16)
                    if size < 0:
                        raise ValueError
                except ValueError:
                    self._broken("the upstream's chunked body is malformed (bad chunk size)")
                    return
                pos = eol + 2
                self._left = size if size else -3
            else:  # -3: trailers after the last chunk, ended by an empty line
                end = data.find(b"\r\n", pos)
                if end < 0:
                    buf += data[pos:]
                    break
                if end == pos:  # the empty line: the body is complete
                    if out:
                        self._resp._feed(b"".join(out))
                        out = []
                    if end + 2 < n:
                        self._keep_alive = False
                    self._complete()
                    return
                pos = end + 2  # a trailer field: ignored
        if out:
            self._resp._feed(out[0] if len(out) == 1 else b"".join(out))

    def _complete(self) -> None:
        resp, self._resp = self._resp, None
        self.resume()
        if resp is not None:
            resp._finish()
        self.pool._release(self, self._keep_alive)

    def _broken(self, why: str) -> None:
        exc = UpstreamBroken(why)
        resp, self._resp = self._resp, None
        if resp is not None:
            resp._fail(exc)
        w, self._head_waiter = self._head_waiter, None
        if w is not None and not w.done():
            w.set_exception(exc)
        self.abort()

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()  # connection_lost follows and tells the pool


class Http1Pool:
    """Keep-alive connections to one ``http://`` or ``https://`` origin."""

    def __init__(self, origin: str, *, max_connections: int = 1024, connect_timeout_s: float = 5.0,
                 idle_timeout_s: float = 4.0, ssl: ssl_mod.SSLContext | None = None):
        u = urlsplit(origin)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl = (ssl or ssl_mod.create_default_context()) if u.scheme == "https" else None
        default = 443 if u.scheme == "https" else 80
        self.host_header = (f"[{self.host}]" if ":" in self.host else self.host) + ("" if self.port == default else f":{self.port}")
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._idle: list[_Conn] = []
        self._open = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._closing = False

    @property
    def open_connections(self) -> int:
        return self._open

    async def _acquire(self) -> _Conn:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_timeout_s:
                conn.reused = True
                return conn
            conn.abort()
        if self._open < self.max_connections:
            return await self._connect()
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            conn = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(fut.result(), True)  # handed over just as we were cancelled: pass it on
            raise
        return conn if conn is not None else await self._connect()

    async def _connect(self) -> _Conn:
        self._open += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self.ssl)
        except TimeoutError:
            self._open -= 1
            self._wake_one()
            raise UpstreamConnectError(f"connecting to {self.host}:{self.port} took over {self.connect_timeout_s:g}s") from None
        except OSError as exc:
            self._open -= 1
            self._wake_one()
            raise UpstreamConnectError(f"{exc.strerror or exc}") from None
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        return conn

    def _release(self, conn: _Conn, keep_alive: bool) -> None:
        if conn.closed:
            return  # _lost accounted for it
        if not keep_alive or self._closing:
            conn.abort()
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                conn.reused = True
                fut.set_result(conn)
                return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _lost(self, conn: _Conn) -> None:
        self._open -= 1
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # a slot is free: the waiter connects anew
                return

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None, *,
                      read_timeout_s: float | None = None) -> Http1Response:
        """Send one request; return its answer once the status line and headers arrived."""
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        for k, v in headers:
            if "\n" in v or "\r" in v:
                raise ValueError(f"header {k!r} holds a line break")
            lines.append(f"{k}: {v}\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body) if body else 0}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")
        request = head + body if body else head
        m = method.encode()
        for attempt in (0, 1):
            conn = await self._acquire()
            reused = conn.reused
            fut = conn.send(m, request, read_timeout_s)
            try:
                return await fut
            except UpstreamBroken:
                # A reused connection the server had closed while idle: nothing was answered, so the
                # request was not served; once more on a new connection.
                if attempt == 0 and reused and not conn._got_bytes:
                    continue
                raise
            except BaseException:
                conn.abort()  # cancelled (the client left) or timed out while waiting: drop the connection
                raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closing = True
        for conn in list(self._idle):
            conn.abort()
        self._idle.clear()
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()
        await asyncio.sleep(0)
