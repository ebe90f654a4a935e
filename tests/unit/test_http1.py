"""proxy.http1: the upstream HTTP/1.1 client, against a scripted raw-socket server.

The server here is a test fixture that writes exact bytes (framings split at awkward places, cuts,
stalls, closed keep-alive connections); the client's behaviour with the real vLLM server is covered
by tests/integration/test_proxy_vllm.py.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.http1 import Http1Pool, UpstreamBroken, UpstreamConnectError


class Scripted:
    """A server answering each request with the next script: a list of byte strings (written with a
    pause between them), or a callable(writer) coroutine."""

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.connections = 0
        self.requests: list[bytes] = []
        self.server = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        try:
            while self.scripts:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                script = self.scripts.pop(0)
                if callable(script):
                    if await script(writer) == "close":
                        break
                    continue
                for part in script:
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.01)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def _send_then(wire: bytes, wait_s: float, abort: bool = False):
    """A script: write ``wire``, wait, then end the connection (``abort``: with a reset)."""

    async def script(writer):
        writer.write(wire)
        await writer.drain()
        await asyncio.sleep(wait_s)
        if abort:
            writer.transport.abort()
        return "close"

    return script


def _ok(body: bytes = b'{"id":"x"}', extra: bytes = b"") -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: %d\r\n\r\n" % len(body) + body]


async def test_content_length_body_and_keep_alive_reuse():
    async with Scripted([_ok(b'{"a":1}'), _ok(b'{"b":2}')]) as srv:
        pool = Http1Pool(f"http://127.0.0.1:{srv.port}")
        r1 = await pool.request("POST", "/v1/chat/completions", [("X-Test", "1")], b'{"q":1}')
        assert (r1.status, r1.content_type, await r1.read()) == (200, "application/json", b'{"a":1}')
        r2 = await pool.request("POST", "/v1/chat/completions", [], b'{"q":2}')
        assert await r2.read() == b'{"b":2}'
        assert srv.connections == 1, "the second request must reuse the kept-alive connection"
        first = srv.requests[0]
        assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"X-Test: 1\r\n" in first and b"Content-Length: 7\r\n" in first and first.endswith(b'{"q":1}')
        await pool.close()


async def test_chunked_stream_split_across_writes_is_reassembled():
    events = [b'data: {"n":%d}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    # cut the wire inside a size line, inside data and between CR and LF
    cuts = [3, 20, 21, 40, 41, 42, len(wire) - 3, len(wire) - 1]
    parts, last = [], 0
    for c in cuts:
        parts.append(wire[last:c])
        last = c
    parts.append(wire[last:])
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with Scripted([[head] + parts, _ok()]) as srv:
        pool = Http1Pool(f"http://127.0.0.1:{srv.port}")
        resp = await pool.request("POST", "/v1/completions", [], b"{}", read_timeout_s=5)
        assert resp.content_type == "text/event-stream"
        got = [c async for c in resp.iter_any()]
        assert b"".join(got) == b"".join(events)
        assert len(got) > 1, "chunks must be delivered as they arrive, not at the end"
        assert await (await pool.request("GET", "/v1/models", [], None)).read() == b'{"id":"x"}'
        assert srv.connections == 1, "a chunked body read to its end leaves the connection reusable"
        await pool.close()


async def test_body_until_close_and_interim_answers():
    async with Scripted([[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"]]) as srv:
        pool = Http1Pool(f"http://127.0.0.1:{srv.port}")
        resp = await pool.request("POST", "/x", [], b"{}")
        assert resp.status == 200
        assert await resp.read() == b"all of it"
        await pool.close()


async def test_a_cut_mid_stream_raises_upstream_broken():
    async with Scripted([_send_then(CHUNKED_HEAD + b"6\r\ndata: \r\n", 0.05, abort=True)]) as srv:
        pool = Http1Pool(f"http://127.0.0.1:{srv.port}")
        resp = await pool.request("POST", "/x", [], b"{}", read_timeout_s=5)
        got = []
        with pytest.raises(UpstreamBroken):
            async for c in resp.iter_any():
                got.append(c)
        assert got == [b"data: "]
        assert pool.open_connections == 0
        await pool.close()


async def test_silence_mid_stream_times_out_and_close_drops_the_connection():
    async with Scripted([_send_then(CHUNKED_HEAD + b"3\r\nabc\r\n", 2)]) as srv:
        pool = Http1Pool(f"http://127.0.0.1:{srv.port}")
        resp = await pool.request("POST", "/x", [], b"{}", read_timeout_s=0.2)
        it = resp.iter_any()
        assert await it.__anext__() == b"abc"
        with pytest.raises(TimeoutError):
            await it.__anext__()
        resp.close()
        await asyncio.sleep(0.05)
        assert pool.open_connections == 0
        await pool.close()


async def test_a_kept_alive_connection_closed_by_the_server_is_retried_once():
    async def answer_then_close(writer):
        writer.write(_ok(b"1")[0])
        await writer.drain()
        await asyncio.sleep(0.05)
        return "close"  # the server ends the kept-alive connection while it is idle in the pool

    async with Scripted([answer_then_close, _ok(b"2")]) as srv:
        pool = Http1Pool(f"http://127.0.0.1:{srv.port}")
        assert await (await pool.request("POST", "/x", [], b"{}")).read() == b"1"
        await asyncio.sleep(0.2)
        assert await (await pool.request("POST", "/x", [], b"{}")).read() == b"2"
        assert srv.connections == 2
        await pool.close()


async def test_connections_are_capped_and_waiters_served_in_turn():
    async def slow(writer):
        await asyncio.sleep(0.1)
        writer.write(_ok(b"ok")[0])
        await writer.drain()

    async with Scripted([slow] * 6) as srv:
        pool = Http1Pool(f"http://127.0.0.1:{srv.port}", max_connections=2)

        async def one():
            return await (await pool.request("POST", "/x", [], b"{}")).read()

        assert await asyncio.gather(*(one() for _ in range(6))) == [b"ok"] * 6
        assert srv.connections == 2
        await pool.close()


@pytest.mark.parametrize("wire", [b"HTTP/1.1 2x0 OK\r\n\r\n", b"SSH-2.0-OpenSSH\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
async def test_malformed_answers_raise_upstream_broken(wire):
    async with Scripted([_send_then(wire, 0.2)]) as srv:
        pool = Http1Pool(f"http://127.0.0.1:{srv.port}")
        with pytest.raises(UpstreamBroken):
            resp = await pool.request("POST", "/x", [], b"{}", read_timeout_s=2)
            await resp.read()
        await pool.close()


async def test_unreachable_upstream_and_header_injection_are_refused():
    pool = Http1Pool("http://127.0.0.1:9", connect_timeout_s=1)
    with pytest.raises(UpstreamConnectError):
        await pool.request("POST", "/x", [], b"{}")
    assert pool.open_connections == 0
    with pytest.raises(ValueError):
        await pool.request("POST", "/x", [("X-A", "v\r\nX-Injected: 1")], b"{}")


async def test_a_large_body_is_read_whole_with_the_socket_paused_between():
    body = bytes(range(256)) * 8192  # 2 MiB: the client pauses reading past 256 KiB unread
    async with Scripted([_ok(body)]) as srv:
        pool = Http1Pool(f"http://127.0.0.1:{srv.port}")
        resp = await pool.request("GET", "/big", [], None)
        await asyncio.sleep(0.2)  # let the buffer fill past the high-water mark
        assert await resp.read() == body
        await pool.close()


async def test_a_caller_that_gives_up_as_the_head_arrives_drops_the_connection():
    async def silent(writer):
        await asyncio.sleep(1)
        return "close"

    async with Scripted([silent]) as srv:
        pool = Http1Pool(f"http://127.0.0.1:{srv.port}")
        conn = await pool._acquire()
        waiter = conn.send(b"POST", b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n", None)
        waiter.cancel()  # the caller's task was cancelled; its answer arrives in the same loop turn
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # must not raise
        await asyncio.sleep(0.05)
        assert conn.closed and pool.open_connections == 0
        await pool.close()
