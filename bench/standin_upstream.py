"""A STAND-IN for vLLM's OpenAI server (not vLLM): a raw uvloop protocol that answers instantly.

Used only where the real vLLM cannot serve: as the benchmark's upstream (a Python aiohttp server
would be the bottleneck, and vLLM on CPU answers in seconds), and for faults vLLM cannot be made to
produce on demand. The wire format copies vLLM's: JSON bodies with ``id`` first, SSE streams with
``data: {...}\\n\\n`` events in chunked transfer encoding, ending ``data: [DONE]``.

Behaviour is picked by the request's model name:
- anything else                   : instant answer; non-streaming ~500-byte body, streaming 64 chunks;
                                    the id is ``chatcmpl-<X-Request-Id>`` when that header is sent, as vLLM does;
- ``standin-slow``                : a stream whose chunks come every 50 ms (8 chunks);
- ``standin-reset``               : a stream that sends 3 chunks, then resets the connection;
- ``standin-hang``                : never answers (timeouts);
- ``standin-400``                 : a vLLM-style 400 error body.

Run: ``python bench/standin_upstream.py --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket

MODEL = "standin-model"
_STANDIN_ID = b"standin00000000000000000000"
_CREATED = 1764115200


def _chat_body(model: bytes) -> bytes:
    content = "This is a stand-in answer of fixed length, used to measure the proxy and nothing else. " * 3
    body = {"id": "chatcmpl-standin00000000000000000000", "object": "chat.completion", "created": _CREATED,
            "model": "MODEL", "choices": [{"index": 0, "message": {"role": "assistant", "content": content.strip()},
                                           "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 64, "total_tokens": 76}}
    return json.dumps(body, separators=(",", ":")).encode().replace(b"MODEL", model)


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse_events(model: bytes, n: int) -> list[bytes]:
    events = []
    for i in range(n):
        delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f"tok{i} "}
        finish = "stop" if i == n - 1 else None
        ev = {"id": "chatcmpl-standin00000000000000000000", "object": "chat.completion.chunk", "created": _CREATED,
              "model": "MODEL", "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        events.append(b"data: " + json.dumps(ev, separators=(",", ":")).encode().replace(b"MODEL", model) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


_HEAD_JSON = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
_HEAD_SSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
_MODELS = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": _CREATED,
                                                   "owned_by": "standin"}]}).encode()


class StandinProtocol(asyncio.Protocol):
    cache: dict[tuple[bytes, bool], bytes] = {}
    events_cache: dict[bytes, list[bytes]] = {}
    body_cache: dict[bytes, bytes] = {}

    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"content-length:")
            if at >= 0:
                length = int(lower[at + 15:lower.find(b"\r\n", at) if lower.find(b"\r\n", at) > 0 else None].strip())
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.respond(head, body)

    def respond(self, head: bytes, body: bytes) -> None:
        line = head.split(b"\r\n", 1)[0]
        lower = head.lower()
        if line.startswith(b"GET /v1/models"):
            self.transport.write(_HEAD_JSON % (200, b"OK", len(_MODELS)) + _MODELS)
            return
        at = body.find(b'"model"')
        model = MODEL.encode()
        if at >= 0:
            q1 = body.find(b'"', body.find(b":", at) + 1)
            model = body[q1 + 1:body.find(b'"', q1 + 1)]
        stream = b'"stream":true' in body.replace(b" ", b"")
        if model == b"standin-hang":
            return
        if model == b"standin-400":
            err = b'{"error":{"message":"stand-in rejects this request","type":"BadRequestError","param":null,"code":400}}'
            self.transport.write(_HEAD_JSON % (400, b"Bad Request", len(err)) + err)
            return
        if model == b"standin-slow" and stream:
            asyncio.ensure_future(self.slow(model))
            return
        if model == b"standin-reset" and stream:
            events = _sse_events(model, 8)
            self.transport.write(_HEAD_SSE + b"".join(_chunk(e) for e in events[:3]))
            self.transport.abort()
            return
        key = (model, stream)
        out = self.cache.get(key)
        # Like vLLM: the response id is "chatcmpl-<X-Request-Id>" when the client sends one.
        at = lower.find(b"\r\nx-request-id:")
        req_id = head[at + 15:head.find(b"\r\n", at + 2) if head.find(b"\r\n", at + 2) > 0 else None].strip() if at >= 0 else None
        if out is None:
            if stream:
                out = _HEAD_SSE + b"".join(_chunk(e) for e in _sse_events(model, 64)) + b"0\r\n\r\n"
            else:
                b = _chat_body(model)
                out = _HEAD_JSON % (200, b"OK", len(b)) + b
            if len(self.cache) < 1000:
                self.cache[key] = out
        if req_id:
            new_id = b"chatcmpl-" + req_id
            if stream:  # re-frame: every HTTP chunk's length changes with the id
                events = self.events_cache.get(model)
                if events is None:
                    events = self.events_cache[model] = _sse_events(model, 64)
                out = _HEAD_SSE + b"".join(_chunk(e.replace(b"chatcmpl-" + _STANDIN_ID, new_id)) for e in events) + b"0\r\n\r\n"
            else:
                template = self.body_cache.get(model)
                if template is None:
                    template = self.body_cache[model] = _chat_body(model)
                b = template.replace(b"chatcmpl-" + _STANDIN_ID, new_id)
                out = _HEAD_JSON % (200, b"OK", len(b)) + b
        self.transport.write(out)

    async def slow(self, model: bytes) -> None:
        events = _sse_events(model, 8)
        self.transport.write(_HEAD_SSE)
        for e in events:
            if self.transport.is_closing():
                return
            self.transport.write(_chunk(e))
            await asyncio.sleep(0.05)
        self.transport.write(b"0\r\n\r\n")


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StandinProtocol, host, port, backlog=1024, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
